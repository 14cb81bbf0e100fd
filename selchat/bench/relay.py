"""The relay benchmark: chatting pairs against selchat and the baseline, in one run.

1. Start the servers: selchat (spawned with every user pre-registered, or
   one already running; with ``protocol="both"`` a second one whose users
   speak protocol version 2, kind ``selchat_v2``) and the asyncio baseline; with ``pin``, both on the
   first CPU and the load generator on the others. With ``cluster=N``, also
   a cluster (kind ``cluster``): ``redis-server`` and N ``selchat serve
   --cluster`` nodes sharing one accounts database, each pair's two users on
   different nodes, measured beside the one-node selchat. With
   ``against=TREE``, also the selchat of another source tree (kind
   ``against``: a worktree of an older commit, say), its users speaking the
   same version (version 1 with ``protocol="both"``, so that version 2 can be
   measured against an older version 1), so that a change is measured side
   by side with the code before it.
2. Start the worker processes; each sets up its share of the pairs on every
   server (login, attach, chat request and accept) before any clock starts.
3. Warm every server up the same way, unrecorded (``warm_up``), then run
   ``repeat`` timed windows per server, interleaved (selchat, baseline,
   baseline, selchat, ...; with version 2: selchat, selchat_v2, baseline,
   baseline, selchat_v2, selchat, ...) so that noise on the machine hits all
   alike.
4. Each window: read the server's CPU, start every worker at one instant,
   keep ``window`` messages in flight per flow for ``duration`` seconds, wait
   for the last one, read the server's CPU again. Report medians.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from selchat.bench import servers as srv
from selchat.bench import stats, sysinfo
from selchat.bench.progress import Progress, RateMeter
from selchat.bench.vusers import sources_for
from selchat.bench.workers import WorkerPool, relay_worker

PASSWORD = "bench-password"
START_DELAY = 0.2  # seconds between "run" and its start: every worker has the command by then

#: Bytes one flow per worker keeps in flight during the first half of the
#: warm-up. A fresh process is not in its steady state: glibc's malloc serves
#: a block of 128 KiB or more with mmap (and a shrink with mremap, a free with
#: munmap) until it has freed one such block that was bigger, and only then
#: raises that threshold for good. asyncio asks for 256 KiB on every read, so
#: the baseline paid three extra system calls per read for as long as its reads
#: stayed small, which at a steady 32 in flight is forever. A long-running
#: server sees a burst sooner or later; the warm-up gives every server one
#: (reads as large as its buffer), then the measured traffic itself.
WARMUP_BURST_BYTES = 1 << 20

#: The selchat systems a relay run can drive, and the protocol version each one's users speak
#: (a cluster's users speak the version --protocol names: ``kind_version``).
SELCHAT_KINDS = {"selchat": 1, "selchat_v2": 2, "against": 1, "cluster": 1}
#: Every system, in the order of a run (and of the report).
KINDS = ("selchat", "selchat_v2", "against", "cluster", "baseline")
#: --protocol: which selchat systems run.
PROTOCOLS = {"1": ("selchat",), "2": ("selchat_v2",), "both": ("selchat", "selchat_v2")}


def display_name(kind: str, result: dict | None = None) -> str:
    """"selchat v2" for selchat_v2; "selchat v1" for selchat beside it."""
    if kind in ("cluster", "against"):
        return kind
    if kind == "selchat_v2":
        return "selchat v2"
    if kind == "selchat" and result is not None and result.get("selchat_v2"):
        return "selchat v1"
    return kind


@dataclass
class RelayOptions:
    pairs: int = 100
    window: int = 32
    size: int = 64
    text: str = "ascii"               # the messages' text: "ascii" or "utf8" (flows.filler)
    duration: float = 5.0
    both: bool = True
    repeat: int = 3
    warmup: float = 1.0
    baseline: bool = True
    workers: int | None = None
    pin: bool = False
    host: str | None = None          # a running selchat instead of spawning one
    port: int | None = None
    server_pid: int | None = None
    baseline_script: str | None = None
    baseline_port: int | None = None  # a running baseline instead of spawning one
    baseline_pid: int | None = None
    ping_interval: float | None = None
    sources: int = 4                  # loopback source addresses to spread sockets over
    protocol: str = "1"               # selchat protocol version: "1", "2" or "both" (side by side)
    cluster: int = 0                  # N >= 2: also a cluster of N nodes on one Redis, beside one node
    against: str | None = None        # also the selchat of this source tree, beside this one
    rate: float = 0.0                 # offered messages per second per server (0: as fast as the window allows)

    def label(self) -> str:
        protocol = {"1": "", "2": ", protocol 2", "both": ", protocols 1 and 2"}[self.protocol]
        cluster = f", a cluster of {self.cluster} nodes beside one node" if self.cluster else ""
        against = f", beside the selchat of {self.against}" if self.against else ""
        rate = f", paced at {self.rate:,.0f} msgs/s" if self.rate else ""
        text = ", UTF-8 text" if self.text == "utf8" else ""
        return (f"{self.pairs} pairs, {self.window} in flight, {self.size} B{text}, "
                f"{'both directions' if self.both else 'one direction'}{rate}{protocol}{cluster}{against}")

    def pace_ns(self) -> int:
        """``--rate``: how often each flow may top up its window, in ns (0: unpaced)."""
        if not self.rate:
            return 0
        flows = self.pairs * (2 if self.both else 1)
        return int(self.window * flows / self.rate * 1e9)


def kind_version(kind: str, opts: RelayOptions) -> int:
    """The protocol version a system's users speak."""
    if kind in ("cluster", "against"):
        return 2 if opts.protocol == "2" else 1
    return SELCHAT_KINDS.get(kind, 1)


