"""``selchat bench``: the instrument must count right. Correctness only, never speed.

The smoke runs drive real servers for a second or two; the unit tests feed
the receive path crafted bytes to show it notices loss, reordering and
foreign frames.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import selchat
from selchat.bench import BenchError, flows, matrix, relay, report, servers, sysinfo
from selchat.bench.command import bench
from selchat.bench.flows import ACK_DELAY_NS, MIN_SIZE, Fleet, Flow, V2ChatConn, V2LoginConn, filler
from selchat.bench.stats import latency_summary, percentile
from selchat.bench.vusers import Setup, VUser
from selchat.protocol.events import ACK_DELAY, ACK_EVERY, ack_rest
from tests.support import RawUser, ServerProcess, start_chat

# The bench loads both cores (and pins to them): run alone, after the rest (make test).
pytestmark = pytest.mark.serial

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
ACK_REST_NS = int(ack_rest(ACK_DELAY, 0.5) * 1e9)  # the rest after a timed ACK, undrawn (the middle of its range)

SUMMARY_KEYS = {"msgs_per_s", "cpu_us_per_msg", "server_user_us_per_msg", "server_sys_us_per_msg", "p50_us",
                "p99_us", "p999_us", "max_us", "server_cpu_pct", "generator_cpu_pct", "generator_us_per_msg", "other_cpu_pct", "rss_mib",
                "peak_rss_mib", "sent", "received", "lost", "reordered", "gaps", "problems", "saturated", "runs",
                "unconfirmed", "msgs_per_read"}


def run_bench(*args: str) -> dict:
    result = CliRunner().invoke(bench, [*args, "--json", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_relay_correct(summary: dict, measured_server: bool = True) -> None:
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["sent"] > 0 and summary["received"] == summary["sent"]
    assert summary["lost"] == summary["reordered"] == summary["gaps"] == summary["problems"] == 0
    assert summary["unconfirmed"] == 0 and summary["msgs_per_read"] >= 1
    assert 0 < summary["p50_us"] <= summary["p99_us"] <= summary["p999_us"] <= summary["max_us"]
    assert summary["msgs_per_s"] > 0
    if measured_server:
        assert summary["cpu_us_per_msg"] > 0 and summary["rss_mib"] > 0


# -- smoke runs against real servers ----------------------------------------------------

@pytest.fixture(scope="module")
def relay_result():
    return run_bench("--pairs", "3", "--duration", "1", "--repeat", "1", "--warmup", "0.4", "--workers", "2")


@pytest.fixture(scope="module")
def v2_result():
    """Protocol version 2 beside version 1 (and the baseline), interleaved."""
    return run_bench("--pairs", "2", "--duration", "0.5", "--repeat", "1", "--warmup", "0.4", "--workers", "1",
                     "--protocol", "both")


@pytest.fixture(scope="module")
def paced_result():
    """v2_result's row once more, both versions paced at one rate (--rate)."""
    return run_bench("--pairs", "2", "--duration", "1", "--repeat", "1", "--warmup", "0", "--workers", "1",
                     "--protocol", "both", "--rate", "4000", "--no-baseline")


@pytest.fixture(scope="module")
def idle_result():
    return run_bench("--idle", "20", "--ping-interval", "0.5")


@pytest.fixture(scope="module")
def storm_result():
    return run_bench("--login-storm", "6", "--storm-concurrency", "3")


def test_relay_against_selchat_and_baseline(relay_result):
    result = relay_result
    assert result["mode"] == "relay" and result["correct"] and result["failures"] == []
    for kind in ("selchat", "baseline"):
        assert_relay_correct(result[kind]["summary"])
        assert len(result[kind]["runs"]) == 1
        assert result[kind]["warmup"]["received"] > 0
    assert set(result["ratios"]) == {"msgs_per_s", "cpu_us_per_msg", "p50_us", "p99_us", "p999_us", "max_us",
                                     "rss_mib"}
    assert all(value > 0 for value in result["ratios"].values())
    text = report.relay_text(result)
    assert "baseline" in text and "correct: yes" in text


def test_relay_protocol_2_beside_protocol_1(v2_result):
    """Version 2 users ACK what they read; every message arrives once, in
    order, and is reported DELIVERED to its sender (else "unconfirmed")."""
    result = v2_result
    assert result["correct"], result["failures"]
    for kind in ("selchat", "selchat_v2", "baseline"):
        assert_relay_correct(result[kind]["summary"])
        assert result[kind]["warmup"]["received"] == result[kind]["warmup"]["sent"] > 0
    assert result["selchat_v2"]["warmup"]["unconfirmed"] == 0
    for key in ("ratios", "ratios_v2", "v2_over_v1"):
        assert set(result[key]) == set(relay.RATIO_KEYS) and all(v > 0 for v in result[key].values())
    text = report.relay_text(result)
    assert "selchat v1" in text and "selchat v2" in text and "v2/v1" in text and "correct: yes" in text


