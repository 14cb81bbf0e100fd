"""Load-generator worker processes and the pool that drives them.

Each worker is a forked process with its own selector over its share of the
virtual users. The parent talks to it over a pipe: the worker answers every
command with ``("ok", payload)`` (or ``("error", traceback)``), and between
commands keeps its sockets served (PINGs answered). A shared array of
counters, one slot per worker, feeds the progress display without any
messages during a timed window.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import time
import traceback
from array import array

from selchat.bench import sysinfo
from selchat.bench.flows import CheckConn, Conn, Fleet, Flow, RxConn, V2ChatConn, V2LoginConn
from selchat.bench import BenchError
from selchat.bench.vusers import Setup, VUser, make_pairs

_ctx = multiprocessing.get_context("fork")


class WorkerPool:
    """``target(pipe, index, progress, spec)`` in one process per spec."""

    def __init__(self, target, specs: list[dict]):
        self.progress = _ctx.RawArray("q", len(specs))
        self.pipes, self.procs = [], []
        for index, spec in enumerate(specs):
            ours, theirs = _ctx.Pipe()
            proc = _ctx.Process(target=_main, args=(target, theirs, index, self.progress, spec),
                                name=f"selchat-bench-{index}", daemon=True)
            proc.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(proc)

    def __len__(self) -> int:
        return len(self.procs)

    def broadcast(self, command: str, arg=None) -> None:
        for pipe in self.pipes:
            pipe.send((command, arg))

    def gather(self, timeout: float, tick=None) -> list:
        """One reply from every worker; ``tick()`` runs about every 0.5 s meanwhile."""
        replies: list = [None] * len(self.pipes)
        waiting = dict(zip(self.pipes, range(len(self.pipes))))
        deadline = time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{len(waiting)} load-generator worker(s) did not answer within {timeout:.0f} s")
            for pipe in multiprocessing.connection.wait(list(waiting), min(left, 0.5)):
                index = waiting.pop(pipe)
                try:
                    status, payload = pipe.recv()
                except EOFError:
                    raise BenchError(f"load-generator worker {index} died") from None
                if status == "error":
                    raise BenchError(f"load-generator worker {index} failed:\n{payload}")
                replies[index] = payload
            if tick is not None:
                tick()
        return replies

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("stop", None))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
        for pipe in self.pipes:
            pipe.close()


def _main(target, pipe, index, progress, spec) -> None:
    try:
        sysinfo.pin_self(spec.get("cpus"))
        problem = sysinfo.raise_nofile(spec.get("nofile", 1024))
        if problem:
            raise BenchError(problem)
        target(pipe, index, progress, spec)
    except BaseException:
        try:
            pipe.send(("error", traceback.format_exc()))
        except OSError:
            pass
    finally:
        pipe.close()


def _commands(pipe, serve):
    """Yield the parent's commands until "stop"; ``serve(timeout)`` meanwhile."""
    while True:
        while not pipe.poll(0):
            serve(0.1)
        command, arg = pipe.recv()
        if command == "stop":
            return
        yield command, arg


# -- relay ------------------------------------------------------------------------------