def cluster_nodes(pair: int, nodes: int) -> tuple[int, int]:
    """The nodes of pair ``pair``'s two users: user i on node i % N, its partner
    on the next one, so every chat crosses nodes."""
    return pair % nodes, (pair + 1) % nodes


def default_workers(gen_cpus: list[int] | None) -> int:
    """One worker per CPU the generator has (pinned), else per CPU but the server's."""
    if gen_cpus:
        return len(gen_cpus)
    return max(1, len(sysinfo.usable_cpus()) - 1)


#: With more than one message in flight, a relay run's load generator is at
#: least this many processes, even on one CPU: one Python process driving
#: 6,000 sockets at 280,000 msgs/s runs at 70-98% of its CPU and slows the
#: server it measures, version 1 by a fifth. At one in flight, where latency
#: is measured, processes that share a CPU wait for each other's time slices
#: (p50 2.47x the baseline's with two, 1.47x with one): one per CPU there.
#: docs/performance.md, "Two load-generator processes".
RELAY_MIN_WORKERS = 2


def relay_workers(gen_cpus: list[int] | None, window: int) -> int:
    workers = default_workers(gen_cpus)
    return max(RELAY_MIN_WORKERS, workers) if window > 1 else workers


def generator_capacity(gen_cpus: list[int] | None) -> float:
    return float(len(gen_cpus)) if gen_cpus else max(1.0, len(sysinfo.usable_cpus()) - 1.0)