def test_relay_protocol_2_alone_one_direction_one_in_flight():
    """The sender's login socket gets only receipts, the receiver's only messages."""
    result = run_bench("--pairs", "2", "--window", "1", "--direction", "one", "--duration", "0.4", "--repeat", "1",
                       "--warmup", "0.2", "--no-baseline", "--protocol", "2")
    assert result["correct"], result["failures"]
    assert result["selchat"] is None and result["baseline"] is None
    assert result["ratios"] is None and result["v2_over_v1"] is None
    assert_relay_correct(result["selchat_v2"]["summary"])
    assert "selchat v2" in report.relay_text(result)
    # One in flight: one generator process per generator CPU (latency is the measure).
    assert result["workers"] == min(2, relay.default_workers(result["generator_cpus"]))


def test_more_than_one_in_flight_is_driven_by_at_least_two_generator_processes():
    """One process near its CPU's limit slows the server it measures
    (docs/performance.md, "Two load-generator processes")."""
    result = run_bench("--pairs", "2", "--duration", "0.3", "--repeat", "1", "--warmup", "0", "--no-baseline",
                       "--protocol", "1")
    assert result["correct"], result["failures"]
    assert result["workers"] == 2  # at least two, and at most one per pair
    assert "load generator 2 processes" in " ".join(report.relay_text(result).replace("(", "").split())


@pytest.mark.skipif(servers.redis_binary() is None,
                    reason="--cluster needs redis-server, which is not installed (apt-get install redis-server)")
@pytest.mark.parametrize("protocol", ["1", "2"])
def test_relay_across_a_cluster_beside_one_node(protocol):
    """--cluster 2: each pair's users on different nodes of a cluster on one
    Redis, interleaved with one node; nothing lost or reordered either way,
    the nodes' CPU summed and Redis's apart, and the cluster columns shown."""
    result = run_bench("--cluster", "2", "--pairs", "2", "--duration", "0.4", "--repeat", "1", "--warmup", "0.2",
                       "--workers", "1", "--no-baseline", "--protocol", protocol)
    assert result["correct"], result["failures"]
    one = "selchat" if protocol == "1" else "selchat_v2"
    assert result["cluster_nodes"] == 2 and result["baseline"] is None
    assert_relay_correct(result[one]["summary"])
    cluster = result["cluster"]["summary"]
    assert_relay_correct(cluster)
    assert cluster["redis_us_per_msg"] > 0 and cluster["redis_rss_mib"] > 0
    assert cluster["total_us_per_msg"] == pytest.approx(cluster["cpu_us_per_msg"] + cluster["redis_us_per_msg"],
                                                        abs=0.01)
    assert result[one]["summary"]["redis_us_per_msg"] is None
    assert result["cluster"]["warmup"]["received"] == result["cluster"]["warmup"]["sent"] > 0
    assert set(result["cluster_over_one"]) == set(relay.CLUSTER_RATIO_KEYS)
    assert all(v > 0 for v in result["cluster_over_one"].values())
    text = report.relay_text(result)
    assert "correct: yes" in text
    for column in ("one node", "cluster", "cluster/one node", "redis CPU us/msg", "nodes + redis us/msg"):
        assert column in text
    assert_fits(text.splitlines())


def test_cluster_takes_one_protocol_and_spawns_its_servers():
    for args in (["--protocol", "both"], ["--port", "7117"], ["--idle", "5"]):
        result = CliRunner().invoke(bench, ["--cluster", "2", *args])
        assert result.exit_code == 2, result.output
        assert "--cluster" in result.output


def test_against_runs_the_selchat_of_another_tree_beside_this_one(tmp_path):
    """--against TREE: a second selchat, spawned from TREE's package (a copy
    of this one here), interleaved, with the ratio this/against."""
    tree = tmp_path / "tree"
    shutil.copytree(Path(selchat.__file__).parent, tree / "selchat",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = servers.tree_env(str(tree))
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tree.resolve())
    result = run_bench("--against", str(tree), "--protocol", "2", "--pairs", "2", "--window", "1",
                       "--duration", "0.4", "--repeat", "1", "--warmup", "0.2", "--no-baseline")
    assert result["correct"], result["failures"]
    for kind in ("selchat_v2", "against"):
        assert_relay_correct(result[kind]["summary"])
    assert result["selchat"] is None and result["baseline"] is None
    assert result["options"]["against"] == str(tree)
    assert set(result["over_against"]) == set(relay.RATIO_KEYS) and result["v2_over_against"] is None
    text = report.relay_text(result)
    assert "this/against" in text and "correct: yes" in text
    assert_fits(text.splitlines())


