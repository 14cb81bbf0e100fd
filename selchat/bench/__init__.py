"""``selchat bench``: the measuring instrument for the server (issue 3).

    command.py   the click command (modes, options, exit status)
    relay.py     pairs chatting through selchat (one node; a cluster) and the baseline, interleaved
    idle.py      N logged-in users held through two ping periods
    storm.py     logins with real hashing while one pair chats
    matrix.py    the standard matrix (make bench) and the targets of issue 3
    workers.py   load-generator processes and the pool that drives them
    vusers.py    virtual users: log in, attach, pair up (before any clock starts)
    flows.py     the measuring loop: numbered, timestamped messages in flight
    servers.py   spawning selchat (users pre-registered), the baseline, a cluster (Redis, N nodes)
    sysinfo.py   /proc: CPU, RSS, machine; pinning, descriptor limits
    stats.py     percentiles, medians, saturation
    report.py    text tables (--json prints the result itself)

The method is in docs/performance.md.
"""


class BenchError(Exception):
    """The bench cannot go on (a server did not start, setup failed, a worker died)."""
