#!/usr/bin/env python3
"""Bursts in ``select()`` logs written by ``bench/selectlog/sitecustomize.py``.

For each log named (one per process with at least ``MIN_SELECTS``), over
the last ``--seconds`` that all of them cover: how many selects, sockets
ready per select (median, p99, max), and every select that found more than
``--burst`` sockets ready, by time, so that the server's and the load
generator's bursts line up.
docs/performance.md ("Receipts spaced while a stream lasts") uses it:

    rm -f /tmp/selectlog.*
    PYTHONPATH=$PWD/bench/selectlog selchat bench --pin --pairs 1000 --window 32 --protocol 2 \\
        --rate 200000 --repeat 1 --duration 10 --no-baseline
    python3 bench/select_bursts.py /tmp/selectlog.*
"""

from __future__ import annotations

import argparse
import os
from array import array

MIN_SELECTS = 1000


def load(path: str) -> list[tuple[float, float, int]]:
    data = array("d")
    with open(path, "rb") as f:
        data.frombytes(f.read())
    return [(data[i], data[i + 1], int(data[i + 2])) for i in range(0, len(data) - 2, 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--seconds", type=float, default=5.0, help="the window: the last this many seconds")
    parser.add_argument("--burst", type=int, default=100, help="list selects with more sockets ready than this")
    args = parser.parse_args()
    logs = {}
    for path in args.logs:
        recs = load(path)
        if len(recs) < MIN_SELECTS:  # a process that waited, not one that served (the bench's parent)
            print(f"{os.path.basename(path)}: {len(recs)} selects, left out")
        else:
            logs[os.path.basename(path)] = recs
    if not logs:
        return
    end = min(recs[-1][0] for recs in logs.values())
    start = end - args.seconds
    bursts = []
    for name, recs in logs.items():
        window = [r for r in recs if start < r[0] <= end]
        if not window:
            continue
        ready = sorted(r[2] for r in window)
        n = len(ready)
        print(f"{name}: {n} selects, sockets ready per select median {ready[n // 2]}, "
              f"p99 {ready[int(n * 0.99)]}, max {ready[-1]}")
        bursts += [(r[0] - start, name, r[2], r[1]) for r in window if r[2] > args.burst]
    for at, name, ready, waited in sorted(bursts):
        print(f"  {at:8.4f} s  {name}: {ready} ready after waiting {waited * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