def test_against_passes_only_the_options_the_other_tree_has_and_makes_its_accounts_with_its_store(tmp_path):
    """An older tree's serve lacks newer options (--registrations-per-hour
    before 0.6.0) and its store may not open a newer schema: the flags and
    the accounts database come from that tree's own code."""
    tree = tmp_path / "tree"
    shutil.copytree(Path(selchat.__file__).parent, tree / "selchat",
                    ignore=shutil.ignore_patterns("__pycache__"))
    cli_py = tree / "selchat" / "cli.py"
    text = cli_py.read_text()
    start = text.index('@_setting("registrations_per_hour"')
    cli_py.write_text(text[:start] + text[text.index("@_setting(", start + 1):])
    assert "--registrations-per-hour" in servers.limit_flags()
    assert "--registrations-per-hour" not in servers.limit_flags(str(tree))
    store_py = tree / "selchat" / "store" / "accounts.py"
    store_py.write_text(store_py.read_text() + '\n_now_iso = lambda: "made by the tree"  # noqa\n')
    db = tmp_path / "bench.db"
    servers.prepare_accounts(db, ["a1", "a2"], "pw", 16, str(tree))
    conn = sqlite3.connect(str(db))
    try:
        assert conn.execute("SELECT created FROM users WHERE name = 'a1'").fetchone() == ("made by the tree",)
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (2,)
    finally:
        conn.close()


def test_against_with_both_versions_measures_version_2_over_the_other_trees_version_1(tmp_path):
    """--protocol both --against TREE: TREE's users speak version 1, so
    v2/against is this tree's version 2 over TREE's version 1 (what \"within
    10% of the relay cost of the day\" asks, with TREE a worktree of that day)."""
    tree = tmp_path / "tree"
    shutil.copytree(Path(selchat.__file__).parent, tree / "selchat",
                    ignore=shutil.ignore_patterns("__pycache__"))
    result = run_bench("--against", str(tree), "--protocol", "both", "--pairs", "2", "--window", "1",
                       "--duration", "0.4", "--repeat", "1", "--warmup", "0.2", "--no-baseline")
    assert result["correct"], result["failures"]
    for kind in ("selchat", "selchat_v2", "against"):
        assert_relay_correct(result[kind]["summary"])
    assert result["selchat_v2"]["summary"]["unconfirmed"] == 0
    for key in ("over_against", "v2_over_against", "v2_over_v1"):
        assert set(result[key]) == set(relay.RATIO_KEYS)
    text = report.relay_text(result)
    for column in ("this v1", "this v2", "against", "v1/against", "v2/against", "v2/v1"):
        assert column in text
    assert_fits(text.splitlines())


def test_against_refuses_a_tree_without_selchat_and_the_modes_it_cannot_join(tmp_path):
    with pytest.raises(BenchError, match="no selchat package"):
        servers.tree_env(str(tmp_path))
    for args in (["--cluster", "2"], ["--idle", "5"], ["--port", "7117"]):
        result = CliRunner().invoke(bench, ["--against", str(tmp_path), *args])
        assert result.exit_code == 2 and "--against" in result.output, result.output


def test_relay_one_direction_one_in_flight_no_baseline():
    result = run_bench("--pairs", "2", "--window", "1", "--direction", "one", "--size", str(MIN_SIZE),
                       "--duration", "0.5", "--repeat", "2", "--warmup", "0.2", "--no-baseline")
    assert result["correct"] and result["baseline"] is None and result["ratios"] is None
    assert_relay_correct(result["selchat"]["summary"])
    assert result["selchat"]["summary"]["runs"] == 2
    assert result["selchat"]["warmup"]["received"] > 0


def test_utf8_text_is_relayed_whole_by_both_servers():
    """--text utf8: messages of é's reach their receivers in order, through
    selchat and the baseline alike (what the fast path for UTF-8 is measured with)."""
    assert filler(9, "utf8") == "xéééé".encode() and filler(10, "utf8") == "xééééx".encode()
    result = run_bench("--pairs", "2", "--window", "8", "--text", "utf8", "--duration", "0.5", "--repeat", "1",
                       "--warmup", "0.2")
    assert result["correct"] and "UTF-8 text" in result["label"]
    for kind in ("selchat", "baseline"):
        assert_relay_correct(result[kind]["summary"])


