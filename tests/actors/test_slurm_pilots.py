"""Slurm pilots without Slurm: the sbatch script, the arguments, the allocation's timeline on a
virtual clock, and the drain an allocation agent plans with a real coordinator.

The end-to-end tests against a real Slurm are in ``tests/integration/test_slurm.py``.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, cast

import anyio
import msgspec
import pytest
import structlog

from actors import AgentConfig, AgentHandle, Resources, open_coordinator, run_agent
from actors.cli._slurm import _fill_from_allocation, match_pilots
from actors.cluster import Allocation, Coordinator, CoordinatorConfig
from actors.cluster._allocation import as_lost, ended_by_allocation, watch_allocation
from actors.engine import (
    NodeHealthChanged,
    NodeSummary,
    TaskAssigned,
    TaskRequeued,
    job_stream,
    node_stream,
)
from actors.executors import (
    AttemptContext,
    AttemptFinished,
    AttemptHandle,
    AttemptStarted,
    Executor,
    open_inprocess_executor,
)
from actors.slurm import (
    PilotJob,
    PilotSpec,
    find_slurm_job,
    job_end,
    parse_slurm_time,
    parse_time_limit,
    render_pilot_script,
)
from runtime import ConfigurationError, SystemClock, VirtualClock, write_private_file
from runtime.cli import main as cli_main

WAIT = 20.0
T0 = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)

SPEC = PilotSpec(
    connect="login1.cluster:7717",
    partition="gpu",
    time_limit="12:00:00",
    pilot_dir="/shared/farm/pilots",
    command=("/shared/venv/bin/python", "-m", "runtime.cli"),
    nodes_per_job=2,
    cores=32,
    memory="128GiB",
    sbatch_args=("--account=climate", "--gres=gpu:4"),
    setup=("module load python/3.11",),
    token_file="/shared/farm/taskfarm.token",
    labels=("gpu",),
)

GOLDEN = """\
#!/bin/bash
# A taskfarm pilot job, written by `taskfarm slurm submit-agents` at 2026-03-14T12:00:00+00:00.
# It runs one taskfarm agent per allocated node; the agents connect to login1.cluster:7717
# (join token /shared/farm/taskfarm.token) and take work until the time limit comes near:
# 600 s before the end checkpointable work is asked to checkpoint (SIGUSR1),
# 120 s before it the node drains (no new work that could not finish, what runs
# checkpoints and is requeued elsewhere), and the agents exit once idle.
# Submit it again with: sbatch THIS-FILE
#SBATCH --job-name=taskfarm-pilot
#SBATCH --partition=gpu
#SBATCH --time=12:00:00
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=131072M
#SBATCH --output=/shared/farm/pilots/slurm-%j.out
#SBATCH --account=climate
#SBATCH --gres=gpu:4

set -euo pipefail

# Set up the environment (--setup).
module load python/3.11

# One agent per node, with all the job has there (--whole): each names itself after
# this job and its node (or its credential), offers the CPUs and memory Slurm gave it,
# keeps its work folder under the pilot folder, and stops cleanly on SIGTERM
# (scancel, or the time limit); its unfinished work is requeued elsewhere.
exec srun --whole --ntasks-per-node=1 --kill-on-bad-exit=0 \\
    /shared/venv/bin/python -m runtime.cli --log-level info slurm agent \\
    --connect login1.cluster:7717 \\
    --token-file /shared/farm/taskfarm.token \\
    --pilot-dir /shared/farm/pilots \\
    --name-prefix pilot \\
    --label gpu \\
    --checkpoint-warning 600 \\
    --drain-margin 120 \\
    --terminate-grace 10