def relay_worker(pipe, index, progress, spec) -> None:
    """Set up the pairs on every server in ``spec["servers"]`` (``{"kind",
    "protocol", "version", "address", "verb", "pairs"}``; a cluster also has
    ``"addresses"``, its nodes', and ``"nodes"``, the node of each pair's two
    users), then run timed
    windows on command: ``("run", {"kind", "window", "duration", "start_ns", "burst", "pace_ns"})``."""
    fleets: dict[str, Fleet] = {}
    setup_seconds = {}
    for server in spec["servers"]:
        kind, protocol, version = server["kind"], server["protocol"], server.get("version", 1)
        started = time.monotonic()
        users = make_pairs(server["pairs"])
        if server.get("nodes"):  # a cluster: each user logs in to its own node
            addresses = [tuple(a) for a in server["addresses"]]
            for (a, b), (node_a, node_b) in zip(zip(users[0::2], users[1::2]), server["nodes"]):
                a.address, b.address = addresses[node_a], addresses[node_b]
        setup = Setup(protocol, tuple(server["address"]), password=spec["password"], verb=server["verb"],
                      sources=spec["sources"], concurrency=spec.get("concurrency", 128), version=version)
        setup.run(users, pair=True, timeout=spec.get("setup_timeout", 300))
        setup.release()
        fleets[kind] = build_fleet(protocol, users, spec["size"], spec["both"], version, spec.get("text", "ascii"))
        setup_seconds[kind] = time.monotonic() - started
    pipe.send(("ok", {"setup_seconds": setup_seconds}))

    def serve(timeout):
        for fleet in fleets.values():
            fleet.keepalive(timeout / len(fleets))

    for command, arg in _commands(pipe, serve):
        if command == "run":
            progress[index] = 0
            result = fleets[arg["kind"]].run(arg["window"], arg["duration"], arg["start_ns"],
                                             progress=progress, slot=index, burst=arg.get("burst", 0),
                                             pace_ns=arg.get("pace_ns", 0))
            pipe.send(("ok", result))
    for fleet in fleets.values():
        fleet.close()


def build_fleet(protocol: str, users: list[VUser], size: int, both: bool, version: int = 1,
                text: str = "ascii") -> Fleet:
    """Turn ready pairs ``[a0, b0, a1, b1, ...]`` into flows over their sockets."""
    fleet = Fleet(protocol, version)
    for conn in (c for u in users for c in u.conns() if c.buf):
        fleet.problem(f"{conn.user.name} {conn.role}: unread at setup's end: {conn.buf[:120]!r}")
    for a, b in zip(users[0::2], users[1::2]):
        directions = [(a, b), (b, a)] if both else [(a, b)]
        if protocol == "selchat" and version >= 2:
            _selchat_v2_pair(fleet, (a, b), directions, size, text)
        elif protocol == "selchat":
            _selchat_pair(fleet, (a, b), directions, size, text)
        else:
            _baseline_pair(fleet, (a, b), directions, size, text)
    return fleet


def _selchat_pair(fleet: Fleet, pair, directions, size: int, text: str) -> None:
    """Messages go out on the sender's chat socket and arrive on the receiver's
    login socket; the check sockets answer PINGs; everything else stays silent."""
    chat = {u: fleet.add(Conn(u.chat.sock, fleet, f"{u.name} chat")) for u in pair}
    incoming = {receiver: Flow(fleet, chat[sender], b"MSG ", size, text) for sender, receiver in directions}
    fleet.flows += incoming.values()
    for u in pair:
        fleet.add(CheckConn(u.check.sock, fleet, f"{u.name} check"))
        label = f"{u.name} login"
        if u in incoming:
            fleet.add(RxConn(u.login.sock, fleet, label, incoming[u]))
        else:
            fleet.add(Conn(u.login.sock, fleet, label))


def _selchat_v2_pair(fleet: Fleet, pair, directions, size: int, text: str) -> None:
    """As ``_selchat_pair``, with protocol version 2: the chat sockets get
    RECEIVED, the login sockets count their frames and ACK them on the check
    socket, and a sender's login socket gets its DELIVERED receipts."""
    chat = {u: fleet.add(V2ChatConn(u.chat.sock, fleet, f"{u.name} chat", None)) for u in pair}
    incoming = {receiver: Flow(fleet, chat[sender], b"MSG ", size, text) for sender, receiver in directions}
    outgoing = {sender: incoming[receiver] for sender, receiver in directions}
    fleet.flows += incoming.values()
    for u in pair:
        chat[u].out = outgoing.get(u)
        check = fleet.add(CheckConn(u.check.sock, fleet, f"{u.name} check"))
        login = fleet.add(V2LoginConn(u.login.sock, fleet, f"{u.name} login", incoming.get(u), outgoing.get(u),
                                      check, u.wire_id))
        if u in outgoing:
            outgoing[u].acker = login