def test_every_server_is_warmed_up_with_a_burst_before_it_is_measured(monkeypatch):
    """Each server gets its warm-up (a burst, then the measured shape) before
    its first timed window, and the burst really had that much in flight."""
    events = []
    real_warm_up, real_window = relay.warm_up, relay._window

    def warm_up(pool, server, kind, *args, **kwargs):
        events.append(("warm-up", kind))
        return real_warm_up(pool, server, kind, *args, **kwargs)

    def window(pool, server, kind, opts, duration, capacity, progress, label, burst=0):
        events.append((label, kind, burst))
        return real_window(pool, server, kind, opts, duration, capacity, progress, label, burst)

    monkeypatch.setattr(relay, "warm_up", warm_up)
    monkeypatch.setattr(relay, "_window", window)
    result = relay.run_relay(relay.RelayOptions(pairs=2, duration=0.3, repeat=2, warmup=0.4, workers=1))
    assert result["correct"], result["failures"]
    for kind in ("selchat", "baseline"):
        mine = [e for e in events if e[1] == kind]
        first_run = next(i for i, e in enumerate(mine) if e[0].startswith("run"))
        before = mine[:first_run]
        assert before[0] == ("warm-up", kind)
        assert any(e[0] == "warm-up" and e[2] > 0 for e in before[1:]), before  # the burst
        assert all(e[0] == "warm-up" for e in before)  # nothing measured before it
        warm = result[kind]["warmup"]
        assert warm["received"] == warm["sent"] >= warm["burst_messages"] > 0
        assert len(result[kind]["runs"]) == 2


def test_no_warm_up_when_asked_for_none():
    result = run_bench("--pairs", "1", "--duration", "0.3", "--repeat", "1", "--warmup", "0", "--no-baseline")
    assert result["correct"] and result["selchat"]["warmup"] is None


def test_relay_against_a_running_server_registers_its_users(tmp_path):
    """A server started by someone else, with its default flood limits: the
    bench registers fresh users and, throttled or not, loses nothing."""
    server = ServerProcess(tmp_path)
    try:
        result = run_bench("--port", str(server.port), "--pairs", "2", "--duration", "0.5", "--repeat", "1",
                           "--warmup", "0", "--no-baseline")
    finally:
        server.stop()
    assert result["correct"]
    # Throttled to the default 50 msgs/s, the server may use less CPU than one
    # clock tick (10 ms) in the window, so its CPU per message can read 0.
    assert_relay_correct(result["selchat"]["summary"], measured_server=False)
    assert result["selchat"]["summary"]["rss_mib"] > 0


def test_idle_users_are_held_without_drops(idle_result):
    result = idle_result
    assert result["mode"] == "idle" and result["correct"]
    assert result["drops"] == 0 and result["sockets"] == 60
    assert result["heartbeat_rounds"] >= 2
    assert result["rss_mib"] > 0 and result["connect_seconds"] > 0
    assert "spurious drops" in report.idle_text(result)


def test_login_storm_with_real_hashing(storm_result):
    result = storm_result
    assert result["mode"] == "storm" and result["correct"]
    assert result["logins_per_s"] > 0
    chat = result["chat"]
    assert chat["lost"] == 0 and chat["reordered"] == 0 and chat["storm"]["samples"] > 0
    assert "logins/s" in report.storm_text(result)


def test_logins_refused_as_busy_are_sent_again(tmp_path):
    """More logins at once from one address than the server queues password
    checks for: the ones it answers "busy" are retried, and all get in."""
    server = ServerProcess(tmp_path, "--conn-rate", "1e9", "--max-per-address", "0")
    try:
        users = [VUser(f"busy{i}") for i in range(48)]
        setup = Setup("selchat", (server.host, server.port), password="pw-for-busy", verb="REGISTER",
                      concurrency=48)
        setup.run(users, timeout=60)
        setup.release()
    finally:
        for user in users:
            user.close()
        server.stop()
    assert all(u.t_ready for u in users)
    assert setup.busy > 0  # the case under test happened


def report_lines(texts: list[str]) -> list[str]:
    return [line for text in texts for line in text.splitlines()]


def assert_fits(lines: list[str]) -> None:
    too_wide = [line for line in lines if len(line) > 100]
    assert not too_wide, "\n".join(too_wide)
    assert not [line for line in lines if "issue" in line.lower()]


