"""CPU time of processes from /proc, without psutil: what each process of a path spent.

A benchmark window reads `utime + stime` of every process in a group before and after
(`/proc/<pid>/stat`, which sums all threads of a process), and divides the delta by the
requests served. Groups include descendants, so a router that forks workers is counted
whole. Resolution is one clock tick (10 ms at the usual 100 Hz): a few seconds at
thousands of requests per second make that well under a microsecond per request.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuWindow", "cpu_seconds", "descendants", "find_pids", "read_stat"]

PROC = Path("/proc")
TICK = 1.0 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    comm: str
    ppid: int
    cpu_seconds: float  # utime + stime, all threads


def read_stat(pid: int) -> ProcStat | None:
    """One process's /proc/<pid>/stat, or None if it is gone. The command name can hold
    spaces and parentheses, so fields are split after the last ')'."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[
        text.rindex(")") + 2 :
    ].split()  # fields[0] is the state (field 3 of proc(5))
    return ProcStat(
        pid, comm, int(fields[1]), (int(fields[11]) + int(fields[12])) * TICK
    )


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` in seconds (0.0 if it is gone)."""
    stat = read_stat(pid)
    return stat.cpu_seconds if stat is not None else 0.0


def _all_pids() -> list[int]:
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def descendants(pid: int, stop: frozenset[int] = frozenset()) -> list[int]:
    """Every live process below `pid` (children, their children, ...), not entering the
    subtrees of the pids in `stop`."""
    children: dict[int, list[int]] = {}
    for other in _all_pids():
        stat = read_stat(other)
        if stat is not None:
            children.setdefault(stat.ppid, []).append(other)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in stop:
                found.append(child)
                todo.append(child)
    return found


def find_pids(needle: str) -> list[int]:
    """Processes whose command line contains `needle` (this process excluded)."""
    hits = []
    for pid in _all_pids():
        try:
            cmdline = (
                (PROC / str(pid) / "cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if needle in cmdline and pid != os.getpid():
            hits.append(pid)
    return hits


class CpuWindow:
    """CPU seconds each named group of processes spends between `start()` and `stop()`.

    `groups` maps a name ("router", "decode-node", ...) to root pids; each root's
    descendants at construction are counted with it, up to another root (a process
    counts with its nearest root: `tierflow up` without the router it started). A process that dies inside the window
    loses its last ticks (the benchmark's processes do not die)."""

    def __init__(self, groups: Mapping[str, Iterable[int]]) -> None:
        roots = frozenset(pid for pids in groups.values() for pid in pids)
        self._groups = {
            name: sorted(
                {p for root in pids for p in (root, *descendants(root, roots))}
            )
            for name, pids in groups.items()
        }
        self._before: dict[int, float] = {}
        self.seconds: dict[str, float] = {}

    @property
    def pids(self) -> dict[str, list[int]]:
        return dict(self._groups)

    def start(self) -> None:
        self._before = {
            pid: cpu_seconds(pid) for pids in self._groups.values() for pid in pids
        }

    def stop(self) -> dict[str, float]:
        """CPU seconds per group over the window (also kept in `seconds`)."""
        self.seconds = {
            name: sum(
                max(0.0, cpu_seconds(pid) - self._before.get(pid, 0.0)) for pid in pids
            )
            for name, pids in self._groups.items()
        }
        return self.seconds
