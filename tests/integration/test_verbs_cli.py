"""The operator verbs and what an operator sees, end to end: a real ``taskfarm serve``, real
agents running real processes, and every verb run as a ``taskfarm`` command, checked by its
exit status, its output (text and ``--json``) and the event the journal keeps.

The tests share one farm (a coordinator and two agents); each uses jobs of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from anyio.streams.text import TextReceiveStream

from actors import (
    JobAmended,
    JobPaused,
    JobReopened,
    JobResumed,
    JobSummary,
    NodeHealthChanged,
    TaskCheckpointed,
    TaskCheckpointRequested,
    TaskPreempted,
)

if TYPE_CHECKING:
    from conftest import Cluster

pytestmark = pytest.mark.slow

WORK = Path(__file__).with_name("operator_work.py")
SMALL = 'resources = { cores = "100m", memory = "16MiB" }'
LIMIT = 60.0


def command(*args: str) -> str:
    """A spec's ``command`` running the operator workload."""
    return json.dumps([sys.executable, str(WORK), *args])


@pytest.fixture(scope="module")
def farm(module_cluster: Cluster) -> Cluster:
    """A coordinator with two agents: a1 (for the work) and a2 (for the node verbs)."""
    module_cluster.start_coordinator()
    module_cluster.start_agent("a1", cores="8")
    module_cluster.start_agent("a2", cores="1", extra=("--label", "spare"))
    anyio.run(module_cluster.wait_online, "a1", "a2")
    return module_cluster