def test_every_report_line_fits_in_100_columns(relay_result, v2_result, paced_result, idle_result,
                                               storm_result):
    """The text reports of real runs (these, a matrix made of them, and the
    committed standard matrices), a failure included."""
    m = {"mode": "matrix", "matrix": "quick", "date": "2026-01-01", "commit": sysinfo.git_commit(),
         "machine": sysinfo.machine(), "pin": False, "relay": [relay_result, v2_result, paced_result],
         "idle": idle_result, "storm": storm_result, "correct": True}
    m["targets"] = matrix.targets(m)
    v2_targets = [t for t in m["targets"] if "protocol 2 over 1" in t["target"]]
    # The unpaced ratio is shown, the paced twin's is the target.
    assert [t["ok"] is None for t in v2_targets] == [True, False]
    assert v2_targets[1]["target"].endswith("@4k/s") and v2_targets[1]["limit"] == "<= 1.1x"
    texts = [report.relay_text(relay_result), report.relay_text(v2_result), report.idle_text(idle_result),
             report.storm_text(storm_result), report.matrix_text(m)]
    for path in sorted(RESULTS.glob("*.json")):
        saved = json.loads(path.read_text())
        saved["targets"] = matrix.targets(saved)  # as this version names them
        texts.append(report.matrix_text(saved))
    broken = json.loads(json.dumps(relay_result))
    broken["correct"] = False
    broken["failures"] = ["selchat server log: " + "x" * 300, "baseline: 12 lost"]
    texts.append(report.relay_text(broken))
    lines = report_lines(texts)
    assert "baseline" in report.matrix_text(m) and "targets" in report.matrix_text(m)
    assert "selchat v2" in report.matrix_text(m) and "v2/v1" in report.matrix_text(m)
    assert len(lines) > 60
    assert_fits(lines)


def test_a_paced_row_runs_at_a_share_of_the_slower_versions_rate():
    row = {"selchat": {"summary": {"msgs_per_s": 712_345.0}}, "selchat_v2": {"summary": {"msgs_per_s": 598_765.0}}}
    assert matrix.paced_rate(row) == 300_000.0  # half of 598,765, in tens of thousands
    row["selchat_v2"]["summary"]["msgs_per_s"] = 900.0
    assert matrix.paced_rate(row) == 10_000.0


def test_help_names_no_issue():
    result = CliRunner().invoke(bench, ["--help"])
    assert result.exit_code == 0 and "issue" not in result.output.lower()


def test_rate_is_for_relay_runs_only():
    result = CliRunner().invoke(bench, ["--idle", "10", "--rate", "1000"])
    assert result.exit_code == 2 and "--rate" in result.output, result.output


def test_modes_are_exclusive():
    result = CliRunner().invoke(bench, ["--idle", "5", "--login-storm", "5"])
    assert result.exit_code == 2 and "choose one" in result.output


