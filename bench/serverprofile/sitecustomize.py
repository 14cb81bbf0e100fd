"""Profile every ``selchat serve`` started with this directory on
``PYTHONPATH`` (cProfile, from start to exit), so that the servers of one
bench run, version 1 and version 2 taking turns, are profiled under the same
conditions on the machine. ``bench/profile_compare.py`` puts two of them side
by side, per relayed block.

    PYTHONPATH=$PWD/bench/serverprofile selchat bench --pin --pairs 1000 --window 32 \\
        --rate 200000 --protocol both --repeat 3 --no-baseline
    python3 bench/profile_compare.py /tmp/serverprofile.V1PID /tmp/serverprofile.V2PID

The servers' pids are on the bench's "servers up" line. Profiles go to
``$SERVERPROFILE_DIR/serverprofile.<pid>`` (default /tmp) when the server
exits (the bench stops it with SIGTERM, which exits cleanly). cProfile makes
a server about 30% slower, and more so where it makes many small calls; use
it for counts and for comparing two servers profiled alike, not for absolute
costs (two servers of one commit, so profiled, differed by 5% in busy time). (On this machine sampling profilers saw only ``select`` at 1000
pairs: docs/performance.md.)
"""

import os
import sys

if "serve" in sys.argv:
    import atexit
    import cProfile

    _profile = cProfile.Profile()
    _profile.enable()

    def _dump() -> None:
        _profile.disable()
        directory = os.environ.get("SERVERPROFILE_DIR", "/tmp")
        _profile.dump_stats(os.path.join(directory, f"serverprofile.{os.getpid()}"))

    atexit.register(_dump)