"""


# -- the script -----------------------------------------------------------------------------------


def test_the_pilot_script_reads_as_written() -> None:
    """The sbatch script: a header saying what it does, one #SBATCH line per option, the
    setup lines, then one srun line that starts the agent with one flag per line."""
    assert render_pilot_script(SPEC, written_at=T0) == GOLDEN


def test_a_pilot_without_cores_asks_for_whole_nodes_and_quotes_what_needs_it() -> None:
    """Without --cores the pilot takes whole nodes (--exclusive); a credential folder and a
    path with a space are quoted for the shell."""
    spec = PilotSpec(
        connect="10.0.0.1:7717",
        partition="batch",
        time_limit="1-00:00:00",
        pilot_dir="/shared/my pilots",
        command=("taskfarm",),
        credential_dir="/shared/creds",
    )
    lines = render_pilot_script(spec, written_at=T0).splitlines()
    assert "#SBATCH --exclusive" in lines
    assert not [line for line in lines if "--cpus-per-task" in line or "--mem=" in line]
    assert "    --pilot-dir '/shared/my pilots' \\" in lines
    assert "    --credential-dir /shared/creds \\" in lines
    assert "#SBATCH --output=/shared/my pilots/slurm-%j.out" in lines


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 5400),
        ("5:30", 330),
        ("12:00:00", 43_200),
        ("1-0", 86_400),
        ("1-02:30", 95_400),
        ("2-00:00:01", 172_801),
    ],
)
def test_slurm_time_limits_parse_in_every_form_slurm_takes(text: str, seconds: int) -> None:
    """Slurm's time formats: minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    assert parse_time_limit(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "tomorrow", "1:2:3:4", "-5", "400-00:00:00", "1h"])
def test_a_bad_time_limit_names_the_flag(text: str) -> None:
    """Not a Slurm time limit, zero or over a year: an error naming --time."""
    with pytest.raises(ConfigurationError) as caught:
        parse_time_limit(text)
    assert caught.value.where == "--time"


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"connect": "login"}, "--connect"),
        ({"connect": "0.0.0.0:7717"}, "--connect"),
        ({"partition": "gpu;rm"}, "--partition"),
        ({"nodes_per_job": 0}, "--nodes-per-job"),
        ({"cores": 0}, "--cores"),
        ({"memory": "16G"}, "--memory"),  # ambiguous, as in a job spec
        ({"memory": "1KiB"}, "--memory"),
        ({"job_name": "my pilot"}, "--job-name"),
        ({"name_prefix": "a-b"}, "--name-prefix"),
        ({"token_file": None}, "--token-file"),
        ({"credential_dir": "/creds"}, "--token-file"),  # both
        ({"pilot_dir": "pilots"}, "--pilot-dir"),
        ({"sbatch_args": ("--partition=other",)}, "--sbatch-arg"),
        ({"sbatch_args": ("-N4",)}, "--sbatch-arg"),
        ({"sbatch_args": ("--mem 4G",)}, "--sbatch-arg"),
        ({"sbatch_args": ("account",)}, "--sbatch-arg"),
        ({"sbatch_args": ("--comment=a\nb",)}, "--sbatch-arg"),
        ({"setup": ("",)}, "--setup"),
        ({"drain_margin": 50_000.0}, "--drain-margin"),
        ({"checkpoint_warning": -1.0}, "--checkpoint-warning"),
    ],
)
def test_every_pilot_value_is_checked_and_the_flag_named(change: dict[str, Any], flag: str) -> None:
    """Each invalid value of a pilot's shape is refused naming its flag."""
    fields = {name: getattr(SPEC, name) for name in SPEC.__struct_fields__} | change
    with pytest.raises(ConfigurationError) as caught:
        PilotSpec(**fields)
    assert caught.value.where == flag


# -- the allocation -------------------------------------------------------------------------------


def test_a_pilot_agent_takes_its_name_work_folder_capacity_and_labels_from_slurm() -> None:
    """Inside a job: named PREFIX-JOBID-NODE, working under the pilot folder, offering the
    allocation's CPUs and memory, labelled with its job and partition."""
    job = find_slurm_job(
        {
            "SLURM_JOB_ID": "812",
            "SLURMD_NODENAME": "gpu07",
            "SLURM_JOB_PARTITION": "gpu",
            "SLURM_CPUS_ON_NODE": "32",
            "SLURM_MEM_PER_NODE": "131072",
        }
    )
    assert job is not None
    args = argparse.Namespace(
        credential_dir=None,
        token_file="t",
        credential_file=None,
        name=None,
        name_prefix="pilot",
        work_dir=None,
        pilot_dir="/shared/pilots",
        cores=None,
        memory=None,
        labels=["fast"],
    )
    _fill_from_allocation(args, job)
    assert args.name == "pilot-812-gpu07"
    assert args.work_dir == "/shared/pilots/agents/812-gpu07"
    assert (args.cores, args.memory) == ("32", "131072MiB")
    assert args.labels == ["fast", "slurm", "slurm-job=812", "slurm-partition=gpu"]
    assert find_slurm_job({"PATH": "/bin"}) is None