def test_perf_syscalls_puts_each_sample_under_its_outermost_system_call():
    """bench/perf_syscalls.py (docs/performance.md): samples of the pids
    asked for, by the outermost __x64_sys_ frame of their stack, else "user"."""
    spec = importlib.util.spec_from_file_location("perf_syscalls", RESULTS.parent / "perf_syscalls.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    script = """\
100
\tffffffff81000001 tcp_sendmsg
\tffffffff81000002 __x64_sys_sendto
\tffffffff81000003 do_syscall_64
\t7f0000000001 sock_send

100
\t7f0000000002 _PyEval_EvalFrameDefault

200
\tffffffff81000004 tcp_recvmsg
\tffffffff81000005 __x64_sys_recvfrom

100
\tffffffff81000006 tcp_recvmsg
\tffffffff81000007 __x64_sys_recvfrom
"""
    shares = module.shares(script.splitlines(True), {"100"})
    assert shares == {"100": {"sendto": 1, "user": 1, "recvfrom": 1}}


def test_select_log_records_every_select_and_bursts_lists_the_big_ones(tmp_path):
    """bench/selectlog (docs/performance.md): a process with it on PYTHONPATH
    logs each select(); bench/select_bursts.py finds the ones with many ready."""
    program = """\
import selectors, socket
selector = selectors.DefaultSelector()
pairs = [socket.socketpair() for _ in range(3)]
for a, b in pairs:
    b.send(b"x")
    selector.register(a, selectors.EVENT_READ)
for _ in range(1200):
    assert len(selector.select(0)) == 3
"""
    env = dict(os.environ, PYTHONPATH=str(RESULTS.parent / "selectlog"), SELECTLOG_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", program], env=env, check=True, timeout=60)
    logs = sorted(tmp_path.glob("selectlog.*"))
    assert len(logs) == 1
    out = subprocess.run([sys.executable, str(RESULTS.parent / "select_bursts.py"), "--burst", "2",
                          "--seconds", "60", str(logs[0])], capture_output=True, text=True, check=True).stdout
    assert "1200 selects, sockets ready per select median 3, p99 3, max 3" in out, out
    assert out.count(": 3 ready after waiting") == 1200, out


def relay_one_at_a_time(alice: RawUser, bob: RawUser, count: int) -> None:
    """``count`` messages from alice to bob, each read by bob before the
    next is sent: one relayed block each."""
    for i in range(count):
        alice.chat.send(f"MSG {i}")
        assert bob.login.line() == f"MSG {alice.name} {i}"


def wait_for_file(path: Path, what: str) -> Path:
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.02)  # polling interval; the condition ends the wait
    return path


def test_serverprofile_profiles_a_server_and_profile_compare_reads_it(tmp_path, monkeypatch):
    """bench/serverprofile (docs/performance.md): a ``selchat serve`` with it
    on PYTHONPATH leaves a cProfile of itself when it stops;
    bench/profile_compare.py puts two side by side, per relayed block."""
    monkeypatch.setenv("PYTHONPATH", str(RESULTS.parent / "serverprofile"))
    monkeypatch.setenv("SERVERPROFILE_DIR", str(tmp_path))
    srv = ServerProcess(tmp_path)
    try:
        alice, bob = RawUser(srv), RawUser(srv)
        start_chat(alice, bob)
        relay_one_at_a_time(alice, bob, 5)
    finally:
        assert srv.stop() == 0
    [profile] = tmp_path.glob("serverprofile.*")
    out = subprocess.run([sys.executable, str(RESULTS.parent / "profile_compare.py"), str(profile), str(profile)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert "per relayed block (5 in a, 5 in b)" in out, out
    assert "busy: " in out and "(1.00x); calls" in out, out  # a profile against itself


def test_serverprofile_window_profiles_only_between_two_signals(tmp_path, monkeypatch):
    """bench/serverprofile with SERVERPROFILE_WINDOW=1: the profile holds
    only what the server did between the first and the second SIGRTMIN+3,
    and is written at the second."""
    import signal

    monkeypatch.setenv("PYTHONPATH", str(RESULTS.parent / "serverprofile"))
    monkeypatch.setenv("SERVERPROFILE_DIR", str(tmp_path))
    monkeypatch.setenv("SERVERPROFILE_WINDOW", "1")
    srv = ServerProcess(tmp_path)
    try:
        alice, bob = RawUser(srv), RawUser(srv)
        start_chat(alice, bob)
        relay_one_at_a_time(alice, bob, 2)  # before the window
        srv.proc.send_signal(signal.SIGRTMIN + 3)
        relay_one_at_a_time(alice, bob, 3)  # in it: the signal is handled before the next read
        srv.proc.send_signal(signal.SIGRTMIN + 3)
        profile = wait_for_file(tmp_path / f"serverprofile.{srv.proc.pid}", "profile after the second signal")
        relay_one_at_a_time(alice, bob, 4)  # after it
    finally:
        assert srv.stop() == 0
    out = subprocess.run([sys.executable, str(RESULTS.parent / "profile_compare.py"), str(profile), str(profile)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert "per relayed block (3 in a, 3 in b)" in out, out


def test_servercount_counts_a_servers_calls_between_two_snapshots(tmp_path, monkeypatch):
    """bench/servercount (docs/performance.md): a ``selchat serve`` with it on
    PYTHONPATH writes its call counts on SIGRTMIN+3; bench/servercount/rates.py
    turns two snapshots into rates."""
    import signal

    monkeypatch.setenv("PYTHONPATH", str(RESULTS.parent / "servercount"))
    monkeypatch.setenv("SERVERCOUNT_DIR", str(tmp_path))

    def snapshot(n: int) -> Path:
        srv.proc.send_signal(signal.SIGRTMIN + 3)
        return wait_for_file(tmp_path / f"servercount.{srv.proc.pid}.{n}", "snapshot")

    srv = ServerProcess(tmp_path)
    try:
        alice, bob = RawUser(srv), RawUser(srv)
        start_chat(alice, bob)
        first = snapshot(1)
        relay_one_at_a_time(alice, bob, 5)
        second = snapshot(2)
    finally:
        srv.stop()
    out = subprocess.run([sys.executable, str(RESULTS.parent / "servercount" / "rates.py"), str(first), str(second)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert lines["Server.relay"].endswith("1.000 per block"), out
    assert lines["messages"].endswith("1.000 per block"), out  # "messages relayed": one a block


# -- the receive path, fed by hand ------------------------------------------------------

class FakeTx:
    label = "tx"

    def __init__(self):
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


def make_flow(size: int = 40) -> tuple[Fleet, Flow, FakeTx]:
    fleet = Fleet("test")
    tx = FakeTx()
    return fleet, Flow(fleet, tx, b"MSG ", size), tx


def relayed(flow_tx: FakeTx, sender: bytes = b"alice") -> list[bytes]:
    """What the server would deliver for what the flow sent: MSG <sender> <text>."""
    return [b"MSG " + sender + b" " + line[4:] + b"\n" for line in flow_tx.written.split(b"\n") if line]


def test_flow_sends_the_window_with_fixed_size_numbered_frames():
    fleet, flow, tx = make_flow(size=40)
    flow.window = 5
    flow.top_up()
    lines = tx.written.split(b"\n")[:-1]
    assert len(lines) == 5 and flow.sent == 5
    assert [int(line.split()[1]) for line in lines] == [1, 2, 3, 4, 5]
    assert all(len(line) == len(b"MSG ") + 40 for line in lines)
    flow.top_up()  # window full: nothing more
    assert flow.sent == 5


def test_paced_flow_waits_for_its_slot_then_sends_its_window():
    """--rate: a flow tops up at most once per period, whatever room it has."""
    fleet, flow, tx = make_flow()
    flow.window, flow.sending = 4, True
    flow.pace = 10**9
    flow.next_ns = time.monotonic_ns() + 60 * 10**9  # its slot is a minute away
    flow.top_up()
    flow.top_up()
    assert flow.sent == 0 and tx.written == b""
    assert [entry[2] for entry in fleet.paced] == [flow]  # queued once
    slot = fleet.paced[0][0]
    fleet.send_paced(slot - 1)  # not yet
    assert flow.sent == 0 and len(fleet.paced) == 1
    flow.next_ns = time.monotonic_ns()  # (top_up reads the clock itself: bring the slot to now)
    fleet.send_paced(slot)
    assert flow.sent == 4 and len(tx.written.split(b"\n")[:-1]) == 4 and not fleet.paced
    assert flow.next_ns >= time.monotonic_ns() + 10**9 // 2  # the next slot is a period on


def test_relay_at_a_fixed_rate_offers_both_versions_no_more_than_it(paced_result):
    result = paced_result
    assert result["correct"], result["failures"]
    assert "paced at 4,000 msgs/s" in result["label"]
    for kind in ("selchat", "selchat_v2"):
        summary = result[kind]["summary"]
        assert_relay_correct(summary)
        # Unpaced, two pairs of a local server relay tens of thousands a second.
        assert 2000 <= summary["msgs_per_s"] <= 4400, (kind, summary["msgs_per_s"])


def test_flow_counts_in_order_delivery_split_anywhere():
    fleet, flow, tx = make_flow()
    flow.window = 4
    flow.top_up()
    lines = relayed(tx)
    data = b"".join(lines)
    cut = len(lines[0]) + 7  # inside the second line
    stamp = int(tx.written.split()[2])
    assert flow.receive(data[:cut], stamp + 5000) == 1
    assert flow.receive(data[cut:], stamp + 9000) == 3
    assert (flow.received, flow.late, flow.gaps) == (4, 0, 0)
    assert list(flow.lat) == [5000, 9000, 9000, 9000]
    assert not fleet.problems


def test_flow_notices_reordering_loss_and_foreign_frames():
    fleet, flow, tx = make_flow()
    flow.window = 4
    flow.top_up()
    one, two, three, four = relayed(tx)
    flow.receive(one + three + two, 10**18)  # 2 and 3 swapped
    assert flow.late == 1 and flow.gaps == 1
    flow.receive(b"ENDED alice dropped alice lost connection\n" + four, 10**18)
    assert flow.received == 4 and fleet.problem_count == 1
    assert "ENDED alice dropped" in fleet.problems[0]
    fleet2, flow2, tx2 = make_flow()
    flow2.window = 3
    flow2.top_up()
    first, _, third = relayed(tx2)
    flow2.receive(first + third, 10**18)  # 2 never comes
    assert flow2.gaps == 1 and flow2.sent - flow2.received == 1


def test_percentiles_are_nearest_rank():
    ordered = list(range(1, 1001))
    assert percentile(ordered, 50) == 500 and percentile(ordered, 99) == 990
    assert percentile(ordered, 99.9) == 999 and percentile([], 50) is None
    summary = latency_summary([3000, 1000, 2000])
    assert (summary["p50_us"], summary["max_us"], summary["samples"]) == (2.0, 3.0, 3)


def v2_login(flow: Flow | None, out: Flow | None, wire_id: int = 2):
    """A version 2 login socket over a socketpair: (conn, the server's end, ACKs written)."""
    fleet = flow.fleet if flow is not None else out.fleet
    ours, theirs = socket.socketpair()
    check = FakeTx()
    conn = V2LoginConn(ours, fleet, "bob login", flow, out, check, wire_id)
    return conn, theirs, check


def test_v2_login_socket_counts_frames_batches_acks_and_checks_receipts():
    fleet, incoming, tx = make_flow()
    fleet.version = 2
    outgoing = Flow(fleet, FakeTx(), b"MSG ", 40)
    outgoing.window = 3
    outgoing.top_up()
    outgoing.received = 3  # bob's three messages reached alice
    incoming.window = 2
    incoming.top_up()
    conn, server, check = v2_login(incoming, outgoing, wire_id=2)  # READY and STARTED came during setup
    one, two = relayed(tx)
    try:
        server.sendall(one + b"DELIVERED 1 2\n" + two[:9])
        assert conn.on_read() == 1
        assert outgoing.delivered == 2  # the piece of "two" waits
        assert check.written == b"" and conn in fleet.acks_due  # the ACK is batched, as the client's
        server.sendall(two[9:] + b"DELIVERED 3 3\n")
        assert conn.on_read() == 1
        assert outgoing.delivered == 3
        fleet.send_due_acks(fleet.acks_due[conn])  # its time comes: one ACK for both reads
        assert check.written == b"ACK 6\n" and not fleet.acks_due and conn.resting
        assert (incoming.received, incoming.late, incoming.gaps, fleet.problem_count) == (2, 0, 0, 0)
        server.sendall(b"DELIVERED 5 5\n")  # 4 skipped, and never sent
        conn.on_read()
        assert fleet.problem_count == 1 and "DELIVERED 5 5" in fleet.problems[0]
        server.sendall(b"UNDELIVERED 6 6 away bob was away\n")
        conn.on_read()
        assert fleet.problem_count == 2 and "UNDELIVERED" in fleet.problems[1]
        assert conn not in fleet.acks_due  # read while resting after the last ACK
        fleet.send_due_acks(fleet.resting[0][0])  # the rest is over: the delay starts
        assert check.written == b"ACK 6\n" and conn in fleet.acks_due
        fleet.send_due_acks(fleet.acks_due[conn])
        assert check.written.endswith(b"ACK 8\n")  # every frame counted, foreign ones too
        server.sendall(b"".join(b"DELIVERED 4 4\n" for _ in range(ACK_EVERY)))
        while conn.wire_id < 8 + ACK_EVERY:
            conn.on_read()
        assert check.written.endswith(b"ACK %d\n" % (8 + ACK_EVERY))  # ACK_EVERY waiting: at once
    finally:
        conn.sock.close()
        server.close()


def test_due_acks_go_in_due_order_and_only_when_due(monkeypatch):
    monkeypatch.setattr(flows, "rest_ns", lambda: ACK_REST_NS)  # the nominal rest, not a drawn one

    class Acker:
        def __init__(self, name):
            self.name = name
            self.wire_id = self.acked = 1
            self.resting = False

        def ack(self):
            sent.append(self.name)
            self.acked = self.wire_id

    fleet, sent = Fleet("test", version=2), []
    a, b, c = Acker("a"), Acker("b"), Acker("c")
    fleet.acks_due.update({a: 100, b: 200, c: 300})  # as V2LoginConn adds them: in due order
    fleet.send_due_acks(99)
    assert sent == []
    fleet.send_due_acks(250)
    assert sent == ["a", "b"] and list(fleet.acks_due) == [c]
    # Each rests ACK_SPACING - ACK_DELAY from its due time; a frame came for a meanwhile.
    assert [(when, conn) for when, _, conn in sorted(fleet.resting)] == [(100 + ACK_REST_NS, a), (200 + ACK_REST_NS, b)]
    assert a.resting and b.resting and not c.resting
    a.wire_id = 2
    fleet.send_due_acks(150 + ACK_REST_NS)
    assert not a.resting and fleet.acks_due == {a: 150 + ACK_REST_NS + ACK_DELAY_NS}
    assert sorted(conn.name for _, _, conn in fleet.resting) == ["b", "c"]
    assert sent == ["a", "b", "c"]
    fleet.send_due_acks(10**12)
    assert sent == ["a", "b", "c", "a"]  # b and c rested with nothing new: not due again
    assert not fleet.acks_due and not fleet.resting


def test_v2_chat_socket_takes_received_and_nothing_else():
    fleet, flow, tx = make_flow()
    flow.window = 4
    flow.top_up()
    ours, server = socket.socketpair()
    conn = V2ChatConn(ours, fleet, "alice chat", flow)
    try:
        server.sendall(b"RECEIVED 2\nRECEIVED 4\nRECEI")
        conn.on_read()
        assert flow.accepted == 4 and fleet.problem_count == 0
        server.sendall(b"VED 9\n")  # more than was sent
        conn.on_read()
        assert fleet.problem_count == 1
        server.sendall(b"NACK 5 empty empty message\n")
        conn.on_read()
        assert fleet.problem_count == 2
    finally:
        ours.close()
        server.close()


@pytest.mark.parametrize("size", [MIN_SIZE - 1, 0])
def test_flow_refuses_a_size_without_room_for_padding(size):
    with pytest.raises(ValueError):
        make_flow(size)