def _baseline_pair(fleet: Fleet, pair, directions, size: int, text: str) -> None:
    """One socket per user sends its own flow and receives its partner's."""
    conns = {u: RxConn(u.login.sock, fleet, u.name, None) for u in pair}
    for sender, receiver in directions:
        flow = Flow(fleet, conns[sender], b"to " + receiver.name.encode() + b" ", size, text)
        conns[receiver].flow = flow
        fleet.flows.append(flow)
    for conn in conns.values():
        fleet.add(conn)


# -- idle -------------------------------------------------------------------------------

def idle_worker(pipe, index, progress, spec) -> None:
    """Log ``spec["names"]`` in, then hold them: answer PINGs, count them and any drops."""
    users = [VUser(name) for name in spec["names"]]
    setup = Setup("selchat", tuple(spec["address"]), password=spec["password"], sources=spec["sources"],
                  concurrency=spec.get("concurrency", 256))
    setup.run(users, timeout=spec.get("setup_timeout", 600))
    setup.strict = False  # from now on count drops instead of failing
    pipe.send(("ok", {"t_first": min(u.t_start for u in users), "t_last": max(u.t_ready for u in users)}))
    for command, arg in _commands(pipe, setup.poll):
        if command == "hold":
            setup.pings = 0
            pipe.send(("ok", None))
        elif command == "report":
            dropped = [u.dropped for u in users if u.dropped]
            pipe.send(("ok", {"pings": setup.pings, "dropped": len(dropped), "problems": setup.problems[:10]}))
    for user in users:
        user.close()


# -- login storm ----------------------------------------------------------------------

def storm_worker(pipe, index, progress, spec) -> None:
    """On "go", log ``spec["names"]`` in with real password checks, at most
    ``concurrency`` at a time; report each login's start and ready times."""
    setup = Setup("selchat", tuple(spec["address"]), password=spec["password"], sources=spec["sources"],
                  concurrency=spec["concurrency"])
    users = [VUser(name) for name in spec["names"]]
    pipe.send(("ok", None))
    for command, arg in _commands(pipe, setup.poll):
        if command == "go":
            setup.run(users, timeout=spec.get("setup_timeout", 600))
            setup.strict = False
            pipe.send(("ok", {"start": [u.t_start for u in users], "ready": [u.t_ready for u in users]}))
    for user in users:
        user.close()


def chat_pair_worker(pipe, index, progress, spec) -> None:
    """One pair chatting at a steady rate: open loop, one message every 1/rate s
    in each direction whether or not the last one arrived (so a stalled server
    shows as latency, not as fewer samples). ``("phase", name)`` starts sending
    (the first time) and files later latencies under ``name``; "finish" stops
    sending, waits for what is in flight and reports."""
    users = make_pairs([spec["pair"]])
    setup = Setup("selchat", tuple(spec["address"]), password=spec["password"], sources=spec["sources"])
    setup.run(users, pair=True)
    setup.release()
    fleet = build_fleet("selchat", users, spec["size"], both=True)
    pipe.send(("ok", None))
    interval = 1.0 / spec["rate"]
    phases: dict[str, array] = {}
    next_send = None
    while True:
        if next_send is not None and time.monotonic() >= next_send:
            for flow in fleet.flows:
                flow.send_one()
            next_send += interval
        wait = 0.05 if next_send is None else min(0.05, next_send - time.monotonic())
        fleet.keepalive(max(0.0, wait))
        if pipe.poll(0):
            command, arg = pipe.recv()
            if command != "phase":
                break
            phases[arg] = array("q")
            for flow in fleet.flows:
                flow.lat = phases[arg]
            if next_send is None:
                next_send = time.monotonic()
    if command == "finish":
        deadline = time.monotonic() + 10
        while any(f.sent != f.received for f in fleet.flows) and time.monotonic() < deadline:
            fleet.keepalive(0.05)
        late, gaps = fleet.late_gaps()
        pipe.send(("ok", {"phases": {name: lat.tobytes() for name, lat in phases.items()},
                          "sent": sum(f.sent for f in fleet.flows),
                          "lost": sum(f.sent - f.received for f in fleet.flows),
                          "reordered": late, "gaps": gaps, "problems": fleet.problems}))
        for _ in _commands(pipe, fleet.keepalive):
            pass
    fleet.close()