async def test_the_end_comes_from_slurm_job_end_time_when_slurm_sets_it() -> None:
    """``$SLURM_JOB_END_TIME`` (epoch seconds) is the end; a malformed one names the variable."""
    job = find_slurm_job({"SLURM_JOB_ID": "5", "SLURM_JOB_END_TIME": "1773489600"})
    assert job is not None
    assert await job_end(job) == (
        datetime(2026, 3, 14, 12, 0, tzinfo=UTC),
        "$SLURM_JOB_END_TIME",
    )
    bad = find_slurm_job({"SLURM_JOB_ID": "5", "SLURM_JOB_END_TIME": "soon"})
    assert bad is not None
    with pytest.raises(ConfigurationError) as caught:
        await job_end(bad)
    assert caught.value.where == "$SLURM_JOB_END_TIME (environment)"


def test_scontrol_times_are_local_and_unknown_ones_none() -> None:
    """``EndTime`` is the local time of the host; ``Unknown`` means no end."""
    assert parse_slurm_time("2026-03-14T12:00:00") == datetime(2026, 3, 14, 12).astimezone()
    assert parse_slurm_time("Unknown") is None
    assert parse_slurm_time("None") is None


class FakeHandle:
    """A running attempt the test ends by hand; it records checkpoint requests."""

    def __init__(self, task: str, *, checkpointable: bool, clock: VirtualClock) -> None:
        self.spec = type("Spec", (), {"job_id": "sim", "task_id": task})()
        self.checkpointable = checkpointable
        self.clock = clock
        self.requests: list[float] = []
        self.done = anyio.Event()

    def request_checkpoint(self) -> bool:
        if self.checkpointable:
            self.requests.append(self.clock.monotonic())
        return self.checkpointable

    async def wait(self) -> None:
        await self.done.wait()


class FakeExecutor:
    def __init__(self, *handles: FakeHandle) -> None:
        self.handles = list(handles)

    def running(self) -> tuple[AttemptHandle, ...]:
        return tuple(cast(AttemptHandle, h) for h in self.handles if not h.done.is_set())


@asynccontextmanager
async def watching(
    clock: VirtualClock,
    executor: FakeExecutor,
    stop: anyio.Event,
    *,
    idle_timeout: float | None = None,
) -> AsyncIterator[None]:
    allocation = Allocation(
        end=T0 + timedelta(seconds=1000),
        source="test",
        checkpoint_warning=600,
        drain_margin=120,
        idle_timeout=idle_timeout,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            partial(
                watch_allocation,
                allocation,
                node_id="n1",
                clock=clock,
                executor=cast(Executor, executor),
                terminate_grace=10.0,
                stop=stop,
            )
        )
        yield
        with anyio.fail_after(WAIT):
            await stop.wait()


async def test_checkpointable_attempts_are_warned_and_the_agent_leaves_once_drained() -> None:
    """At end - checkpoint_warning only checkpointable attempts get SIGUSR1; after the drain
    the agent stops as soon as nothing runs."""
    clock = VirtualClock(T0)
    sim = FakeHandle("0", checkpointable=True, clock=clock)
    render = FakeHandle("1", checkpointable=False, clock=clock)
    stop = anyio.Event()
    async with watching(clock, FakeExecutor(sim, render), stop):
        await clock.advance(399)
        assert sim.requests == []
        await clock.advance(1)
        assert sim.requests == [400.0]
        await clock.advance(480)  # the drain (end - 120): the attempts are still yielding
        await anyio.wait_all_tasks_blocked()
        assert not stop.is_set()
        sim.done.set()
        await anyio.wait_all_tasks_blocked()
        assert not stop.is_set()
        render.done.set()
    assert clock.monotonic() == 880.0
    assert sim.requests == [400.0]


