"""Text reports for people (the ``--json`` output is the result dict itself)."""

from __future__ import annotations

import json
import textwrap

#: Every line of a report fits in this many columns.
WIDTH = 100


def wrap(text: str, indent: str = "") -> str:
    """Prose (a heading, a warning, a failure) folded to ``WIDTH`` columns."""
    return "\n".join(textwrap.wrap(text, WIDTH, subsequent_indent=indent, break_on_hyphens=False,
                                    break_long_words=True))


def table(rows: list[list], header: list[str] | None = None, right_from: int = 1) -> str:
    """Columns aligned; every column from ``right_from`` on is right-aligned."""
    cells = [[_cell(c) for c in row] for row in ([header] if header else []) + rows]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(max(map(len, cells)))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i >= right_from else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def _x(value) -> str | None:
    return None if value is None else f"{value:.2f}x"


# -- relay ----------------------------------------------------------------------------

RELAY_ROWS = [
    ("relayed msgs/s", "msgs_per_s"),
    ("server CPU us/msg", "cpu_us_per_msg"),
    ("  of it user", "server_user_us_per_msg"),
    ("  of it system", "server_sys_us_per_msg"),
    ("latency p50 us", "p50_us"),
    ("latency p99 us", "p99_us"),
    ("latency p99.9 us", "p999_us"),
    ("latency max us", "max_us"),
    ("server RSS MiB", "rss_mib"),
    ("server CPU %", "server_cpu_pct"),
    ("generator CPU %", "generator_cpu_pct"),
    ("generator CPU us/msg", "generator_us_per_msg"),
    ("msgs per receiver read", "msgs_per_read"),
    ("redis CPU us/msg", "redis_us_per_msg"),
    ("nodes + redis us/msg", "total_us_per_msg"),
    ("busiest node CPU %", "busiest_cpu_pct"),
    ("redis CPU %", "redis_cpu_pct"),
    ("redis RSS MiB", "redis_rss_mib"),
    ("other load %", "other_cpu_pct"),
    ("saturated", "saturated"),
    ("messages sent", "sent"),
    ("lost", "lost"),
    ("reordered", "reordered"),
    ("unexpected frames", "problems"),
]


#: Rows only a cluster fills: shown only when a cluster ran.
CLUSTER_ROWS = ("redis_us_per_msg", "total_us_per_msg", "busiest_cpu_pct", "redis_cpu_pct", "redis_rss_mib")

#: The systems of a relay result, in report order.
SYSTEMS = ("selchat", "selchat_v2", "against", "cluster", "baseline")
#: Ratio columns: (header, result key); only those the result has are shown.
RATIO_COLUMNS = (("ratio", "ratios"), ("v2/base", "ratios_v2"), ("v2/v1", "v2_over_v1"),
                 ("cluster/one node", "cluster_over_one"), ("this/against", "over_against"),
                 ("v2/against", "v2_over_against"))


def system_name(kind: str, result: dict) -> str:
    """How a system is shown: "selchat v1" beside "selchat v2"; "one node"
    beside a cluster; else its kind."""
    if result.get("against") and kind in ("selchat", "selchat_v2"):
        if not (result.get("selchat") and result.get("selchat_v2")):
            return "this"
        return "this v2" if kind == "selchat_v2" else "this v1"
    if result.get("cluster") and kind in ("selchat", "selchat_v2"):
        return "one node"
    if kind == "selchat_v2":
        return "selchat v2"
    if kind == "selchat" and result.get("selchat_v2"):
        return "selchat v1"
    return kind


def ratio_columns(result: dict) -> list[tuple[str, dict]]:
    cols = [(title, result[key]) for title, key in RATIO_COLUMNS if result.get(key)]
    if result.get("cluster"):  # one node (either version) over the baseline
        cols = [("node/base" if title in ("ratio", "v2/base") else title, r) for title, r in cols]
    elif len(cols) > 1 and cols[0][0] == "ratio":
        both = result.get("selchat_v2")
        cols[0] = ("this/base" if result.get("against") and not both else "v1/base", cols[0][1])
    if result.get("v2_over_against"):  # both versions: this/against is version 1's
        cols = [("v1/against" if title == "this/against" else title, r) for title, r in cols]
    return cols


