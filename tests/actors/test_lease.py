"""Leased attempts, the coordinator's side: the timing rules, the restart grace, the
``unreachable`` health, and an in-process coordinator that reports what fails in its block."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import anyio
import pytest

from actors import (
    ENGINE_CODEC,
    AttemptContext,
    Resources,
    SubmitJob,
    TaskSpec,
    open_engine,
    open_inprocess_executor,
)
from actors.cluster import CoordinatorConfig, LeaseTiming, lease_timing, open_coordinator
from actors.engine import EngineSettings
from persistence import InMemoryJournal
from runtime import ConfigurationError, VirtualClock

TOKEN = b"lease-test-token-0123456789abcdef"


@pytest.mark.parametrize(
    ("interval", "timeout", "lease", "fence", "expected"),
    [
        (1.0, 5.0, None, None, LeaseTiming(lease=10.0, grace=5.0, fence=17.0)),
        (0.4, 2.0, None, None, LeaseTiming(lease=4.0, grace=2.0, fence=8.0)),
        (0.2, 1.0, 2.0, None, LeaseTiming(lease=2.0, grace=1.0, fence=5.0)),
        (1.0, 5.0, 60.0, None, LeaseTiming(lease=60.0, grace=30.0, fence=102.0)),
        (0.2, 1.0, 2.0, 4.0, LeaseTiming(lease=2.0, grace=1.0, fence=4.0)),
    ],
)
def test_lease_timing_defaults_and_choices(
    interval: float, timeout: float, lease: float | None, fence: float | None, expected: object
) -> None:
    """The lease defaults to twice the heartbeat timeout, its grace is half of it, and the fence
    exceeds lease + grace by max(2 s, lease / 5) unless chosen."""
    timing = lease_timing(
        heartbeat_interval=interval, heartbeat_timeout=timeout, lease=lease, fence=fence
    )
    assert timing == expected
    assert timing.fence > timing.lease + timing.grace


@pytest.mark.parametrize(
    ("lease", "fence", "where", "message"),
    [
        (0.3, None, "--lease", "at least twice the heartbeat interval"),
        (0.0, None, "--lease", "must be > 0"),
        (math.inf, None, "--lease", "expected a number of seconds"),
        (2.0, 3.9, "--fence", "at least lease + lease/2 + 1 s = 4 s"),
        (2.0, -1.0, "--fence", "must be > 0"),
    ],
)
def test_a_lease_or_fence_that_would_not_be_safe_is_refused(
    lease: float, fence: float | None, where: str, message: str
) -> None:
    """A lease that would run out between heartbeats, or a fence that does not outlast the
    lease and its grace by a second, is refused naming the flag."""
    with pytest.raises(ConfigurationError, match=re.escape(message)) as caught:
        lease_timing(heartbeat_interval=0.2, heartbeat_timeout=1.0, lease=lease, fence=fence)
    assert caught.value.where == where
    with pytest.raises(ConfigurationError):
        CoordinatorConfig(
            journal=Path("unused.db"),
            token=TOKEN,
            heartbeat_interval=0.2,
            heartbeat_timeout=1.0,
            lease=lease,
            fence=fence,
        )


def _config(tmp_path: Path, **fields: object) -> CoordinatorConfig:
    return CoordinatorConfig(
        journal=tmp_path / "journal.db",
        token=TOKEN,
        port=0,
        work_dir=tmp_path / "work",
        heartbeat_interval=0.2,
        heartbeat_timeout=1.0,
        **fields,  # type: ignore[arg-type]
    )


async def test_an_error_raised_in_the_coordinators_block_comes_out(tmp_path: Path) -> None:
    """An exception inside ``async with open_coordinator()`` is raised, not swallowed."""
    with pytest.raises(ValueError, match="from the block"):
        async with open_coordinator(_config(tmp_path)):
            raise ValueError("from the block")


async def test_the_restart_grace_is_at_least_the_fence(tmp_path: Path) -> None:
    """Work out on a node when the coordinator restarted is not requeued before the fence."""
    settings = EngineSettings(restart_grace=1.0)
    async with open_coordinator(_config(tmp_path, lease=2.0, settings=settings)) as coordinator:
        assert coordinator.engine.settings.restart_grace == 5.0
    async with open_coordinator(
        _config(tmp_path, lease=2.0, settings=EngineSettings(restart_grace=30.0))
    ) as coordinator:
        assert coordinator.engine.settings.restart_grace == 30.0


async def test_an_unreachable_node_gets_no_new_work_until_it_is_back() -> None:
    """A node whose agent lost contact is shown unreachable and placed nothing until online."""
    clock = VirtualClock(auto_advance=True)
    ran: list[str] = []

    async def work(ctx: AttemptContext) -> None:
        ran.append(ctx.spec.task_id)

    one = Resources.of(cores=1, memory="1GiB")
    job = SubmitJob(
        job_id="waits",
        name="waits",
        command=("inprocess:work",),
        resources=one,
        tasks=(TaskSpec(index=0, name="0"),),
    )
    async with (
        open_inprocess_executor({"work": work}, clock=clock) as executor,
        open_engine(journal=InMemoryJournal(clock=clock, codec=ENGINE_CODEC), clock=clock) as e,
    ):
        await e.add_node("n1", Resources.of(cores=2, memory="4GiB"), executor=executor)
        await e.set_node_reachable("n1", "unreachable")
        [job_id] = await e.submit([job])
        with anyio.fail_after(5):
            while "no node is online (nodes are unreachable)" not in await e.why(job_id):
                await anyio.lowlevel.checkpoint()
        assert ran == []
        assert [n.health for n in await e.nodes()] == ["unreachable"]
        await e.set_node_reachable("n1", "connected")
        with anyio.fail_after(5):
            summary = await e.wait_job(job_id)
    assert summary.status == "completed"
    assert ran == ["0"]


async def test_help_states_the_timing_defaults() -> None:
    """`serve --help` and `agent --help` give the defaults of the heartbeat timeout, the restart
    grace, the lease and the fence."""
    serve = await anyio.run_process([sys.executable, "-m", "runtime.cli", "serve", "--help"])
    agent = await anyio.run_process([sys.executable, "-m", "runtime.cli", "agent", "--help"])
    serve_help = " ".join(serve.stdout.decode().split())
    agent_help = " ".join(agent.stdout.decode().split())
    for flag, default in (
        ("--heartbeat-timeout", "default: 5"),
        ("--restart-grace", "default: 10"),
        ("--lease", "twice --heartbeat-timeout, 10"),
        ("--fence", "17.5"),
    ):
        assert flag in serve_help
        assert default in serve_help, (flag, serve_help)
    for text in ("--lease", "--heartbeat-timeout (5 s)", "--restart-grace (10 s", "17.5 s"):
        assert text in agent_help, (text, agent_help)


async def test_serve_refuses_an_unsafe_fence_naming_the_flag(tmp_path: Path) -> None:
    """`taskfarm serve` with a fence shorter than lease + grace + 1 s exits 2 naming --fence."""
    result = await anyio.run_process(
        [
            sys.executable,
            "-m",
            "runtime.cli",
            "serve",
            "--journal",
            str(tmp_path / "journal.db"),
            "--token-file",
            str(tmp_path / "token"),
            "--listen",
            "127.0.0.1:0",
            "--lease",
            "4",
            "--fence",
            "5",
        ],
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert b"--fence: must be at least" in result.stderr
    assert not (tmp_path / "journal.db").exists()