async def test_an_agent_whose_work_does_not_yield_stops_before_the_end() -> None:
    """Work still running at end - (terminate_grace + 5 s) does not keep the agent: it stops
    then, leaving itself the grace to terminate it before Slurm kills everything."""
    clock = VirtualClock(T0)
    stubborn = FakeHandle("0", checkpointable=False, clock=clock)
    stop = anyio.Event()
    async with watching(clock, FakeExecutor(stubborn), stop):
        await clock.advance(984)
        await anyio.wait_all_tasks_blocked()
        assert not stop.is_set()
        await clock.advance(1)
    assert clock.monotonic() == 985.0


async def test_an_idle_pilot_leaves_after_its_idle_timeout() -> None:
    """With an idle timeout the agent stops once it has run nothing for that long (counted
    from when its last attempt ended), giving its allocation back before the end."""
    clock = VirtualClock(T0)
    work = FakeHandle("0", checkpointable=False, clock=clock)
    stop = anyio.Event()
    async with watching(clock, FakeExecutor(work), stop, idle_timeout=120):
        await clock.advance(200)  # busy: never idle
        work.done.set()
        await clock.advance(119)
        await anyio.wait_all_tasks_blocked()
        assert not stop.is_set()
        await clock.advance(2)
    assert 320 <= clock.monotonic() <= 321


def _finished(outcome: str) -> AttemptFinished:
    return msgspec.convert(
        {
            "job_id": "j",
            "task_id": "0",
            "attempt": 1,
            "fencing_token": 3,
            "outcome": outcome,
            "error": "boom",
        },
        AttemptFinished,
    )


@pytest.mark.parametrize(
    ("outcome", "stopping", "slurm_says", "lost"),
    [
        ("failed", True, False, True),  # the agent is stopping: whatever Slurm says
        ("failed", False, True, True),  # Slurm is ending the job (scancel) before our SIGTERM
        ("failed", False, False, False),  # a real failure
        ("start_failed", True, False, True),
        ("completed", True, True, False),
        ("cancelled", True, True, False),  # the agent's own stop: preempted, requeued
        ("timed_out", False, True, False),
    ],
)
async def test_a_failure_caused_by_the_allocations_end_is_a_loss(
    outcome: str, stopping: bool, slurm_says: bool, lost: bool
) -> None:
    """Only a failure (or a failed start) while the allocation is being ended becomes lost."""

    async def ending() -> bool:
        return slurm_says

    allocation = Allocation(end=T0, source="test", ending=ending)
    report = _finished(outcome)
    assert await ended_by_allocation(report, allocation, stopping=stopping) is lost
    if lost:
        assert as_lost(report).outcome == "lost"
        assert "boom" in (as_lost(report).error or "")


async def test_not_knowing_the_allocations_state_keeps_the_failure() -> None:
    """scontrol failing (the controller is down) leaves a failure a failure."""
    from actors import SlurmError

    async def ending() -> bool:
        raise SlurmError("scontrol failed: timeout", command="scontrol")

    allocation = Allocation(end=T0, source="test", ending=ending)
    assert not await ended_by_allocation(_finished("failed"), allocation, stopping=False)
    started = AttemptStarted(job_id="j", task_id="0", attempt=1, fencing_token=3)
    assert not await ended_by_allocation(started, allocation, stopping=True)


def test_an_allocation_needs_an_aware_end() -> None:
    """A naive end time is refused (it would be read in whatever zone)."""
    with pytest.raises(ConfigurationError):
        Allocation(end=datetime(2026, 3, 14, 12), source="test")  # noqa: DTZ001


# -- status ---------------------------------------------------------------------------------------


def _node(name: str, *labels: str) -> NodeSummary:
    one = Resources.of(cores=1, memory="1GiB")
    return NodeSummary(name=name, health="online", capacity=one, free=one, labels=labels)


def _job(job_id: str) -> PilotJob:
    return PilotJob(
        job_id=job_id,
        name="taskfarm-pilot",
        state="RUNNING",
        partition="gpu",
        nodes=2,
        node_list="gpu[01-02]",
        time_left="1:00:00",
        end="N/A",
        reason="None",
    )


