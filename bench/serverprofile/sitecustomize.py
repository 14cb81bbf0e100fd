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
costs (two servers of one commit, so profiled, differed by 5% in busy time).
(On this machine sampling profilers saw only ``select`` at 1000 pairs:
docs/performance.md.)

A whole-life profile also holds the set-up, the warm-ups and the drains
between timed windows. With ``SERVERPROFILE_WINDOW=1`` the server profiles
only between two ``SIGRTMIN+3`` signals, and writes the profile at the
second: a window of steady state from a server started by hand
(docs/performance.md, "Two load-generator processes").

    PYTHONPATH=$PWD/bench/serverprofile SERVERPROFILE_WINDOW=1 selchat serve --port 7301 ... &
    selchat bench --port 7301 --server-pid PID --protocol 2 --workers 2 --duration 14 ...
    kill -s RTMIN+3 PID; sleep 5; kill -s RTMIN+3 PID    # once set up and warmed
"""

import os
import sys

if "serve" in sys.argv:
    import atexit
    import cProfile
    import signal

    _profile = cProfile.Profile()

    def _dump() -> None:
        _profile.disable()
        directory = os.environ.get("SERVERPROFILE_DIR", "/tmp")
        _profile.dump_stats(os.path.join(directory, f"serverprofile.{os.getpid()}"))

    if os.environ.get("SERVERPROFILE_WINDOW"):
        _signals = [0]

        def _window(signum, frame) -> None:
            _signals[0] += 1
            if _signals[0] == 1:
                _profile.enable()
            elif _signals[0] == 2:
                _dump()

        signal.signal(signal.SIGRTMIN + 3, _window)
    else:
        _profile.enable()
        atexit.register(_dump)