def relay_text(result: dict) -> str:
    opts = result["options"]
    systems = [kind for kind in SYSTEMS if result.get(kind)]
    cols = ratio_columns(result)
    warm = f", after a {opts['warmup']:g} s warm-up" if opts.get("warmup") else ", no warm-up"
    head = wrap(f"relay: {result['label']}; {opts['repeat']} x {opts['duration']:g} s per server{warm}, "
                f"medians; " + placement(result))
    header = [""] + [system_name(kind, result) for kind in systems] + [title for title, _ in cols]
    rows = []
    cluster = result.get("cluster")
    for title, key in RELAY_ROWS:
        if key in CLUSTER_ROWS and not cluster:
            continue
        row = [title] + [result[kind]["summary"].get(key) for kind in systems]
        row += [_x(r.get(key)) for _, r in cols]
        rows.append(row)
    v2 = [kind for kind in systems if kind == "selchat_v2"
           or (kind == "cluster" and result["options"].get("protocol") == "2")]
    if v2:
        rows.append(["not confirmed (v2)"] + [result[kind]["summary"].get("unconfirmed") if kind in v2
                                              else None for kind in systems] + [None] * len(cols))
    lines = [head, table(rows, header)]
    if cluster:
        lines.append(wrap(f"cluster: {result['cluster_nodes']} selchat nodes on one redis-server, each pair's "
                          f"users on different nodes (every message goes through Redis); its server figures are "
                          f"summed over the nodes (busiest node: the one that used the most CPU), "
                          f"redis-server's are apart; nodes + redis: the two together."))
    warning = noise_warning([result])
    if warning:
        lines.append(warning)
    lines.append(correct_line(result))
    return "\n".join(lines)


#: Other processes using more than this share of a core make a run suspect.
NOISY_PCT = 10.0


def noise_warning(relay_results: list[dict]) -> str | None:
    """A warning when other processes took CPU during the timed windows."""
    worst = max((run["other_cpu_pct"] for r in relay_results for kind in SYSTEMS
                 if r.get(kind) for run in r[kind]["runs"]), default=0.0)
    if worst <= NOISY_PCT:
        return None
    return wrap(f"warning: other processes used up to {worst:.0f}% of a core during the timed windows; the "
                f"figures (above all latency and msgs/s) are perturbed. Rerun on a quiet machine; ratios from "
                f"interleaved runs suffer least.")


def placement(result: dict) -> str:
    workers = result["workers"]
    plural = "es" if workers > 1 else ""
    if result.get("cluster_nodes") and result.get("server_cpus"):
        cpus = ",".join(map(str, result["server_cpus"]))
        where = (f"pinned to CPU {','.join(map(str, result['cluster_cpus']))} too (sharing it)"
                 if result.get("cluster_cpus") else "unpinned")
        alone = "one node and the baseline" if result.get("baseline") else "one node"
        return (f"{alone} pinned to CPU {cpus}; the cluster's {result['cluster_nodes']} nodes and its "
                f"redis-server {where}; load generator ({workers} process{plural}) pinned to CPU "
                f"{','.join(map(str, result['generator_cpus']))}")
    if result.get("server_cpus"):
        return (f"server pinned to CPU {','.join(map(str, result['server_cpus']))}, "
                f"load generator ({workers} process{plural}) to CPU {','.join(map(str, result['generator_cpus']))}")
    return f"unpinned, load generator {workers} process{plural}"


def correct_line(result: dict) -> str:
    if result["correct"]:
        if result.get("selchat_v2"):
            return "correct: yes (nothing lost or reordered, v2: all DELIVERED, no odd frames, no server errors)"
        return "correct: yes (nothing lost, nothing reordered, no unexpected frames, no server errors)"
    return "correct: NO\n" + "\n".join(_fit("  " + f) for f in result["failures"][:12])


def _fit(line: str) -> str:
    """One line cut to ``WIDTH`` columns (a server's log line can be any length)."""
    return line if len(line) <= WIDTH else line[:WIDTH - 3] + "..."


# -- idle and login storm -------------------------------------------------------------

def idle_text(r: dict) -> str:
    rows = [
        ["users (sockets)", f"{r['users']:,} ({r['sockets']:,})"],
        ["connect + log in all", f"{r['connect_seconds']:.1f} s ({r['logins_per_s']:,.0f} users/s)"],
        ["held with heartbeats", f"{r['hold_seconds']:.1f} s at --ping-interval {r['ping_interval']:g} "
                                 f"({r['heartbeat_rounds']:.2f} rounds)"],
        ["server RSS", f"{r['rss_mib']:.1f} MiB (empty {r['rss_mib_empty']:.1f} MiB; "
                       f"{r['rss_kib_per_user']:.1f} KiB per user)"],
        ["server CPU while holding", f"{r['hold_cpu_seconds']:.2f} s ({r['hold_cpu_pct']:.2f}% of a core)"],
        ["CPU per heartbeat round", f"{r['cpu_ms_per_round']:.1f} ms"],
        ["heartbeat CPU at default", f"{r['heartbeat_core_pct_at_default']:.3f}% of a core "
                                     f"(ping interval {r['default_ping_interval']:g} s)"],
        ["spurious drops", r["drops"]],
    ]
    lines = [wrap(f"idle: {r['users']:,} logged-in users; " + placement(r)), table(rows, right_from=9)]
    lines.append(correct_line(r))
    return "\n".join(lines)