def test_status_pairs_each_pilot_with_its_agents_by_label() -> None:
    """Agents labelled slurm-job=ID sit beside pilot ID; those whose pilot ended are listed
    apart; other nodes are not a pilot's."""
    nodes = [
        _node("pilot-7-gpu01", "slurm", "slurm-job=7"),
        _node("pilot-7-gpu02", "slurm", "slurm-job=7"),
        _node("pilot-5-gpu03", "slurm", "slurm-job=5"),
        _node("render-01"),
    ]
    pilots, ended = match_pilots([_job("7"), _job("9")], nodes)
    assert [(p.job.job_id, [a.name for a in p.agents]) for p in pilots] == [
        ("7", ["pilot-7-gpu01", "pilot-7-gpu02"]),
        ("9", []),
    ]
    assert [node.name for node in ended] == ["pilot-5-gpu03"]


# -- the planned drain, with a real coordinator ---------------------------------------------------

TOKEN = b"slurm-test-join-token-0123456789abc"
HOST = "127.0.0.1"


class Gate:
    """In-process work that runs until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = anyio.Event()
        self.started: list[str] = []

    async def __call__(self, attempt: AttemptContext) -> None:
        self.started.append(attempt.spec.job_id)
        await self.opened.wait()


@asynccontextmanager
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    config = CoordinatorConfig(
        journal=tmp_path / "farm.db", token=TOKEN, port=0, work_dir=tmp_path / "work"
    )
    async with open_coordinator(config) as running:
        yield running


@dataclass
class RunningAgent:
    handle: AgentHandle
    scope: anyio.CancelScope  # cancel: the agent dies at once
    ended: anyio.Event


def _agent_files(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """Return the join token file (written once) and a fresh work folder for ``name``."""
    token_file = tmp_path / "join.token"
    if not token_file.exists():
        write_private_file(token_file, TOKEN.decode())
    return token_file, tmp_path / "agents" / f"{name}-{len(list(tmp_path.glob('agents/*')))}"


async def wait_until(predicate: Any) -> None:
    """Poll a cheap in-process predicate until it holds."""
    with anyio.fail_after(WAIT):
        while True:
            if predicate():
                return
            await anyio.sleep(0.02)


async def start_agent(
    tg: anyio.abc.TaskGroup,
    farm: Coordinator,
    tmp_path: Path,
    name: str,
    gate: Gate,
    allocation: Allocation | None,
) -> RunningAgent:
    """Run the real agent code as ``name``."""
    token_file, work = _agent_files(tmp_path, name)
    config = AgentConfig(
        host=HOST,
        port=farm.port,
        name=name,
        work_dir=str(work),
        capacity=Resources.of(cores=2, memory="1GiB"),
        token_file=str(token_file),
    )

    def open_executor(**options: Any) -> Any:
        return open_inprocess_executor({"gate": gate}, clock=options["clock"])

    scope = anyio.CancelScope()
    ended = anyio.Event()

    async def run(*, task_status: anyio.abc.TaskStatus[AgentHandle]) -> None:
        try:
            with scope:
                await run_agent(
                    config,
                    open_executor=open_executor,
                    allocation=allocation,
                    task_status=task_status,
                )
        finally:
            ended.set()

    handle = await tg.start(run)
    return RunningAgent(handle=handle, scope=scope, ended=ended)


async def wait_node(farm: Coordinator, name: str, check: Any) -> NodeSummary:
    with anyio.fail_after(WAIT):
        while True:
            node = next((n for n in await farm.engine.nodes() if n.name == name), None)
            if node is not None and check(node):
                return node
            await anyio.sleep(0.02)


JOBS = """
[[jobs]]
name = "{name}"
command = ["inprocess:gate"]
resources = {{ cores = 1, memory = "16MiB" }}
timeouts = {{ max_runtime = "{runtime}" }}
"""


async def test_an_allocation_agent_has_its_node_drained_before_the_end(tmp_path: Path) -> None:
    """The agent plans its node's drain at end - drain_margin: work that could not finish by
    then waits (and says why), work that can is placed."""
    gate = Gate()
    end = SystemClock().now() + timedelta(hours=1)
    allocation = Allocation(end=end, source="test", drain_margin=600)
    async with coordinator(tmp_path) as farm, anyio.create_task_group() as tg:
        await start_agent(tg, farm, tmp_path, "pilot-1-n1", gate, allocation)
        node = await wait_node(farm, "pilot-1-n1", lambda n: n.drain_at is not None)
        assert node.health == "online"
        assert node.drain_at == (end - timedelta(seconds=600)).isoformat()
        planned = [
            record.event
            for record in await farm.engine.journal.read_stream(node_stream("pilot-1-n1"))
            if isinstance(record.event, NodeHealthChanged)
        ]
        assert [(e.drain_at, e.by) for e in planned] == [(end - timedelta(seconds=600), "engine")]
        await farm.engine.submit_text(
            JOBS.format(name="long", runtime="2h") + JOBS.format(name="short", runtime="10m"),
            fmt="toml",
            source="jobs.toml",
        )
        await wait_until(lambda: gate.started == ["short"])
        assert "drains before it could finish" in await farm.engine.why("long")
        gate.opened.set()
        tg.cancel_scope.cancel()


async def test_an_operators_quarantine_outlasts_an_allocations_planned_drain(
    tmp_path: Path,
) -> None:
    """A node an operator quarantined stays quarantined when its agent comes back with an
    allocation: the agent's plan does not override a human's decision."""
    gate = Gate()
    allocation = Allocation(
        end=SystemClock().now() + timedelta(hours=1), source="test", drain_margin=60
    )
    logs: list[MutableMapping[str, Any]]
    async with coordinator(tmp_path) as farm, anyio.create_task_group() as tg:
        first = (await start_agent(tg, farm, tmp_path, "n1", gate, None)).scope
        await wait_node(farm, "n1", lambda n: n.health == "online")
        await farm.engine.set_node_health("n1", "quarantined", reason="bad disk")
        first.cancel()
        await wait_until(lambda: farm._connections.get("n1") is None)
        with structlog.testing.capture_logs() as logs:
            await start_agent(tg, farm, tmp_path, "n1", gate, allocation)
            await wait_until(lambda: [e for e in logs if e["event"] == "node_drain_not_planned"])
        node = await wait_node(farm, "n1", lambda n: True)
        assert (node.health, node.drain_at) == ("quarantined", None)
        tg.cancel_scope.cancel()


# -- the command line -----------------------------------------------------------------------------


def _run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli_main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A join token file; no coordinator or token from the environment.  main() points
    structlog at the captured stderr: undone afterwards for the tests that follow."""
    for variable in ("TASKFARM_COORDINATOR", "TASKFARM_TOKEN_FILE", "SLURM_JOB_ID"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "taskfarm.token"
    write_private_file(path, TOKEN.decode())
    yield path
    structlog.reset_defaults()


SUBMIT = ("slurm", "submit-agents", "--partition", "debug", "--time", "10:00", "--dry-run")


def test_submit_agents_dry_run_writes_the_script_and_says_where(
    capsys: pytest.CaptureFixture[str], token_file: Path, tmp_path: Path
) -> None:
    """--dry-run writes the script into the pilot folder (printing its path), submits
    nothing, and a second run never overwrites the first script."""
    argv = (*SUBMIT, "--connect", "login:7717", "--token-file", str(token_file), "--cores", "4")
    status, out, err = _run_cli(capsys, *argv)
    assert (status, err) == (0, "")
    (script,) = (tmp_path / "taskfarm-pilots").glob("*.sbatch")
    assert out == f"wrote {script}\n"
    text = script.read_text()
    assert "#SBATCH --cpus-per-task=4" in text
    assert f"    --token-file {token_file} \\" in text
    _run_cli(capsys, *argv)
    assert len(list((tmp_path / "taskfarm-pilots").glob("*.sbatch"))) == 2


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("--count", "0"), "--count"),
        (("--count", "many"), "--count"),
        (("--connect", ""), "--connect"),
        (("--token-file", "missing.token"), "missing.token"),
        (("--credential-dir", "nowhere"), "--credential-dir"),
        (("--checkpoint-warning", "soon"), "--checkpoint-warning"),
        (("--drain-margin", "2d"), "--drain-margin"),
        (("--terminate-grace", "-1"), "--terminate-grace"),
        (("--tls-ca", "missing.pem"), "--tls-ca"),
        (("--sbatch-arg=--time=1:00:00",), "--sbatch-arg"),
        (("--time", "forever"), "--time"),
        (("--label", "a b"), "--label"),
    ],
)
def test_submit_agents_names_the_flag_at_fault(
    capsys: pytest.CaptureFixture[str],
    token_file: Path,
    tmp_path: Path,
    args: tuple[str, ...],
    flag: str,
) -> None:
    """A bad submit-agents argument is one line naming its flag (exit 2); nothing is written."""
    base = ["--connect", "login:7717"]
    if "--token-file" not in args and "--credential-dir" not in args:
        base += ["--token-file", str(token_file)]
    status, _out, err = _run_cli(capsys, *SUBMIT, *base, *args)
    assert status == 2
    assert err.startswith("taskfarm: error: ")
    assert err.count("\n") == 1
    assert flag in err
    assert not list(tmp_path.rglob("*.sbatch"))


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (("slurm", "cancel"), "JOBID"),
        (("slurm", "cancel", "12", "--all"), "JOBID"),
        (("slurm", "cancel", "12;rm"), "JOBID"),
        (("slurm", "agent", "--connect", "h:1", "--token-file", "taskfarm.token"), "--end-time"),
        (
            (
                "slurm",
                "agent",
                "--connect",
                "h:1",
                "--token-file",
                "taskfarm.token",
                "--end-time",
                "2026-03-14T12:00:00",
            ),
            "--end-time",
        ),
    ],
)
def test_cancel_and_agent_name_the_argument_at_fault(
    capsys: pytest.CaptureFixture[str], token_file: Path, argv: tuple[str, ...], flag: str
) -> None:
    """cancel without ids (or with ids and --all, or a malformed id) and an agent outside Slurm
    without --end-time (or with a naive one) are one-line errors naming the argument."""
    status, _out, err = _run_cli(capsys, *argv)
    assert status == 2
    assert err.startswith("taskfarm: error: ")
    assert flag in err


