"""Numbers from samples: percentiles, one run's figures, medians over runs.

Everything here happens after a timed window, never inside one.
"""

from __future__ import annotations

import math
import statistics
from array import array

#: A side using at least this share of the CPU it has is called saturated.
SATURATED = 0.90

#: The figures of a run that are medians over repeats (counts are summed instead).
MEDIAN_KEYS = ("msgs_per_s", "cpu_us_per_msg", "server_user_us_per_msg", "server_sys_us_per_msg",
               "generator_us_per_msg", "msgs_per_read", "redis_us_per_msg", "total_us_per_msg",
               "redis_cpu_pct", "busiest_cpu_pct", "redis_rss_mib",
               "p50_us", "p99_us", "p999_us", "max_us", "server_cpu_pct", "generator_cpu_pct",
               "other_cpu_pct", "rss_mib", "peak_rss_mib")
SUM_KEYS = ("sent", "received", "lost", "reordered", "gaps", "problems", "unconfirmed")


def percentile(ordered, p: float):
    """Nearest-rank percentile of an already sorted sequence (None if empty)."""
    if not ordered:
        return None
    rank = max(1, math.ceil(p * len(ordered) / 100.0 - 1e-9))  # 99.9% of 1000 is 999, not 1000
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(samples_ns, unit: float = 1e3) -> dict:
    """p50/p99/p99.9/max of latencies in ns, in µs (``unit=1e3``) or ms (``1e6``)."""
    ordered = sorted(samples_ns)
    suffix = "us" if unit == 1e3 else "ms"

    def scaled(value):
        return None if value is None else round(value / unit, 1 if unit == 1e3 else 2)

    return {f"p50_{suffix}": scaled(percentile(ordered, 50)), f"p99_{suffix}": scaled(percentile(ordered, 99)),
            f"p999_{suffix}": scaled(percentile(ordered, 99.9)),
            f"max_{suffix}": scaled(ordered[-1] if ordered else None), "samples": len(ordered)}


def merge_latencies(chunks: list[bytes]) -> array:
    lat = array("q")
    for chunk in chunks:
        lat.frombytes(chunk)
    return lat


def run_figures(workers: list[dict], server: dict, gen_capacity: float) -> dict:
    """One timed window's figures from the workers' reports and the server's
    CPU (``server``: user/sys seconds, RSS) measured around it.

    The first worker also read how busy the whole machine was in the window:
    what neither the server nor the generator used of that was other load.
    ``gen_capacity``: CPUs the generator may use.

    A cluster's ``server`` is the sum over its nodes, with ``busiest`` (the
    CPU seconds of its busiest node, for saturation) and ``redis_user``,
    ``redis_sys``, ``redis_rss_kib`` (its Redis, reported apart and counted
    in ``total_us_per_msg``; ``capacity``: the CPUs they were pinned to); for
    one server ``total_us_per_msg`` is its own CPU per message."""
    other_busy = workers[0]["machine_busy"]
    t0 = min(w["t0_ns"] for w in workers)
    wall = max(w["last_rx_ns"] for w in workers) - t0
    wall = max(wall, 1) / 1e9
    received = sum(w["received"] for w in workers)
    gen_cpu = sum(w["gen_user"] + w["gen_sys"] for w in workers)
    server_cpu = server["user"] + server["sys"]
    redis = server.get("redis_user", 0.0) + server.get("redis_sys", 0.0) if "redis_user" in server else None
    per_msg = 1e6 / received if received else float("nan")
    figures = {
        "seconds": round(wall, 3),
        "msgs_per_s": round(received / wall),
        "cpu_us_per_msg": round(server_cpu * per_msg, 3),
        "server_user_us_per_msg": round(server["user"] * per_msg, 3),
        "server_sys_us_per_msg": round(server["sys"] * per_msg, 3),
        "generator_us_per_msg": round(gen_cpu * per_msg, 3),
        "redis_us_per_msg": None if redis is None else round(redis * per_msg, 3),
        "total_us_per_msg": round((server_cpu + (redis or 0.0)) * per_msg, 3),
        # Messages per read of a receiving socket: how much each relay's costs per read are shared by.
        "msgs_per_read": round(received / reads, 2) if (reads := sum(w.get("rx_reads", 0) for w in workers))
        else None,
        "server_cpu_pct": round(100 * server_cpu / wall, 1),
        "generator_cpu_pct": round(100 * gen_cpu / wall, 1),
        "redis_cpu_pct": None if redis is None else round(100 * redis / wall, 1),
        "busiest_cpu_pct": round(100 * server.get("busiest", server_cpu) / wall, 1),
        "other_cpu_pct": round(max(0.0, 100 * (other_busy - server_cpu - (redis or 0.0) - gen_cpu) / wall), 1),
        "rss_mib": round(server.get("rss_kib", 0) / 1024, 1),
        "peak_rss_mib": round(server.get("peak_kib", 0) / 1024, 1),
        "redis_rss_mib": round(server["redis_rss_kib"] / 1024, 1) if "redis_rss_kib" in server else None,
        "sent": sum(w["sent"] for w in workers),
        "received": received,
        "lost": sum(w["lost"] for w in workers),
        "reordered": sum(w["reordered"] for w in workers),
        "gaps": sum(w["gaps"] for w in workers),
        "problems": sum(w["problems"] for w in workers),
        "unconfirmed": sum(w.get("unconfirmed", 0) for w in workers),  # version 2: no DELIVERED
        "problem_samples": [p for w in workers for p in w["problem_samples"]][:5],
    }
    figures.update(latency_summary(merge_latencies([w["lat"] for w in workers])))
    # One server: its one thread. A cluster: its busiest node or its Redis,
    # or all of them together when they were pinned to ``capacity`` CPUs.
    busy = max(server.get("busiest", server_cpu), redis or 0.0)
    if server.get("capacity"):
        busy = max(busy, (server_cpu + (redis or 0.0)) / server["capacity"])
    figures["saturated"] = saturation(busy / wall, gen_cpu / wall, gen_capacity)
    return figures


def saturation(server_cores: float, generator_cores: float, generator_capacity: float) -> str:
    """Which side ran out of CPU: "server" (its one thread ~ one core busy),
    "generator" (its workers used what they may), "both", or "neither"
    (the run was bound by latency: wake-ups, not CPU)."""
    server = server_cores >= SATURATED
    generator = generator_cores >= SATURATED * generator_capacity
    if server and generator:
        return "both"
    return "server" if server else "generator" if generator else "neither"


def median_summary(runs: list[dict]) -> dict:
    """Medians of the per-run figures (counts summed, verdict by majority)."""
    summary = {}
    for key in MEDIAN_KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        summary[key] = round(statistics.median(values), 3) if values else None
    for key in SUM_KEYS:
        summary[key] = sum(r.get(key, 0) for r in runs)
    verdicts = [r["saturated"] for r in runs]
    summary["saturated"] = max(set(verdicts), key=verdicts.count) if verdicts else None
    summary["runs"] = len(runs)
    return summary


def ratio(a, b):
    """a / b, or None when either is missing or b is zero."""
    if a is None or b in (None, 0):
        return None
    return round(a / b, 3)