async def run(farm: Cluster, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run a client command against the farm (bounded in time)."""
    with anyio.fail_after(LIMIT):
        return await farm.cli(*args)


async def ok(farm: Cluster, *args: str) -> str:
    """Run a client command that must succeed; return its stdout."""
    result = await run(farm, *args)
    assert result.returncode == 0, (args, result.stderr.decode())
    assert not result.stderr, result.stderr.decode()
    return result.stdout.decode()


async def refused(farm: Cluster, status: int, *args: str) -> str:
    """Run a client command that must fail with ``status``; return its one stderr line."""
    result = await run(farm, *args)
    stderr = result.stderr.decode()
    assert result.returncode == status, (args, result.returncode, stderr)
    assert len(stderr.splitlines()) == 1, stderr
    assert "Traceback" not in stderr
    return stderr


async def events_of(farm: Cluster, stream: str, kind: type) -> list[Any]:
    """Return the journaled events of one type in one stream."""
    return [
        r.event
        for r in await farm.journal_events()
        if r.stream_id == stream and isinstance(r.event, kind)
    ]


async def submit(farm: Cluster, text: str) -> list[str]:
    return await farm.submit(text, source=f"{farm.root}/spec.toml")


def task(job: JobSummary, name: str) -> Any:
    return next(t for t in job.tasks if t.name == name)


async def test_status_shows_names_frames_elapsed_blocked_previews_and_metrics(
    farm: Cluster,
) -> None:
    """status JOB shows tasks by name with node, attempt, 'running M:SS' for a task without
    progress, blocked dependants, the latest preview and metric; --json has the metric series
    and elapsed time; without a job, tasks only with --tasks; why names stages."""
    await submit(
        farm,
        f"""
[[jobs]]
name = "sim"
command = {command("quiet")}
{SMALL}
[[jobs.tasks]]
name = "stage-1"
[[jobs.tasks]]
name = "stage-2"
depends_on = ["stage-1"]

[[jobs]]
name = "shot"
frames = "1-4"
chunk = 2
command = {command("report", "{start}")}
{SMALL}
""",
    )
    sim = await farm.wait_job(
        "sim", lambda j: task(j, "stage-1").status == "running", what="stage-1 running"
    )
    node = task(sim, "stage-1").node
    assert node in ("a1", "a2")
    await farm.wait_job(
        "shot",
        lambda j: all(t.metrics and t.progress >= 0.5 for t in j.tasks),
        what="both chunks report",
    )
    text = await ok(farm, "status", "sim")
    rows = {
        line.split()[0]: line.split() for line in text.splitlines()[2:] if line.startswith("    ")
    }
    assert rows["stage-1"][:4] == ["stage-1", "running", node, "1"]
    assert rows["stage-1"][4] == "running"
    assert rows["stage-1"][5].count(":") == 1  # running M:SS
    assert rows["stage-2"][:2] == ["stage-2", "blocked"]
    assert "task 0" not in text
    assert "1 running, 1 blocked" in text.splitlines()[1]
    why = await ok(farm, "why", "sim")
    assert "stage-2: waits on sim[stage-1] to finish (on_success)" in why, why

    shot = await ok(farm, "status", "shot")
    assert "preview: /previews/0.png" in shot
    assert "metrics: psnr=1" in shot
    assert "metrics: psnr=3" in shot
    (data,) = json.loads(await ok(farm, "status", "shot", "--json"))
    assert [t["name"] for t in data["tasks"]] == ["1-2", "3-4"]
    assert [t["frames"] for t in data["tasks"]] == [[1, 2], [3, 4]]
    assert [t["preview"] for t in data["tasks"]] == ["/previews/0.png", "/previews/1.png"]
    assert all(t["elapsed_s"] >= 0 and t["started_at"] for t in data["tasks"])
    assert sorted(data["metric_series"]["psnr"]) == [[0, 1.0], [1, 3.0]]
    every = json.loads(await ok(farm, "status", "--json"))
    assert {"sim", "shot"} <= {job["job_id"] for job in every}
    assert not [job for job in every if "tasks" in job]  # not a misleading "tasks": []
    detailed = json.loads(await ok(farm, "status", "--json", "--tasks"))
    assert {job["job_id"]: len(job["tasks"]) for job in detailed}["shot"] == 2

    # A cancelled task's attempt keeps its log; an attempt that never ran is an error.
    await ok(farm, "cancel", "sim")
    await ok(farm, "cancel", "shot")
    await farm.wait_finished("sim", "shot")
    log = await ok(farm, "logs", "sim", "stage-1", "--attempt", "1")
    assert log.startswith(f"== task stage-1, attempt 1, on {node}")
    assert "quiet started, attempt 1" in log
    assert "has not run yet" in await refused(farm, 2, "logs", "sim", "stage-2")
    assert "has no attempt 2 (attempt 1 ran)" in await refused(
        farm, 2, "logs", "sim", "stage-1", "--attempt", "2"
    )
    assert "has no task 'stage-9'" in await refused(farm, 2, "logs", "sim", "stage-9")
    assert "== task 3-4, attempt 1, on " in await ok(farm, "logs", "shot", "3-4")


async def test_pause_kill_and_resume_run_the_task_again(farm: Cluster) -> None:
    """pause --mode kill stops the running attempt (requeued, no attempt spent) and starts
    nothing; resume runs it again; both are journaled; a finished job refuses them (exit 1)."""
    await submit(farm, f'[[jobs]]\nname = "paused"\ncommand = {command("quiet")}\n{SMALL}\n')
    await farm.wait_job("paused", lambda j: j.tasks[0].status == "running", what="running")
    data = json.loads(await ok(farm, "pause", "paused", "--mode", "kill", "--json"))
    assert data["status"] == "paused"
    assert "tasks" not in data
    job = await farm.wait_job("paused", lambda j: j.tasks[0].status == "pending", what="requeued")
    assert job.status == "paused"
    assert "the job is paused" in await ok(farm, "why", "paused")
    out = await ok(farm, "resume", "paused")
    assert out.startswith("resumed paused\n")
    await farm.wait_job(
        "paused",
        lambda j: j.tasks[0].status == "running" and j.tasks[0].attempt == 2,
        what="running again",
    )
    [paused] = await events_of(farm, "job:paused", JobPaused)
    assert paused.mode == "kill"
    assert len(await events_of(farm, "job:paused", JobResumed)) == 1
    await ok(farm, "cancel", "paused")
    await farm.wait_finished("paused")
    stderr = await refused(farm, 1, "pause", "paused")
    assert "job paused already cancelled: nothing to pause" in stderr
    assert "nothing to resume" in await refused(farm, 1, "resume", "paused")
    assert "no job 'nosuch'" in await refused(farm, 2, "pause", "nosuch")


async def test_amend_changes_priority_and_metadata_as_journaled(farm: Cluster) -> None:
    """amend --priority --set KEY=VALUE (JSON, a TOML date-time, a string) is journaled
    readably and shows in status; nothing to change or a bad priority is exit 2."""
    await submit(farm, f'[[jobs]]\nname = "amended"\ncommand = {command("quiet")}\n{SMALL}\n')
    out = await ok(
        farm,
        "amend",
        "amended",
        "--priority",
        "critical",
        "--set",
        "deadline=2025-03-14T18:00:00Z",
        "--set",
        "shots=[10, 20]",
        "--set",
        "client=acme",
    )
    assert out.splitlines()[0].startswith("amended amended: priority critical, deadline = ")
    (job,) = await farm.status("amended")
    assert job.priority == "critical"
    [amended] = await events_of(farm, "job:amended", JobAmended)
    assert set(amended.changes) == {
        "priority: medium -> critical",
        'client: null -> "acme"',
        'deadline: null -> "2025-03-14T18:00:00Z"',
        "shots: null -> [10, 20]",
    }
    assert "give --priority" in await refused(farm, 2, "amend", "amended")
    assert "unknown priority 'urgent'" in await refused(
        farm, 2, "amend", "amended", "--priority", "urgent"
    )
    assert "expected KEY=VALUE" in await refused(farm, 2, "amend", "amended", "--set", "x")
    await ok(farm, "cancel", "amended")


async def test_retry_by_name_reruns_a_failed_task(farm: Cluster) -> None:
    """A job failed by one task is reopened by retry TASK (a name) and completes; retrying
    a completed job is exit 1; an unknown task exit 2."""
    marker = farm.root / "failed-once"
    await submit(
        farm,
        f"""
[[jobs]]
name = "flaky"
command = {command("fail-once", str(marker))}
retries = {{ max_attempts = 1 }}
{SMALL}
[[jobs.tasks]]
name = "render"
""",
    )
    (job,) = (await farm.wait_finished("flaky")).values()
    assert job.status == "failed"
    assert "has no task 'nope'" in await refused(farm, 2, "retry", "flaky", "nope")
    out = await ok(farm, "retry", "flaky", "render")
    assert out == "retrying 1 task(s) of flaky: render\n"
    (job,) = (await farm.wait_finished("flaky")).values()
    assert job.status == "completed"
    assert job.tasks[0].attempt == 2
    assert len(await events_of(farm, "job:flaky", JobReopened)) == 1
    assert "nothing to retry in job flaky" in await refused(farm, 1, "retry", "flaky")


async def test_checkpoint_and_preempt_reach_the_running_process(farm: Cluster) -> None:
    """checkpoint JOB TASK sends SIGUSR1 (the process reports a checkpoint); preempt
    checkpoints and yields it, and the next attempt resumes from that checkpoint; a task that
    is not running is exit 1."""
    await submit(
        farm,
        f"""
[[jobs]]
name = "ckpt"
checkpointable = true
command = {command("report", "7")}
{SMALL}
[[jobs.tasks]]
name = "solve"
""",
    )
    await farm.wait_job("ckpt", lambda j: j.tasks[0].progress >= 0.5, what="reporting")
    out = await ok(farm, "checkpoint", "ckpt", "solve")
    assert out == "asked task solve (index 0) of ckpt to checkpoint now\n"
    job = await farm.wait_job(
        "ckpt", lambda j: j.tasks[0].checkpoint is not None, what="a checkpoint"
    )
    assert job.tasks[0].checkpoint is not None
    assert job.tasks[0].checkpoint.endswith("state-1")
    assert len(await events_of(farm, "job:ckpt", TaskCheckpointRequested)) >= 1
    data = json.loads(await ok(farm, "preempt", "ckpt", "0", "--json"))
    assert data == {"job_id": "ckpt", "task": 0, "name": "0", "done": True}
    await farm.wait_job(
        "ckpt",
        lambda j: j.tasks[0].attempt == 2 and j.tasks[0].status == "running",
        what="the second attempt",
    )
    assert len(await events_of(farm, "job:ckpt", TaskPreempted)) == 1
    assert len(await events_of(farm, "job:ckpt", TaskCheckpointed)) >= 1

    async def resumed() -> bool:
        result = await run(farm, "logs", "ckpt", "solve")
        return "resumed from" in result.stdout.decode()

    await farm.wait_until(resumed, what="the second attempt resumed", limit=LIMIT)
    await ok(farm, "cancel", "ckpt")
    await farm.wait_finished("ckpt")
    stderr = await refused(farm, 1, "checkpoint", "ckpt", "solve")
    assert "task solve of job ckpt has no running attempt: nothing to checkpoint" in stderr
    assert "nothing to preempt" in await refused(farm, 1, "preempt", "ckpt", "solve")


async def test_node_verbs_drain_sleep_resume_release_and_plan_a_drain(farm: Cluster) -> None:
    """node drain|sleep|resume|release set the node's health (journaled, shown by nodes);
    drain --at +1h plans it; an unknown node or a time in the past is exit 2."""

    async def health() -> tuple[str, str | None, str]:
        node = (await farm.nodes())["a2"]
        return node.health, node.drain_at, node.reason

    out = await ok(farm, "node", "drain", "a2", "--reason", "kernel update")
    assert out.startswith("node a2: drain\n")
    assert await health() == ("draining", None, "kernel update")
    nodes = await ok(farm, "nodes")
    assert "kernel update" in nodes
    await ok(farm, "node", "resume", "a2")
    assert (await health())[0] == "online"
    await ok(farm, "node", "sleep", "a2")
    assert (await health())[0] == "sleeping"
    await ok(farm, "node", "release", "a2")
    assert (await health())[0] == "online"
    data = json.loads(await ok(farm, "node", "drain", "a2", "--at", "+1h", "--json"))
    assert data["name"] == "a2"
    assert data["health"] == "online"
    assert data["drain_at"] is not None
    await ok(farm, "node", "resume", "a2")
    changes = await events_of(farm, "node:a2", NodeHealthChanged)
    assert [(c.health, c.drain_at is not None, c.by) for c in changes][-6:] == [
        ("draining", False, "operator"),
        ("online", False, "operator"),
        ("sleeping", False, "operator"),
        ("online", False, "operator"),
        ("online", True, "operator"),  # the planned drain
        ("online", False, "operator"),
    ]
    assert (await health())[1] is None  # resume cancels a planned drain
    stderr = await refused(farm, 2, "node", "drain", "nosuchnode")
    assert "NODE: no node named 'nosuchnode' (nodes: a1, a2)" in stderr
    stderr = await refused(farm, 2, "node", "drain", "a2", "--at", "2001-01-01T00:00:00Z")
    assert "--at: 2001-01-01T00:00:00+00:00 is not in the future" in stderr
    assert "--at: expected an ISO-8601 time" in await refused(
        farm, 2, "node", "drain", "a2", "--at", "soon"
    )


async def test_status_watch_shows_counts_and_an_eta_until_done(farm: Cluster) -> None:
    """status --watch JOB prints the running, pending and blocked counts and an ETA as they
    change, and ends when the job has finished."""
    spec = f"""
[[jobs]]
name = "watched"
command = {command("quiet")}
{SMALL}
[[jobs.tasks]]
name = "a"
[[jobs.tasks]]
name = "b"
depends_on = ["a"]
"""
    await submit(farm, spec)
    argv = farm.command("status", "--watch", "watched", *farm.client_args())
    output = ""
    with anyio.fail_after(LIMIT):
        async with await anyio.open_process(argv, env=farm.env("cli")) as process:
            assert process.stdout is not None
            async for text in TextReceiveStream(process.stdout):
                output += text
                if "1 running, 0 pending, 1 blocked, 0/2 done" in output:
                    break
            await ok(farm, "cancel", "watched")
            async for text in TextReceiveStream(process.stdout):
                output += text
    lines = output.splitlines()
    assert process.returncode == 0
    running = next(line for line in lines if "1 running, 0 pending, 1 blocked" in line)
    assert running.startswith("watched active 0%")
    assert running.endswith("ETA -")  # no progress reported: no rate yet
    assert lines[-1].startswith("watched cancelled")


async def test_roles_guard_the_verbs(farm: Cluster) -> None:
    """A read client may look but not pause (exit 2, access denied); an operator may."""
    await submit(farm, f'[[jobs]]\nname = "guarded"\ncommand = {command("quiet")}\n{SMALL}\n')
    files = {}
    for role in ("read", "operator"):
        files[role] = farm.root / f"{role}.cred"
        await ok(
            farm,
            "token",
            "issue",
            "--client",
            f"{role}-person",
            "--role",
            role,
            "--out",
            str(files[role]),
        )
    as_reader = ("--credential-file", str(files["read"]))
    stderr = await refused(farm, 2, "pause", "guarded", *as_reader)
    assert "access denied: 'read-person' (role read) may not pause" in stderr
    assert "access denied" in await refused(farm, 2, "node", "drain", "a2", *as_reader)
    await ok(farm, "status", "guarded", *as_reader)
    await ok(farm, "pause", "guarded", "--credential-file", str(files["operator"]))
    await ok(farm, "cancel", "guarded")
