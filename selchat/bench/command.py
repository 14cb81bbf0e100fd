"""``selchat bench``: measure the server (and the baseline beside it).

Four modes, one per invocation: the relay benchmark (the default),
``--idle N``, ``--login-storm N`` and ``--matrix standard|quick``, the set
``make bench`` runs. The report goes to stdout (``--json`` for machines),
progress to stderr. Exit status: 0 when every run was correct, 2 when
something was lost, reordered or dropped, 1 when the bench could not run.
Speed targets are reported, never turned into a failing exit status.
"""

from __future__ import annotations

import sys

import click

from selchat.bench import BenchError
from selchat.bench.flows import MIN_SIZE

MAX_SIZE = 4000  # a chat message is at most 4096 bytes with "MSG "; leave room


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--pairs", default=100, show_default=True, type=click.IntRange(1), metavar="N",
              help="Chatting pairs.")
@click.option("--window", default=32, show_default=True, type=click.IntRange(1), metavar="N",
              help="Messages in flight per sender (sent, not yet received).")
@click.option("--size", default=64, show_default=True, type=click.IntRange(MIN_SIZE, MAX_SIZE), metavar="BYTES",
              help="Message text size (sequence number and timestamp included).")
@click.option("--text", "charset", type=click.Choice(["ascii", "utf8"]), default="ascii", show_default=True,
              help="The messages' text: ASCII, or UTF-8 beyond ASCII (é, two bytes each).")
@click.option("--duration", default=5.0, show_default=True, type=click.FloatRange(0.1), metavar="SECONDS",
              help="Length of each timed window.")
@click.option("--direction", type=click.Choice(["both", "one"]), default="both", show_default=True,
              help="Both partners send, or only the one who asked for the chat.")
@click.option("--rate", default=0.0, type=click.FloatRange(0), metavar="MSGS_PER_S",
              help="Offer at most this many messages a second per server (each flow sends its window once "
                   "per period), so that systems compare at the same load rather than each at its own "
                   "limit; 0: as fast as the window allows.")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1), metavar="N",
              help="Timed windows per server; the report shows medians.")
@click.option("--warmup", default=1.0, show_default=True, type=click.FloatRange(0), metavar="SECONDS",
              help="Unrecorded traffic per server before the timed windows (a burst, then the measured "
                   "shape), so that every server is measured in its steady state; 0: none.")
@click.option("--protocol", type=click.Choice(["1", "2", "both"]), default="1", show_default=True,
              help="selchat protocol version the relay's users speak; both: a second selchat with version 2 "
                   "users beside the first, interleaved, and the ratio v2/v1.")
@click.option("--cluster", "cluster_nodes", type=click.IntRange(2, 16), metavar="N",
              help="Also a cluster: redis-server and N selchat nodes on it, each pair's users on different "
                   "nodes, interleaved beside the one-node selchat, and the ratio cluster/one node "
                   "(needs redis-server; with --protocol 1 or 2).")
@click.option("--against", type=click.Path(exists=True, file_okay=False), metavar="TREE",
              help="Also the selchat of source tree TREE (a git worktree of another commit), spawned the "
                   "same way and interleaved, and the ratio this/against; its users speak the version "
                   "--protocol names (version 1 with both: v2/against is then version 2 over TREE's version 1).")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also drive the asyncio baseline relay, interleaved, and show ratios.")
@click.option("--baseline-script", type=click.Path(exists=True, dir_okay=False), metavar="PATH",
              help="The baseline relay to run (default: bench/baselines/asyncio_relay.py).")
@click.option("--baseline-port", type=click.IntRange(1, 65535), metavar="PORT",
              help="Measure the baseline already listening on 127.0.0.1:PORT instead of spawning one.")
@click.option("--baseline-pid", type=int, metavar="PID",
              help="Pid of that baseline, for CPU and RSS (found by its port otherwise).")
@click.option("--host", default="127.0.0.1", show_default=True, metavar="ADDR",
              help="Address of a running selchat (with --port).")
@click.option("--port", type=click.IntRange(1, 65535), metavar="PORT",
              help="Measure the selchat already listening here instead of spawning one (its users are "
                   "REGISTERed, so give it a cheap scrypt cost).")
@click.option("--spawn", is_flag=True, help="Start a fresh server on a free port (the default without --port).")
@click.option("--server-pid", type=int, metavar="PID",
              help="Pid of the running server, for CPU and RSS (found by its port when local).")
@click.option("--ping-interval", type=float, metavar="SECONDS",
              help="--ping-interval of the spawned server (--idle: 5; otherwise the server's default).")
@click.option("--pin/--no-pin", default=False, show_default=True,
              help="Pin the server to the first CPU and the load generator to the others.")
@click.option("--workers", type=click.IntRange(1, 64), metavar="N",
              help="Load-generator processes (default: one per generator CPU; at least two for a relay "
                   "with more than one message in flight).")
@click.option("--idle", "idle_users", type=click.IntRange(1), metavar="USERS",
              help="Idle mode: hold USERS logged-in users through two ping periods.")
@click.option("--hold", type=click.FloatRange(0.1), metavar="SECONDS",
              help="--idle: how long to hold them (default: two ping intervals and a second).")
