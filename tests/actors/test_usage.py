"""Measured usage: /proc sampling of real process groups, attempt totals and the memory limit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from actors.executors import (
    AttemptFinished,
    AttemptProgress,
    AttemptReport,
    AttemptSpec,
    open_subprocess_executor,
    read_oom_kills,
    sample_host,
    scan_groups,
)
from actors.executors._usage import ProcessSample, UsageTracker, killed_by_oom
from runtime import ConfigurationError

HOG = Path(__file__).parent / "workloads" / "hog.py"
MIB = 2**20


class Recorder:
    """A report sink that keeps the reports and lets a test wait for the first of a kind."""

    def __init__(self) -> None:
        self.reports: list[AttemptReport] = []
        self._changed = anyio.Event()

    async def __call__(self, report: AttemptReport) -> None:
        self.reports.append(report)
        self._changed.set()
        self._changed = anyio.Event()

    async def first(self, kind: type[AttemptReport]) -> AttemptReport:
        with anyio.fail_after(30):
            while not any(isinstance(r, kind) for r in self.reports):
                await self._changed.wait()
        return next(r for r in self.reports if isinstance(r, kind))


def _hog(megabytes: int, cpu_s: float, children: int = 0, then: str = "hang") -> list[str]:
    return [sys.executable, str(HOG), str(megabytes), str(cpu_s), str(children), then]


@pytest.fixture
def hog() -> Iterator[Any]:
    """Start hog processes in their own process group; kill the groups afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            _hog(*args), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True
        )
        started.append(process)
        assert process.stdout is not None
        assert process.stdout.readline().strip() == b"@taskfarm progress 0.5 ready"
        return process

    yield start
    for process in started:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_a_scan_measures_a_real_process_groups_memory_and_cpu(hog: Any) -> None:
    """A process that touched 96 MiB and burned 0.4 s of CPU is sampled with both."""
    process = hog(96, 0.4)
    (members,) = scan_groups({process.pid}).values()
    assert [m.pid for m in members] == [process.pid]
    (member,) = members
    assert 96 * MIB <= member.rss < 400 * MIB
    assert member.peak_rss >= member.rss
    assert 0.35 <= member.cpu_s < 5.0
    tracker = UsageTracker(pgid=process.pid)
    tracker.update(members)
    assert tracker.rss == member.rss
    assert tracker.processes == 1
    assert 0.35 <= tracker.cpu_s < 5.0


def test_cpu_of_reaped_children_counts_and_groups_are_kept_apart(hog: Any) -> None:
    """A group's CPU includes the children it ran and reaped; another group is not mixed in."""
    parent = hog(8, 0.1, 2)  # two children of 0.1 s each, reaped before "ready"
    other = hog(8, 0.3)
    scanned = scan_groups({parent.pid, other.pid, 999_999_999})
    assert scanned[999_999_999] == []
    tracker = UsageTracker(pgid=parent.pid)
    tracker.update(scanned[parent.pid])
    assert 0.28 <= tracker.cpu_s < 5.0  # 0.1 own + 2 x 0.1 reaped
    assert [m.pid for m in scanned[other.pid]] == [other.pid]


def test_a_vanished_member_whose_parent_is_outside_keeps_its_cpu() -> None:
    """A member that disappears without a member to reap it keeps its last CPU sample; one a
    member reaped is not counted twice (its parent's cutime holds it)."""

    def sample(pid: int, ppid: int, cpu: float, children: float = 0.0) -> ProcessSample:
        return ProcessSample(
            pid=pid,
            ppid=ppid,
            pgid=10,
            cpu_s=cpu,
            children_cpu_s=children,
            rss=MIB,
            peak_rss=MIB,
            read_bytes=5,
            write_bytes=7,
        )

    tracker = UsageTracker(pgid=10)
    tracker.update([sample(10, 1, 1.0), sample(11, 10, 2.0), sample(12, 1, 4.0)])
    assert tracker.cpu_s == pytest.approx(7.0)
    assert tracker.rss == 3 * MIB
    # 11 was reaped by 10 (cutime now holds it); 12's parent is outside: it keeps its 4 s.
    tracker.update([sample(10, 1, 1.5, children=2.0)])
    assert tracker.cpu_s == pytest.approx(7.5)
    assert tracker.peak_rss == 3 * MIB
    assert tracker.rss == MIB
    assert (tracker.read_bytes, tracker.write_bytes) == (15, 21)


def test_the_host_sample_reads_load_memory_and_scratch(tmp_path: Path) -> None:
    """The host sample has the load, some available memory and the scratch's free space."""
    host = sample_host(tmp_path)
    assert host.load >= 0.0
    assert host.memory_available > 0
    vfs = os.statvfs(tmp_path)
    assert abs(host.scratch_free - vfs.f_bavail * vfs.f_frsize) < 512 * MIB
    assert sample_host(tmp_path / "missing").scratch_free == 0
    assert read_oom_kills() is None or read_oom_kills() >= 0  # type: ignore[operator]


def _spec(argv: list[str], **fields: Any) -> AttemptSpec:
    return AttemptSpec(
        job_id="job-1", task_id="0", attempt=1, fencing_token=3, argv=tuple(argv), **fields
    )


