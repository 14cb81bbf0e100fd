#!/usr/bin/env python3
"""Where a process's CPU went, by system call: user code or inside which call.

Reads ``perf script -F pid,ip,sym`` output (samples with call chains, from
``perf record -g``) on stdin, and prints for each pid asked for the share of
its samples spent outside any system call ("user": Python, libpython, libc)
and inside each system call, named by the ``__x64_sys_*`` frame of the chain.
docs/performance.md ("Where the time goes at one in flight") uses it:

    selchat bench --pin --pairs 100 --window 1 --repeat 2 --duration 8 &  # note the two pids it prints
    perf record -F 2000 -C 0 -g -o perf.data -- sleep 40                   # CPU 0: where --pin puts servers
    perf script -i perf.data -F pid,ip,sym | python3 bench/perf_syscalls.py PID PID
"""

from __future__ import annotations

import collections
import sys


def shares(lines, pids: set[str]) -> dict[str, collections.Counter]:
    """Per pid: samples by the outermost system call on their stack ("user": none)."""
    out: dict[str, collections.Counter] = {pid: collections.Counter() for pid in pids}
    pid, stack = None, []

    def done() -> None:
        if pid in out and stack:
            calls = [frame for frame in stack if frame.startswith("__x64_sys_")]
            out[pid][calls[-1][len("__x64_sys_"):] if calls else "user"] += 1

    for line in lines:
        if not line.strip():  # a blank line ends a sample
            done()
            pid, stack = None, []
        elif not line[0].isspace():  # a sample's first line: "PID"
            pid = line.split()[0]
        else:  # a frame: "ADDRESS SYMBOL"
            parts = line.split()
            if len(parts) >= 2:
                stack.append(parts[1])
    done()
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for pid, counts in shares(sys.stdin, set(argv)).items():
        total = sum(counts.values())
        print(f"pid {pid}: {total} samples")
        for name, n in counts.most_common(8):
            print(f"  {name:16} {100 * n / max(total, 1):5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
