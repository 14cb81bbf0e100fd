#!/usr/bin/env python3
"""Two server profiles side by side (``bench/serverprofile``), per relayed
block: each function's calls and own time per ``Server.relay`` call, and the
difference, largest first; then the busy total (everything but the time
spent waiting in ``epoll``).

    python3 bench/profile_compare.py /tmp/serverprofile.V1PID /tmp/serverprofile.V2PID [--top 40]
"""

from __future__ import annotations

import argparse
import pstats
import re

POLL = "<method 'poll' of 'select.epoll' objects>"


def per_block(path: str) -> tuple[dict[str, tuple[float, float]], int]:
    """function -> (calls, own seconds) per relayed block, and the block count."""
    stats = pstats.Stats(path).stats
    blocks = sum(v[1] for (f, _, name), v in stats.items() if name == "relay" and f.endswith("server/app.py"))
    if not blocks:
        raise SystemExit(f"{path}: no Server.relay calls (not a relaying selchat server?)")
    out: dict[str, list[float]] = {}
    for (filename, _, name), (_, calls, own, _, _) in stats.items():
        key = f"{filename.rsplit('/', 1)[-1]}:{re.sub(' at 0x[0-9a-f]+', '', name)}"
        acc = out.setdefault(key, [0.0, 0.0])
        acc[0] += calls
        acc[1] += own
    return {k: (c / blocks, t / blocks) for k, (c, t) in out.items()}, blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    (a, blocks_a), (b, blocks_b) = per_block(args.a), per_block(args.b)
    zero = (0.0, 0.0)
    print(f"per relayed block ({blocks_a:,} in a, {blocks_b:,} in b); own time in µs")
    print(f"{'b - a':>8}  {'function':<48} {'calls a':>8} {'calls b':>8} {'own a':>8} {'own b':>8}")
    keys = sorted((k for k in set(a) | set(b) if not k.endswith(POLL)),
                  key=lambda k: (-abs(b.get(k, zero)[1] - a.get(k, zero)[1]), -b.get(k, zero)[1]))
    for key in keys[: args.top]:
        (ca, ta), (cb, tb) = a.get(key, zero), b.get(key, zero)
        print(f"{(tb - ta) * 1e6:+8.2f}  {key[:48]:<48} {ca:8.3f} {cb:8.3f} {ta * 1e6:8.2f} {tb * 1e6:8.2f}")
    busy_a = sum(t for k, (_, t) in a.items() if not k.endswith(POLL))
    busy_b = sum(t for k, (_, t) in b.items() if not k.endswith(POLL))
    calls_a = sum(c for c, _ in a.values())
    calls_b = sum(c for c, _ in b.values())
    print(f"busy: {busy_a * 1e6:.1f} and {busy_b * 1e6:.1f} µs per block ({busy_b / busy_a:.2f}x); "
          f"calls {calls_a:.1f} and {calls_b:.1f} ({calls_b / calls_a:.2f}x)")


if __name__ == "__main__":
    main()