async def test_a_finished_attempt_carries_its_cpu_and_peak_memory(tmp_path: Path) -> None:
    """The final report of an attempt has its CPU seconds and peak resident memory, sampled
    or not (the main process's wait4 rusage)."""
    recorder = Recorder()
    async with open_subprocess_executor(
        log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "ck"
    ) as executor:
        handle = await executor.start(_spec(_hog(64, 0.3, 1, "exit")), recorder)
        with anyio.fail_after(30):
            result = await handle.wait()
    assert result.outcome == "completed"
    assert result.cpu_s is not None  # a subprocess is measured
    assert 0.55 <= result.cpu_s < 10.0  # 0.3 own + 0.3 of the reaped child
    assert 64 * MIB <= result.peak_rss < 1024 * MIB
    assert result.runtime_s > 0


async def test_sampling_reports_a_running_attempts_usage(tmp_path: Path) -> None:
    """sample_usage() returns each running attempt's usage under its identity."""
    recorder = Recorder()
    async with open_subprocess_executor(
        log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "ck"
    ) as executor:
        assert await executor.sample_usage() == ()
        handle = await executor.start(_spec(_hog(48, 0.2), memory=64 * MIB), recorder)
        await recorder.first(AttemptProgress)
        (usage,) = await executor.sample_usage()
        assert (usage.job_id, usage.task_id, usage.attempt, usage.fencing_token) == (
            "job-1",
            "0",
            1,
            3,
        )
        assert usage.rss >= 48 * MIB
        assert usage.peak_rss >= usage.rss
        assert usage.cpu_s >= 0.15
        assert usage.processes == 1
        assert usage.memory == 64 * MIB
        handle.cancel(grace=0)
        with anyio.fail_after(10):
            result = await handle.wait()
    assert result.outcome == "cancelled"
    assert result.peak_rss >= 48 * MIB


@pytest.mark.parametrize(
    ("factor", "outcome"), [(1.5, "oom"), (0.0, "cancelled"), (8.0, "cancelled")]
)
async def test_memory_over_its_request_times_the_factor_stops_the_attempt_as_oom(
    tmp_path: Path, factor: float, outcome: str
) -> None:
    """With a factor, an attempt resident beyond factor x its request is stopped as ``oom``;
    with 0 (off) or a factor it stays under, it runs on."""
    recorder = Recorder()
    async with open_subprocess_executor(
        log_dir=tmp_path / "logs",
        checkpoint_dir=tmp_path / "ck",
        memory_limit_factor=factor,
        terminate_grace=2.0,
    ) as executor:
        handle = await executor.start(_spec(_hog(80, 0.0), memory=16 * MIB), recorder)
        await recorder.first(AttemptProgress)
        await executor.sample_usage()
        if outcome != "oom":
            assert handle.result is None
            handle.cancel(grace=0)
        with anyio.fail_after(10):
            result = await handle.wait()
    assert result.outcome == outcome
    if outcome == "oom":
        assert result.error is not None
        assert "exceeded 1.5 x its request of 16 MiB" in result.error
        assert result.peak_rss >= 80 * MIB
        log = (tmp_path / "logs" / "job-1" / "0.1.log").read_text()
        assert "out of memory: resident memory" in log


@pytest.mark.parametrize("factor", [-1.0, float("nan"), float("inf")])
async def test_a_bad_memory_limit_factor_is_a_configuration_error(
    tmp_path: Path, factor: float
) -> None:
    """A negative or non-finite factor is refused, naming the setting."""
    with pytest.raises(ConfigurationError, match="memory_limit_factor"):
        async with open_subprocess_executor(
            log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "ck", memory_limit_factor=factor
        ):
            pass


async def test_a_sigkill_from_outside_is_oom_only_when_the_host_counted_an_oom_kill(
    tmp_path: Path,
) -> None:
    """A SIGKILL nobody in the agent sent is ``failed`` while the host's oom_kill count stays
    put (here: a kill by hand); the count is what tells the kernel's OOM killer."""
    recorder = Recorder()
    before = read_oom_kills()
    async with open_subprocess_executor(
        log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "ck"
    ) as executor:
        handle = await executor.start(_spec(_hog(1, 0.0)), recorder)
        await recorder.first(AttemptProgress)
        assert handle.pid is not None
        os.kill(handle.pid, signal.SIGKILL)
        with anyio.fail_after(10):
            result: AttemptFinished = await handle.wait()
    if before is not None and read_oom_kills() == before:
        assert result.outcome == "failed"
        assert result.exit_code == -signal.SIGKILL


@pytest.mark.parametrize(
    ("before", "now", "oom"),
    [(3, 4, True), (3, 3, False), (None, 4, False), (3, None, False), (0, 1, True)],
)
def test_a_kill_is_the_oom_killers_when_the_hosts_count_rose(
    before: int | None, now: int | None, oom: bool
) -> None:
    """An unexplained SIGKILL is classified ``oom`` exactly when the oom_kill count rose."""
    assert killed_by_oom(before, now) is oom
