"""What an attempt's processes use, read from ``/proc``: CPU, memory, I/O; and the host's load.

An attempt runs in its own process group (see ``_interface.py``), so its processes are the
ones whose ``/proc/<pid>/stat`` names its group.  One scan reads every process's ``stat`` once
(a few syscalls each: a host of a few hundred processes costs a few milliseconds) and, for the
members of the groups asked about, ``status`` (the peak resident set, ``VmHWM``) and ``io``
(``read_bytes`` and ``write_bytes``, the storage traffic, where the kernel accounts it).  The
scan does blocking file I/O: callers run it in a worker thread.

How the numbers add up (:class:`UsageTracker`, one per attempt):

- **CPU seconds**: every live member's own time plus what it has reaped (``cutime``,
  ``cstime``); a member that vanished keeps its last sample when its parent was outside the
  group (no member reaped it, so no ``cutime`` holds it).  The main process's ``wait4``
  rusage at the end is exact for it and everything it reaped, and the total is at least that.
  A short-lived process reaped by a process outside the group between two samples is missed.
- **resident memory**: the sum of the live members' resident sets at the sample;
  **peak memory** the largest of: that sum at any sample, one member's own peak (``VmHWM``),
  and the ``wait4`` peak of the main process.
- **read/write bytes**: the sum of the last sample of every member ever seen (the kernel does
  not add a reaped child's I/O to its parent's); zero where ``/proc/<pid>/io`` is unreadable.

The host: the 1-minute load average, ``MemAvailable`` and the free space of a directory (the
agent's scratch), and the kernel's count of OOM kills (``oom_kill`` in ``/proc/vmstat``), by
which an attempt SIGKILLed by nobody we know of is told to have been killed by the OOM killer.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import msgspec

__all__ = [
    "AttemptUsage",
    "HostUsage",
    "ProcessSample",
    "UsageTracker",
    "killed_by_oom",
    "read_oom_kills",
    "sample_host",
    "scan_groups",
]

_TICK = float(os.sysconf("SC_CLK_TCK"))
_PAGE = os.sysconf("SC_PAGE_SIZE")
_PROC = Path("/proc")

_Count = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
_Amount = Annotated[float, msgspec.Meta(ge=0.0, le=1e15)]
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]


class AttemptUsage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One attempt's usage so far: cumulative CPU seconds and I/O bytes, resident memory now
    and at its peak (bytes), and how many processes it has now."""

    job_id: _Id
    task_id: _Id
    attempt: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
    fencing_token: _Count
    cpu_s: _Amount = 0.0
    rss: _Count = 0
    peak_rss: _Count = 0
    read_bytes: _Count = 0
    write_bytes: _Count = 0
    processes: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] = 0
    # The memory the attempt asked for (bytes, 0: none stated), for "rss of request".
    memory: _Count = 0


