#!/usr/bin/env python3
"""Rates between two ``bench/servercount`` snapshots: each count a second,
and per relayed block.

    python3 bench/servercount/rates.py /tmp/servercount.PID.1 /tmp/servercount.PID.2
"""

import json
import sys


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    a, b = (json.load(open(path)) for path in sys.argv[1:])
    seconds = b["monotonic"] - a["monotonic"]
    delta = {k: v - a["counts"].get(k, 0) for k, v in b["counts"].items()}
    blocks = delta.get("Server.relay", 0)
    print(f"over {seconds:.1f} s:")
    for key in sorted(delta, key=lambda k: -delta[k]):
        if delta[key]:
            per_block = f"{delta[key] / blocks:8.3f} per block" if blocks else ""
            print(f"  {key:<36} {delta[key] / seconds:10,.0f}/s {per_block}")


if __name__ == "__main__":
    main()
