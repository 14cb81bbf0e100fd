"""What the bench reads about processes and the machine: /proc, affinity, limits.

Server CPU is ``utime + stime`` of the whole process (every thread, living
or exited) from ``/proc/<pid>/stat``, in clock ticks (10 ms on Linux), read
before and after a timed window. RSS is ``VmRSS`` (and the peak, ``VmHWM``)
from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")

#: Linux: bind() picks only the address; connect() picks the port by 4-tuple.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def cpu_times(pid: int) -> tuple[float, float]:
    """``(user, system)`` CPU seconds used so far by process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces; fields after it are plain.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid``."""
    return sum(cpu_times(pid))


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent doing anything but idling (from /proc/stat):
    compared with what the server and generator used, it shows other load."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10]) if len(fields) > 9 else 0       # already counted in user/nice
    return (sum(fields) - idle - guest) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """``{"rss": VmRSS, "peak": VmHWM}`` of process ``pid``, in KiB."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                found["rss"] = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                found["peak"] = int(line.split()[1])
    return found


def usable_cpus() -> list[int]:
    """CPUs this process may run on, sorted."""
    return sorted(os.sched_getaffinity(0))


def split_cpus(pin: bool) -> tuple[list[int] | None, list[int] | None]:
    """``(server_cpus, generator_cpus)``: with ``pin``, the server gets the first
    usable CPU and the load generator all the others; without, neither is pinned."""
    if not pin:
        return None, None
    cpus = usable_cpus()
    if len(cpus) < 2:
        raise RuntimeError(f"--pin needs at least 2 CPUs, this process may use {cpus}")
    return cpus[:1], cpus[1:]


def pin_self(cpus: list[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def pin_process(pid: int, cpus: list[int]) -> None:
    """Pin every thread of a running process (one we did not start) to ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def nofile_limits() -> tuple[int, int]:
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def reachable_nofile() -> int:
    """The most descriptors a process we start can have: the hard limit, raised
    first to ``fs.nr_open`` if we may (root with CAP_SYS_RESOURCE; a container's
    root often lacks it). Children inherit the raised hard limit."""
    soft, hard = nofile_limits()
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        nr_open = hard
    if hard != resource.RLIM_INFINITY and hard < nr_open:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, nr_open))
            hard = nr_open
        except (ValueError, OSError):
            pass
    return nr_open if hard == resource.RLIM_INFINITY else hard


def nofile_advice(need: int) -> str:
    """Exactly what to run when a process needs ``need`` descriptors and we cannot give them."""
    hard = reachable_nofile()
    return (f"{need:,} descriptors are needed but the hard limit is {hard:,} and this process may not raise it "
            f"(raising it needs root with CAP_SYS_RESOURCE, which this process lacks). From a shell that has it, "
            f"run `ulimit -Hn {need} && ulimit -n {need}` and start the bench from that shell; for a container, "
            f"start it with `--ulimit nofile={need}:{need}`; or, for a shell already running, "
            f"`prlimit --nofile={need}:{need} --pid <its pid>` as privileged root")


def raise_nofile(need: int) -> str | None:
    """Make sure this process may open ``need`` descriptors (soft limit), raising
    the hard limit too when we may. Returns None when done, else what to run."""
    soft, hard = nofile_limits()
    if soft >= need:
        return None
    if hard != resource.RLIM_INFINITY and hard < need:
        hard = reachable_nofile()
        if hard < need:
            return nofile_advice(need)
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return None


def _die_with_parent() -> None:
    """Linux: SIGTERM this (child) process when the bench that started it dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_setup(cpus: list[int] | None, nofile: int | None):
    """A ``preexec_fn`` for a spawned server: pin it (every thread it will start
    inherits the mask), lift its descriptor limit to ``nofile`` (soft and hard;
    the server raises its soft limit to the hard one itself), and have it
    terminated if the bench dies without stopping it."""
    def setup() -> None:
        _die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)
        if nofile:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if hard != resource.RLIM_INFINITY and hard < nofile:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
                except (ValueError, OSError):
                    pass  # the server will log how many clients it can hold
    return setup


def loopback_sources(host: str, count: int) -> list[str | None]:
    """Source addresses to spread client sockets over: 127.0.0.2, 127.0.0.3, ...
    when the server is on IPv4 loopback (each has its own ~28,000 ephemeral
    ports), else just the default."""
    if not host.startswith("127."):
        return [None]
    return [f"127.0.0.{i}" for i in range(2, 2 + max(1, count))]


def find_listener_pid(port: int) -> int | None:
    """The pid of the local process listening on TCP ``port``, or None.
    (Scans /proc/net/tcp for the socket inode, then /proc/*/fd; needs permission
    to read the other process's descriptors, as root has.)"""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except OSError:
            continue
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    return int(pid)
        except OSError:
            continue
    return None


def machine() -> dict:
    """The facts a reader needs to compare numbers across machines."""
    import platform

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nofile": list(nofile_limits()),
    }


def git_commit() -> str | None:
    """Short hash of HEAD of the checkout selchat runs from (``+dirty`` if modified)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None