@click.option("--login-storm", "storm_logins", type=click.IntRange(1), metavar="LOGINS",
              help="Login-storm mode: LOGINS logins with real password hashing while one pair chats.")
@click.option("--storm-concurrency", default=32, show_default=True, type=click.IntRange(1, 256), metavar="N",
              help="--login-storm: logins in progress at once.")
@click.option("--storm-rate", default=100.0, show_default=True, type=click.FloatRange(1, 10000),
              metavar="PER_S", help="--login-storm: messages per second each way of the chatting pair.")
@click.option("--matrix", type=click.Choice(["standard", "quick"]),
              help="Run a whole matrix (relay rows, idle, login storm) and check the targets.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--save", type=click.Path(dir_okay=False, writable=True), metavar="PATH",
              help="Also write the result as JSON to PATH.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def bench(pairs, window, size, charset, duration, direction, rate, repeat, warmup, protocol, baseline, baseline_script,
          baseline_port, baseline_pid, cluster_nodes, against, host, port, spawn,
          server_pid, ping_interval, pin, workers, idle_users, hold, storm_logins, storm_concurrency, storm_rate,
          matrix, as_json, save, quiet):
    """Measure selchat: relay throughput, latency and CPU per message beside
    an asyncio baseline; idle scale; a login storm.

    \b
    selchat bench --pin                        100 pairs, 32 in flight, vs baseline
    selchat bench --pin --pairs 100 --window 1 latency with one message in flight
    selchat bench --pin --protocol both        protocol version 2 beside version 1
    selchat bench --pin --protocol both --rate 400000   ... both offered one load
    selchat bench --pin --cluster 2            users chatting across 2 nodes, beside one node
    selchat bench --pin --against ../old       this tree's selchat beside another tree's
    selchat bench --pin --idle 10000           10,000 idle users, heartbeats on
    selchat bench --pin --login-storm 1000     logins with real hashing while a pair chats
    selchat bench --matrix standard            everything, as make bench runs it
    """
    chosen = [name for name, on in (("--idle", idle_users), ("--login-storm", storm_logins), ("--matrix", matrix))
              if on]
    if len(chosen) > 1:
        raise click.UsageError(f"choose one of {', '.join(chosen)}")
    if spawn and port:
        raise click.UsageError("--spawn starts its own server: leave out --port")
    if rate and chosen:
        raise click.UsageError(f"--rate paces a relay run: leave out {chosen[0]}")
    if chosen and (port or baseline_port):
        raise click.UsageError(f"{chosen[0]} always spawns its servers: leave out --port and --baseline-port")
    if cluster_nodes:
        if chosen:
            raise click.UsageError(f"--cluster is a relay run: leave out {chosen[0]}")
        if port:
            raise click.UsageError("--cluster spawns its nodes and the one-node selchat: leave out --port")
        if protocol == "both":
            raise click.UsageError("--cluster runs one protocol version: --protocol 1 or --protocol 2")
    if against:
        if chosen or port or cluster_nodes:
            raise click.UsageError("--against is a relay run that spawns every server: leave out "
                                   + (chosen[0] if chosen else "--port" if port else "--cluster"))
    from selchat.bench import report
    from selchat.bench.progress import Progress

    progress = Progress(not quiet)
    try:
        if matrix:
            from selchat.bench.matrix import run_matrix

            from selchat.bench.sysinfo import usable_cpus

            result = run_matrix(matrix, pin=len(usable_cpus()) >= 2, workers=workers,
                                baseline_script=baseline_script, progress=progress)
            text = report.matrix_text
        elif idle_users:
            from selchat.bench.idle import run_idle

            result = run_idle(idle_users, ping_interval=ping_interval or 5.0, hold=hold, pin=pin, workers=workers,
                              progress=progress)
            text = report.idle_text
        elif storm_logins:
            from selchat.bench.storm import run_storm

            result = run_storm(storm_logins, concurrency=storm_concurrency, rate=storm_rate, pin=pin,
                               workers=workers, progress=progress)
            text = report.storm_text
        else:
            from selchat.bench.relay import RelayOptions, run_relay

            opts = RelayOptions(pairs=pairs, window=window, size=size, text=charset, duration=duration,
                                both=direction == "both", repeat=repeat, warmup=warmup, baseline=baseline,
                                workers=workers, pin=pin,
                                host=host if port else None, port=port, server_pid=server_pid,
                                baseline_script=baseline_script, baseline_port=baseline_port,
                                baseline_pid=baseline_pid, ping_interval=ping_interval, protocol=protocol,
                                cluster=cluster_nodes or 0, against=against, rate=rate)
            result = run_relay(opts, progress)
            text = report.relay_text
    except (BenchError, RuntimeError) as exc:
        raise click.ClickException(str(exc))
    click.echo(report.to_json(result) if as_json else text(result))
    if save:
        with open(save, "w") as f:
            f.write(report.to_json(result) + "\n")
    if not result["correct"]:
        click.echo("selchat bench: INCORRECT results (see above)", err=True)
        sys.exit(2)


if __name__ == "__main__":
    bench()
