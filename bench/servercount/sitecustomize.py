"""Count a few of the server's calls in every ``selchat serve`` started with
this directory on ``PYTHONPATH``, and write the counts (JSON) each time the
server gets signal SIGRTMIN+3: two such snapshots some seconds apart give
what the server does a second (docs/performance.md, "No RECEIVED while fates
come"), with no profiler's overhead beyond one wrapper per counted call.

    PYTHONPATH=$PWD/bench/servercount selchat serve --port 7301 --db /tmp/c.db --scrypt-n 16 ... &
    selchat bench --port 7301 --protocol 2 --pairs 1000 --window 32 --rate 280000 --duration 16 ...
    kill -s RTMIN+3 PID; sleep 5; kill -s RTMIN+3 PID
    python3 bench/servercount/rates.py /tmp/servercount.PID.*

Snapshots go to ``$SERVERCOUNT_DIR/servercount.<pid>.<n>`` (default /tmp).
Counted: relayed blocks and messages, ACKs handled, events delivered (by
type), frames sent on a socket (by type), outbox records and entries, the
RECEIVED timer's runs, selects.
"""

import os
import sys

if "serve" in sys.argv:
    import collections
    import json
    import selectors
    import signal

    from selchat.server import app, outbox, peer, registry, session

    counts = collections.Counter()
    snapshots = [0]

    def _wrap(cls, name, by_type_of=None):
        original = getattr(cls, name)
        key = f"{cls.__name__}.{name}"

        def counted(*args, **kwargs):
            counts[key] += 1
            if by_type_of is not None:
                counts[f"{key}:{type(args[by_type_of]).__name__}"] += 1
            return original(*args, **kwargs)

        setattr(cls, name, counted)

    def _relay(server, peer_, session_, block, count, _original=app.Server.relay):
        counts["Server.relay"] += 1
        counts["messages relayed"] += count
        return _original(server, peer_, session_, block, count)

    app.Server.relay = _relay
    _wrap(registry.Registry, "acknowledge")
    _wrap(session.Session, "deliver", by_type_of=1)
    _wrap(peer.Peer, "send", by_type_of=1)
    _wrap(peer.Peer, "say_received")
    _wrap(outbox.Outbox, "record")
    _wrap(outbox.Entry, "__init__")
    _wrap(selectors.EpollSelector, "select")

    def _snapshot(signum, frame):
        import time

        snapshots[0] += 1
        path = os.path.join(os.environ.get("SERVERCOUNT_DIR", "/tmp"),
                            f"servercount.{os.getpid()}.{snapshots[0]}")
        with open(path, "w") as f:
            json.dump({"monotonic": time.monotonic(), "counts": dict(counts)}, f)

    signal.signal(signal.SIGRTMIN + 3, _snapshot)
