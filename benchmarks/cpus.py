"""CPU sets and CPU time for ``infergate bench``: servers and load on disjoint CPUs, server cost per call.

On a shared machine, a server and its load generator that float over the same CPUs take turns in
ways that change from run to run (rounds spread by about 30 % on 2 CPUs). Pinned to disjoint sets
they spread by about 5 %. ``default_split`` gives the servers the first half of the CPUs this
process may use and the load the rest; ``children_pinned_to`` makes every process started inside
it inherit a CPU set (Linux: a child inherits the affinity of the thread that forks it), so the
servers' own threads and children are pinned from their first instruction.

``tree_cpu_s`` reads a process's CPU time (user + system) from ``/proc/PID/stat``, with every live
descendant (the workers of ``server.workers > 1``, tritonserver under its launcher) and the
children already reaped. Linux only: elsewhere pinning is refused and CPU time is not reported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class CpuSetError(ValueError):
    """A CPU list that cannot be used; the message says why (a usage error)."""


def parse_cpu_list(text: str) -> frozenset[int]:
    """``"0"``, ``"0-3,6"``: the kernel's list format (as in ``taskset -c`` and ``Cpus_allowed_list``)."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise CpuSetError(f"{text!r}: expected CPU numbers and ranges such as 0-3,6")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise CpuSetError(f"{text!r}: range {part} runs backwards")
        cpus.update(range(low, high + 1))
    if not cpus:
        raise CpuSetError(f"{text!r}: no CPU named")
    return frozenset(cpus)


def format_cpu_list(cpus: frozenset[int] | set[int]) -> str:
    """The shortest kernel-style list: ``{0, 1, 2, 5}`` -> ``"0-2,5"``."""
    ordered = sorted(cpus)
    parts = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def usable_cpus() -> frozenset[int]:
    """The CPUs this process may run on (its affinity, which a container or taskset may narrow)."""
    return frozenset(os.sched_getaffinity(0))


def default_split(cpus: frozenset[int]) -> tuple[frozenset[int], frozenset[int]] | None:
    """Servers on the first half (at least one CPU), load on the rest; None below 2 CPUs.

    2 CPUs: servers on the first, load on the second. 16: 8 and 8.
    """
    if len(cpus) < 2:
        return None
    ordered = sorted(cpus)
    half = len(ordered) // 2
    return frozenset(ordered[:half]), frozenset(ordered[half:])


def check_disjoint(server: frozenset[int], client: frozenset[int], usable: frozenset[int]) -> None:
    """Raise CpuSetError unless both sets are usable here and share no CPU."""
    for option, cpus in (("--server-cpus", server), ("--client-cpus", client)):
        missing = cpus - usable
        if missing:
            raise CpuSetError(
                f"{option} {format_cpu_list(cpus)}: CPU {format_cpu_list(missing)} is not available here "
                f"(this process may use {format_cpu_list(usable)})"
            )
    shared = server & client
    if shared:
        raise CpuSetError(
            f"--server-cpus and --client-cpus share CPU {format_cpu_list(shared)}; pinning is for keeping them apart"
        )


@contextlib.contextmanager
def children_pinned_to(cpus: frozenset[int] | None) -> Iterator[None]:
    """Processes started by this thread inside the block run on ``cpus`` (None: unchanged).

    Only the calling thread's affinity changes, and it is restored on the way out.
    """
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def allowed_cpus(pid: int) -> str:
    """The kernel's ``Cpus_allowed_list`` of ``pid`` (its main thread), e.g. ``"0"`` or ``"0-15"``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise OSError(f"/proc/{pid}/status has no Cpus_allowed_list")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and of its children already reaped."""
    fields = _stat_fields(pid)
    # After "state": ppid is fields[1]; utime, stime, cutime, cstime are fields 14-17 of stat (1-based),
    # i.e. indexes 11-14 here.
    return sum(int(v) for v in fields[11:15]) / _TICKS_PER_S


def process_user_system_s(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` (children already reaped included), apart."""
    fields = _stat_fields(pid)
    user = int(fields[11]) + int(fields[13])
    system = int(fields[12]) + int(fields[14])
    return user / _TICKS_PER_S, system / _TICKS_PER_S


def descendants(pid: int) -> list[int]:
    """Every live process under ``pid`` (children, grandchildren...), found through their parent ids."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        parents.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its whole process tree, live and reaped; OSError when ``pid`` is gone."""
    total = process_cpu_s(pid)
    for child in descendants(pid):
        try:
            total += process_cpu_s(child)
        except (OSError, ValueError):
            continue  # exited between the scan and the read: its time moves to its parent's cutime
    return total