def storm_text(r: dict) -> str:
    chat = r["chat"]
    rows = [
        ["logins (real scrypt)", f"{r['logins']:,} at most {r['concurrency']} at a time"],
        ["took", f"{r['seconds']:.1f} s = {r['logins_per_s']:.1f} logins/s"],
        ["one login, connect to READY", f"p50 {r['login_ms']['p50_ms']} ms, p99 {r['login_ms']['p99_ms']} ms, "
                                        f"max {r['login_ms']['max_ms']} ms"],
        ["chatting pair before storm", _lat_ms(chat["quiet"])],
        ["chatting pair during storm", _lat_ms(chat["storm"])],
        ["chat messages lost / reordered", f"{chat['lost']} / {chat['reordered']}"],
    ]
    lines = [wrap(f"login storm: {r['logins']:,} logins while one pair chats at {r['rate']:g} msgs/s each way; "
                  + placement(r)), table(rows, right_from=9)]
    lines.append(correct_line(r))
    return "\n".join(lines)


def _lat_ms(lat: dict) -> str:
    if not lat.get("samples"):
        return "no samples"
    return (f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms "
            f"({lat['samples']:,} messages)")


# -- the matrix ---------------------------------------------------------------------

#: The matrix's relay table: units in a legend, not in every header.
MATRIX_LEGEND = ("pairs x N: N messages in flight per sender; us/msg: server CPU per relayed message (us);\n"
                 "p50 to max: one-way latency (ms); MiB: server RSS; other%: other processes' CPU (% of a core)")
#: Added when a row ran protocol version 2 beside version 1.
V2_LEGEND = ("selchat v1/v2: users speaking protocol version 1/2 (v2 users batch their ACKs as the\n"
             "selchat client does); v1/base, v2/base, v2/v1: ratios of the medians")

#: Added when a row was paced (--rate).
PACED_LEGEND = ("@Nk/s: the row above once more, both versions offered the same N thousand msgs/s (each flow\n"
                "sends its window once per period), so v2/v1 compares the servers at one load")


def _ms(us):
    return None if us is None else us / 1000


def matrix_text(m: dict) -> str:
    machine = m["machine"]
    lines = [wrap(f"selchat bench, {m['matrix']} matrix: {m['date']}, commit {m['commit']}; "
                  f"{machine['nproc']} x {machine['cpu_model']}, Linux {machine['kernel']}, "
                  f"Python {machine['python']}")]
    header = ["pairs x N", "system", "msgs/s", "us/msg", "p50", "p99", "p99.9", "max", "MiB", "saturated",
              "other%"]
    rows = []
    for row in m["relay"]:
        opts = row["options"]
        name = f"{opts['pairs']} x {opts['window']}"
        if opts.get("rate"):
            name += f" @{opts['rate'] / 1000:,.0f}k/s"  # paced (--rate)
        for kind in SYSTEMS:
            if not row.get(kind):
                continue
            s = row[kind]["summary"]
            rows.append([name, system_name(kind, row), s["msgs_per_s"], s["cpu_us_per_msg"],
                         _ms(s["p50_us"]), _ms(s["p99_us"]), _ms(s["p999_us"]), _ms(s["max_us"]), s["rss_mib"],
                         s["saturated"], s["other_cpu_pct"]])
            name = ""
        for title, r in ratio_columns(row):
            rows.append(["", title, _x(r["msgs_per_s"]), _x(r["cpu_us_per_msg"]), _x(r["p50_us"]),
                         _x(r["p99_us"]), _x(r["p999_us"]), _x(r["max_us"]), _x(r["rss_mib"]), "", ""])
    first = m["relay"][0]["options"] if m["relay"] else None
    if first:
        warm = f"after a {first['warmup']:g} s warm-up" if first.get("warmup") else "no warm-up"
        lines += ["", wrap(f"relay: {first['size']} B messages, "
                           f"{'both directions' if first['both'] else 'one direction'}; {first['repeat']} x "
                           f"{first['duration']:g} s per server, {warm}, medians")]
    lines += [table(rows, header, right_from=2), MATRIX_LEGEND]
    if any(row.get("selchat_v2") for row in m["relay"]):
        lines.append(V2_LEGEND)
    if any(row["options"].get("rate") for row in m["relay"]):
        lines.append(PACED_LEGEND)
    warning = noise_warning(m["relay"])
    if warning:
        lines.append(warning)
    if m.get("idle"):
        lines += ["", idle_text(m["idle"])]
    if m.get("storm"):
        lines += ["", storm_text(m["storm"])]
    lines += ["", targets_text(m["targets"])]
    bad = [row["label"] for row in m["relay"] if not row["correct"]]
    bad += [k for k in ("idle", "storm") if m.get(k) and not m[k]["correct"]]
    lines.append("correctness: " + ("all runs correct" if not bad else "FAILED in " + "; ".join(bad)))
    return "\n".join(lines)


def targets_text(targets: list[dict]) -> str:
    rows = [[t["target"], t["limit"], t["shown"], "ok" if t["ok"] else ("n/a" if t["ok"] is None else "MISSED")]
            for t in targets]
    return "targets\n" + table(rows, ["target", "limit", "measured", ""], right_from=1)


def to_json(result: dict) -> str:
    return json.dumps(result, indent=2, sort_keys=False)