def run_relay(opts: RelayOptions, progress: Progress | None = None) -> dict:
    progress = progress or Progress(False)
    server_cpus, gen_cpus = sysinfo.split_cpus(opts.pin)
    workers = min(opts.workers or relay_workers(gen_cpus, opts.window), opts.pairs)
    external = opts.host is not None
    # Fresh names for servers that outlive this run (REGISTER on a running selchat).
    tag = ("b" + secrets.token_hex(3)) if external or opts.baseline_port else "u"
    pairs = {kind: [(f"{tag}{i}{suffix}a", f"{tag}{i}{suffix}b") for i in range(opts.pairs)]
             for kind, suffix in (("selchat", ""), ("selchat_v2", "v"), ("against", "r"), ("cluster", "c"),
                                   ("baseline", ""))}
    result = {"mode": "relay", "label": opts.label(), "options": asdict(opts),
              "server_cpus": server_cpus, "generator_cpus": gen_cpus, "workers": workers}
    if opts.cluster:
        result["cluster_cpus"] = cluster_cpus(server_cpus)

    with tempfile.TemporaryDirectory(prefix="selchat-bench-") as tmp, contextlib.ExitStack() as cleanup:
        servers = _start_servers(opts, Path(tmp), pairs, server_cpus, cleanup)
        progress.note(f"relay {opts.label()}: servers up "
                      + ", ".join(f"{k} {s.describe()}" for k, s in servers.items()))
        verb = "REGISTER" if external else "LOGIN"
        per_worker = opts.pairs // workers + 1
        sockets_per_pair = sum(6 if kind in SELCHAT_KINDS else 2 for kind in servers)
        concurrency = max(8, 128 // workers)
        first = next(s for kind, s in servers.items() if kind in SELCHAT_KINDS)
        sources = sysinfo.loopback_sources(first.host,
                                           sources_for(concurrency * workers, opts.sources))
        placement = [cluster_nodes(i, opts.cluster) for i in range(opts.pairs)] if opts.cluster else None
        specs = [{
            "servers": [{"kind": kind, "protocol": "selchat" if kind in SELCHAT_KINDS else kind,
                         "version": kind_version(kind, opts), "address": s.address, "verb": verb,
                         "pairs": pairs[kind][i::workers],
                         **({"addresses": s.addresses, "nodes": placement[i::workers]} if kind == "cluster"
                            else {})}
                        for kind, s in servers.items()],
            "password": PASSWORD, "size": opts.size, "text": opts.text, "both": opts.both,
            "sources": sources,
            "cpus": gen_cpus, "nofile": per_worker * (sockets_per_pair + 2) + 256,
            "concurrency": concurrency,
        } for i in range(workers)]
        pool = WorkerPool(relay_worker, specs)
        cleanup.callback(pool.close)
        started = time.monotonic()
        setup = pool.gather(timeout=600)
        progress.note(f"set up {opts.pairs} pairs x {len(servers)} servers in {time.monotonic() - started:.1f} s "
                      f"({workers} worker process{'es' if workers > 1 else ''})")
        capacity = generator_capacity(gen_cpus)
        kinds = list(servers)
        warmups: dict[str, dict | None] = {kind: None for kind in kinds}
        runs: dict[str, list] = {kind: [] for kind in kinds}
        for step, kind, r in schedule(kinds, opts.repeat, opts.warmup > 0):
            if step == "warm-up":
                warmups[kind] = warm_up(pool, servers[kind], kind, opts, capacity, progress)
                continue
            figures = _window(pool, servers[kind], kind, opts, opts.duration, capacity, progress,
                              f"run {r + 1}/{opts.repeat}")
            runs[kind].append(figures)
            progress.note(f"  {display_name(kind):10} run {r + 1}/{opts.repeat}: "
                          f"{figures['msgs_per_s']:>9,} msgs/s  "
                          f"{_num(figures['cpu_us_per_msg'], '.2f'):>6} us CPU/msg  "
                          f"p50 {figures['p50_us']:,.0f} p99 {figures['p99_us']:,.0f} us  "
                          f"CPU: server {_num(figures['server_cpu_pct'], '.0f')}% "
                          f"generator {figures['generator_cpu_pct']:.0f}% other {figures['other_cpu_pct']:.0f}%")
        for kind in kinds:
            result[kind] = {
                "summary": stats.median_summary(runs[kind]),
                "runs": runs[kind],
                "warmup": warmups[kind],
                "setup_seconds": round(max(s["setup_seconds"][kind] for s in setup), 2),
                "server_log_problems": servers[kind].problems()[:10],
            }
    for kind in KINDS:
        result.setdefault(kind, None)
    result["ratios"] = _ratios(result, "selchat", "baseline")       # selchat (v1) / baseline
    result["ratios_v2"] = _ratios(result, "selchat_v2", "baseline")  # selchat v2 / baseline
    result["v2_over_v1"] = _ratios(result, "selchat_v2", "selchat")  # protocol 2 / protocol 1
    one = "selchat_v2" if opts.protocol == "2" else "selchat"
    result["cluster_over_one"] = _ratios(result, "cluster", one, CLUSTER_RATIO_KEYS)  # cluster / one node
    result["over_against"] = _ratios(result, one, "against")  # this tree / the other one
    result["v2_over_against"] = _ratios(result, "selchat_v2", "against") if opts.protocol == "both" else None
    result["cluster_nodes"] = opts.cluster or None
    result["failures"] = correctness_failures(result)
    result["correct"] = not result["failures"]
    return result


def _ratios(result: dict, kind: str, other: str, keys: tuple = None) -> dict | None:
    if not result.get(kind) or not result.get(other):
        return None
    return ratios(result[kind]["summary"], result[other]["summary"], keys or RATIO_KEYS)


def _start_servers(opts: RelayOptions, tmp: Path, pairs: dict, server_cpus, cleanup) -> dict:
    """One selchat per protocol version asked for (spawned: each its own
    process, database and users; running: the same one, users of different
    names), then the baseline."""
    servers = {}
    external = None
    for kind in PROTOCOLS[opts.protocol]:
        users = [name for pair in pairs[kind] for name in pair]
        nofile = len(users) * 3 + 1024
        if opts.host is not None:
            if external is None:
                external = srv.external_selchat(opts.host, opts.port, opts.server_pid)
                if server_cpus and external.pid:
                    sysinfo.pin_process(external.pid, server_cpus)
            servers[kind] = external
        else:
            workdir = tmp / kind
            workdir.mkdir()
            servers[kind] = srv.spawn_selchat(workdir, users, PASSWORD, cpus=server_cpus, nofile=nofile,
                                              ping_interval=opts.ping_interval)
            cleanup.callback(servers[kind].stop)
    if opts.against:
        users = [name for pair in pairs["against"] for name in pair]
        workdir = tmp / "against"
        workdir.mkdir()
        servers["against"] = srv.spawn_selchat(workdir, users, PASSWORD, cpus=server_cpus,
                                               nofile=len(users) * 3 + 1024, ping_interval=opts.ping_interval,
                                               tree=opts.against)
        cleanup.callback(servers["against"].stop)
    if opts.cluster:
        users = [name for pair in pairs["cluster"] for name in pair]
        workdir = tmp / "cluster"
        workdir.mkdir()
        servers["cluster"] = srv.spawn_cluster(workdir, opts.cluster, users, PASSWORD,
                                               ping_interval=opts.ping_interval, cpus=cluster_cpus(server_cpus),
                                               redis_cpus=cluster_cpus(server_cpus), nofile=len(users) * 3 + 1024)
        cleanup.callback(servers["cluster"].stop)
    nofile = opts.pairs * 6 + 1024
    if opts.baseline and opts.baseline_port:
        servers["baseline"] = srv.external_server("baseline", "127.0.0.1", opts.baseline_port, opts.baseline_pid)
        if server_cpus and servers["baseline"].pid:
            sysinfo.pin_process(servers["baseline"].pid, server_cpus)
    elif opts.baseline:
        servers["baseline"] = srv.spawn_baseline(tmp, opts.baseline_script, cpus=server_cpus, nofile=nofile)
        cleanup.callback(servers["baseline"].stop)
    return servers


def cluster_cpus(server_cpus):
    """Where a cluster's nodes and its Redis run with ``--pin``: on the one
    node's CPU as well, so that both systems get the same CPU and the load
    generator keeps its own; unpinned without ``--pin``."""
    return server_cpus


def schedule(kinds: list[str], repeat: int, warm: bool = True):
    """The order of a run: ("warm-up", kind, None) for every server before
    anything is measured, then ("run", kind, r) for each repeat r, the servers
    taking turns forwards and backwards (a, b, b, a, a, b, ...)."""
    if warm:
        for kind in kinds:
            yield "warm-up", kind, None
    for r in range(repeat):
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            yield "run", kind, r


def warm_up(pool: WorkerPool, server, kind: str, opts: RelayOptions, capacity: float,
            progress: Progress) -> dict:
    """Bring ``server`` to its steady state before it is measured, the same way
    for every server: ``opts.warmup`` seconds of the measured traffic, during
    the first half of which one flow per worker keeps ``WARMUP_BURST_BYTES`` in
    flight (see there). Nothing of it is recorded but what it relayed and
    whether it was correct."""
    burst = math.ceil(WARMUP_BURST_BYTES / opts.size)
    halves = [_window(pool, server, kind, opts, opts.warmup / 2, capacity, progress, "warm-up", burst=b)
              for b in (burst, 0)]
    return {"seconds": opts.warmup, "burst_messages": burst,
            **{key: sum(h[key] for h in halves)
               for key in ("sent", "received", "reordered", "gaps", "problems", "unconfirmed")},
            "problem_samples": [p for h in halves for p in h["problem_samples"]][:5]}


def _window(pool: WorkerPool, server, kind: str, opts: RelayOptions, duration: float, capacity: float,
            progress: Progress, label: str, burst: int = 0) -> dict:
    """One timed window on ``server``; its figures."""
    start_ns = time.monotonic_ns() + int(START_DELAY * 1e9)
    pool.broadcast("run", {"kind": kind, "window": opts.window, "duration": duration, "start_ns": start_ns,
                           "burst": burst, "pace_ns": 0 if burst else opts.pace_ns()})
    before = server.cpu_sample() if server.pid else None  # the server is idle until start_ns
    meter = RateMeter(progress, f"{kind} {label}", pool.progress, duration + START_DELAY)
    reports = pool.gather(timeout=duration + 120, tick=meter)
    after = server.cpu_sample() if server.pid else None  # idle again: everything arrived
    memory = server.memory_kib()
    measured = {"user": 0.0, "sys": 0.0, "rss_kib": memory.get("rss", 0), "peak_kib": memory.get("peak", 0)}
    if before is not None:
        measured.update(user=after["user"] - before["user"], sys=after["sys"] - before["sys"],
                        busiest=max(a - b for a, b in zip(after["each"], before["each"])))
        if after["redis"] is not None:  # a cluster: its Redis, apart
            measured.update(redis_user=after["redis"][0] - before["redis"][0],
                            redis_sys=after["redis"][1] - before["redis"][1],
                            redis_rss_kib=memory.get("redis_rss", 0),
                            capacity=len(server.cpus) if getattr(server, "cpus", None) else None)
    figures = stats.run_figures(reports, measured, capacity)
    if not server.pid:
        for key in ("cpu_us_per_msg", "server_user_us_per_msg", "server_sys_us_per_msg", "server_cpu_pct",
                    "total_us_per_msg", "rss_mib", "peak_rss_mib"):
            figures[key] = None
    return figures


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


RATIO_KEYS = ("msgs_per_s", "cpu_us_per_msg", "p50_us", "p99_us", "p999_us", "max_us", "rss_mib")
#: cluster / one node also compares the CPU per message with Redis's included.
CLUSTER_RATIO_KEYS = RATIO_KEYS + ("total_us_per_msg",)


def ratios(selchat: dict, baseline: dict, keys: tuple = RATIO_KEYS) -> dict:
    """selchat / baseline for each figure (above 1: selchat costs more, or relays more per second)."""
    return {key: stats.ratio(selchat.get(key), baseline.get(key)) for key in keys}


def correctness_failures(result: dict) -> list[str]:
    """What went wrong, if anything: loss, reordering, unexpected frames,
    messages never reported delivered (version 2), server errors."""
    failures = []
    for kind in KINDS:
        part = result.get(kind)
        if not part:
            continue
        s = part["summary"]
        for key in ("lost", "reordered", "gaps", "problems", "unconfirmed"):
            if s.get(key):
                failures.append(f"{kind}: {s[key]} {key}")
        if s["received"] != s["sent"]:
            failures.append(f"{kind}: sent {s['sent']} but received {s['received']}")
        warm = part.get("warmup")
        if warm:
            for key in ("reordered", "gaps", "problems", "unconfirmed"):
                if warm.get(key):
                    failures.append(f"{kind} warm-up: {warm[key]} {key}")
        samples = [p for run in part["runs"] for p in run["problem_samples"]]
        samples += warm["problem_samples"] if warm else []
        failures += [f"{kind}: {p}" for p in samples[:3]]
        failures += [f"{kind} server log: {line}" for line in part["server_log_problems"][:3]]
    return failures
