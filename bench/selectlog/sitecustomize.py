"""Log every ``select()`` of every Python process started with this directory
on ``PYTHONPATH``: when it returned, how long it waited and how many sockets
were ready. For seeing bursts (many sockets ready at once) in the server and
the load generator side by side; ``bench/select_bursts.py`` reads the logs.

    PYTHONPATH=$PWD/bench/selectlog selchat bench --pin --pairs 1000 --window 32 --protocol 2 --rate 200000
    python3 bench/select_bursts.py /tmp/selectlog.*        # each process's log

Records go to ``$SELECTLOG_DIR/selectlog.<pid>`` (default /tmp) as float64
triples (monotonic return time, seconds waited, sockets ready), appended
about once a second, so processes that end with ``os._exit`` keep theirs.
The clock is CLOCK_MONOTONIC, the same in every process of the machine.
"""

import atexit
import os
import selectors
import time
from array import array

_DIR = os.environ.get("SELECTLOG_DIR", "/tmp")
_records = array("d")
_flushed = [time.monotonic()]
_select = selectors.EpollSelector.select


def _flush() -> None:
    if _records:
        with open(os.path.join(_DIR, f"selectlog.{os.getpid()}"), "ab") as f:
            _records.tofile(f)
        del _records[:]
    _flushed[0] = time.monotonic()


def _logged_select(self, timeout=None):
    start = time.monotonic()
    ready = _select(self, timeout)
    end = time.monotonic()
    _records.extend((end, end - start, len(ready)))
    if end - _flushed[0] > 1.0:
        _flush()
    return ready


selectors.EpollSelector.select = _logged_select
atexit.register(_flush)