async def test_a_stopping_allocation_agent_drains_its_node_before_reporting_its_work(
    tmp_path: Path,
) -> None:
    """An allocation agent that is stopped (scancel's SIGTERM) has its node drained first:
    the slots its stopped attempts free get no new work there, and they are requeued."""
    gate = Gate()
    allocation = Allocation(end=SystemClock().now() + timedelta(hours=1), source="test")
    async with coordinator(tmp_path) as farm, anyio.create_task_group() as tg:
        agent = await start_agent(tg, farm, tmp_path, "pilot-9-n1", gate, allocation)
        await wait_node(farm, "pilot-9-n1", lambda n: n.drain_at is not None)
        await farm.engine.submit_text(
            '[[jobs]]\nname = "three"\nframes = "1-3"\ncommand = ["inprocess:gate", "{frame}"]\n'
            'resources = { cores = 1, memory = "16MiB" }\n',
            fmt="toml",
            source="three.toml",
        )
        await wait_until(lambda: len(gate.started) == 2)  # two cores: the third task waits
        agent.handle.stop()
        with anyio.fail_after(WAIT):
            await agent.ended.wait()
        node = await wait_node(farm, "pilot-9-n1", lambda n: n.health.startswith("draining"))
        assert "being ended" in node.reason
        records = [
            r
            for r in [record async for batch in farm.engine.journal.read_all() for record in batch]
            if r.stream_id in (node_stream("pilot-9-n1"), job_stream("three"))
        ]
        drained = next(
            r.position
            for r in records
            if isinstance(r.event, NodeHealthChanged) and r.event.health == "draining"
        )
        requeued = [r.position for r in records if isinstance(r.event, TaskRequeued)]
        assigned = [r.position for r in records if isinstance(r.event, TaskAssigned)]
        assert len(requeued) == 2
        assert all(position > drained for position in requeued)
        assert len(assigned) == 2
        assert all(position < drained for position in assigned)
        assert len(gate.started) == 2
        tg.cancel_scope.cancel()