class HostUsage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The host: 1-minute load average, memory available and free scratch space (bytes)."""

    load: _Amount = 0.0
    memory_available: _Count = 0
    scratch_free: _Count = 0


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """One process of a group, as ``/proc`` showed it."""

    pid: int
    ppid: int
    pgid: int
    cpu_s: float  # its own user + system time
    children_cpu_s: float  # what it reaped
    rss: int
    peak_rss: int
    read_bytes: int
    write_bytes: int


def _read(path: Path) -> str | None:
    try:
        with open(path, "rb") as file:
            return file.read().decode("ascii", errors="replace")
    except OSError:
        return None


def _stat_fields(text: str) -> list[str] | None:
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    end = text.rfind(")")
    if end < 0:
        return None
    return text[end + 2 :].split()


def _status_peak(text: str | None) -> int:
    if text is None:
        return 0
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            parts = line.split()
            return int(parts[1]) * 1024 if len(parts) >= 2 and parts[1].isdigit() else 0
    return 0


def _io(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 0
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("read_bytes", "write_bytes"):
            values[key] = int(value.strip() or 0)
    return values.get("read_bytes", 0), values.get("write_bytes", 0)


def scan_groups(pgids: Collection[int]) -> dict[int, list[ProcessSample]]:
    """Return the live processes of each process group in ``pgids`` (blocking: use a thread)."""
    found: dict[int, list[ProcessSample]] = {pgid: [] for pgid in pgids}
    if not found:
        return found
    try:
        entries = os.listdir(_PROC)
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        base = _PROC / entry
        text = _read(base / "stat")
        fields = _stat_fields(text) if text is not None else None
        # Fields after the name, 0-based: 0 state, 1 ppid, 2 pgrp, 11 utime, 12 stime,
        # 13 cutime, 14 cstime, 21 rss (pages).
        if fields is None or len(fields) < 22:
            continue
        pgid = int(fields[2])
        members = found.get(pgid)
        if members is None or fields[0] in ("Z", "X"):
            continue
        read_bytes, write_bytes = _io(_read(base / "io"))
        rss = int(fields[21]) * _PAGE
        members.append(
            ProcessSample(
                pid=int(entry),
                ppid=int(fields[1]),
                pgid=pgid,
                cpu_s=(int(fields[11]) + int(fields[12])) / _TICK,
                children_cpu_s=(int(fields[13]) + int(fields[14])) / _TICK,
                rss=rss,
                peak_rss=max(rss, _status_peak(_read(base / "status"))),
                read_bytes=read_bytes,
                write_bytes=write_bytes,
            )
        )
    return found


@dataclass(slots=True)
class UsageTracker:
    """One attempt's usage, folded from successive samples of its process group."""

    pgid: int
    cpu_s: float = 0.0
    rss: int = 0
    peak_rss: int = 0
    processes: int = 0
    # Per pid ever seen: (parent, own + reaped CPU, read bytes, write bytes) at its last sample.
    _seen: dict[int, tuple[int, float, int, int]] = field(default_factory=dict)
    _live: frozenset[int] = frozenset()
    _gone_cpu_s: float = 0.0

    def update(self, samples: Iterable[ProcessSample]) -> None:
        """Fold one scan of the group in."""
        samples = list(samples)
        live = frozenset(s.pid for s in samples)
        for pid in self._live - live:
            parent, cpu, _, _ = self._seen[pid]
            if parent not in live:  # no member reaped it: its time is in nobody's cutime
                self._gone_cpu_s += cpu
        for sample in samples:
            self._seen[sample.pid] = (
                sample.ppid,
                sample.cpu_s + sample.children_cpu_s,
                sample.read_bytes,
                sample.write_bytes,
            )
        self._live = live
        self.processes = len(samples)
        self.rss = sum(s.rss for s in samples)
        self.peak_rss = max(self.peak_rss, self.rss, *(s.peak_rss for s in samples), 0)
        live_cpu = sum(s.cpu_s + s.children_cpu_s for s in samples)
        self.cpu_s = max(self.cpu_s, self._gone_cpu_s + live_cpu)

    def finish(self, rusage: resource.struct_rusage | None) -> None:
        """Fold in the main process's ``wait4`` rusage (exact for it and what it reaped)."""
        self.rss = 0
        self.processes = 0
        if rusage is not None:
            self.cpu_s = max(self.cpu_s, rusage.ru_utime + rusage.ru_stime)
            self.peak_rss = max(self.peak_rss, rusage.ru_maxrss * 1024)  # ru_maxrss is in KiB

    @property
    def read_bytes(self) -> int:
        """Return the storage bytes read by every member seen."""
        return sum(value[2] for value in self._seen.values())

    @property
    def write_bytes(self) -> int:
        """Return the storage bytes written by every member seen."""
        return sum(value[3] for value in self._seen.values())


def killed_by_oom(before: int | None, now: int | None) -> bool:
    """Tell whether an unexplained SIGKILL was the OOM killer's: the host's count of OOM
    kills (``before`` the attempt started, ``now``) rose meanwhile; unknown counts say no."""
    return before is not None and now is not None and now > before


def read_oom_kills() -> int | None:
    """Return the kernel's count of OOM kills since boot (None: not available)."""
    text = _read(_PROC / "vmstat")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return None


def sample_host(scratch: str | os.PathLike[str]) -> HostUsage:
    """Return the host's load, available memory and free space under ``scratch`` (blocking:
    ``statvfs`` of a network file system can take a while; use a thread)."""
    load = 0.0
    text = _read(_PROC / "loadavg")
    if text:
        load = float(text.split()[0])
    available = 0
    meminfo = _read(_PROC / "meminfo")
    for line in (meminfo or "").splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
            break
    try:
        vfs = os.statvfs(scratch)
        free = vfs.f_bavail * vfs.f_frsize
    except OSError:
        free = 0
    return HostUsage(load=load, memory_available=available, scratch_free=free)
