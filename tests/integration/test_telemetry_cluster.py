"""Measured usage on a real cluster: agent processes sample real attempts, the coordinator
answers ``taskfarm usage`` and ``status --json``, end events carry totals, and an attempt over
its memory request times the agent's factor is stopped as ``oom``."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from actors import (
    Failure,
    FifoPolicy,
    JobView,
    RetryDecision,
    TaskCompleted,
    TaskFailed,
    TaskView,
)
from actors.cluster import (
    CancelJobRequest,
    CoordinatorConfig,
    UsageReply,
    UsageRequest,
    open_coordinator,
)

if TYPE_CHECKING:
    from conftest import Cluster

HOG = Path(__file__).parent.parent / "actors" / "workloads" / "hog.py"
MIB = 2**20


def hog_job(name: str, megabytes: int, cpu_s: float, then: str, *, memory: str = "") -> str:
    """A one-task job running the hog workload (``memory``: its request)."""
    command = json.dumps([sys.executable, str(HOG), str(megabytes), str(cpu_s), "0", then])
    resources = f'\n[jobs.resources]\nmemory = "{memory}"\n' if memory else ""
    return f"""
[[jobs]]
name = "{name}"
command = {command}
[jobs.retries]
max_attempts = 1
{resources}"""


async def test_samples_flow_to_taskfarm_usage_and_status_json(cluster: Cluster) -> None:
    """A running attempt's memory and CPU, sampled by its agent, reach ``taskfarm usage``
    (by job and by node, per minute) and ``status --json``."""
    cluster.start_coordinator()
    cluster.start_agent("u1", extra=("--sample-interval", "0.2"))
    await cluster.wait_online("u1")
    (job_id,) = await cluster.submit(hog_job("hog", 64, 0.3, "hang"))

    async def sampled() -> bool:
        reply = await cluster.ask(UsageRequest(job=job_id))
        assert isinstance(reply, UsageReply)
        return bool(reply.jobs) and reply.jobs[0].rss >= 64 * MIB and reply.jobs[0].cpu_s >= 0.25

    await cluster.wait_until(sampled, what="the hog's usage sampled")

    by_job = await cluster.cli("usage", "--job", job_id, "--json")
    assert by_job.returncode == 0, by_job.stderr
    data = json.loads(by_job.stdout)
    assert data["resolution"] == "minute"
    (job,) = data["jobs"]
    assert job["job_id"] == job_id
    assert job["nodes"] == ["u1"]
    assert job["attempts"] == 1
    assert job["rss"] >= 64 * MIB
    assert sum(point["cpu_s"] for point in data["points"]) >= 0.25
    assert max(point["rss_max"] for point in data["points"]) >= 64 * MIB

    by_node = json.loads((await cluster.cli("usage", "--node", "u1", "--json")).stdout)
    (node,) = by_node["nodes"]
    assert node["node"] == "u1"
    assert node["memory_available"] > 0
    assert node["scratch_free"] > 0
    assert node["attempts"] == 1
    assert by_node["points"][-1]["memory_available_min"] > 0

    table = await cluster.cli("usage", "--since", "10m")
    assert table.returncode == 0, table.stderr
    assert b"u1" in table.stdout
    assert job_id.encode() in table.stdout

    status = json.loads((await cluster.cli("status", "--json")).stdout)
    (summary,) = [j for j in status if j["job_id"] == job_id]
    assert summary["usage"]["rss"] >= 64 * MIB
    assert summary["usage"]["nodes"] == ["u1"]
    await cluster.ask(CancelJobRequest(job_id=job_id))


async def test_a_finished_attempt_records_its_totals_on_its_end_event(cluster: Cluster) -> None:
    """TaskCompleted carries the attempt's CPU seconds, peak memory and wall time, and the
    task's summary shows them."""
    cluster.start_coordinator()
    cluster.start_agent("u2")
    await cluster.wait_online("u2")
    (job_id,) = await cluster.submit(hog_job("short", 64, 0.3, "exit"))
    (done,) = (await cluster.wait_finished(job_id)).values()
    assert done.status == "completed", done
    (completed,) = [
        r.event
        for r in await cluster.journal_events()
        if r.stream_id == f"job:{job_id}" and isinstance(r.event, TaskCompleted)
    ]
    assert completed.cpu_s is not None  # an agent's subprocess is measured
    assert 0.25 <= completed.cpu_s < 10
    assert 64 * MIB <= completed.peak_rss < 1024 * MIB
    assert completed.runtime_s >= completed.cpu_s * 0.5
    (task,) = done.tasks
    assert (task.cpu_s, task.peak_rss) == (completed.cpu_s, completed.peak_rss)


async def test_memory_over_the_agents_factor_stops_the_attempt_as_oom(cluster: Cluster) -> None:
    """An agent with --memory-limit-factor 1.5 stops an attempt resident at 96 MiB that asked
    for 16 MiB; it ends ``oom`` (failure class oom), and the job fails after its one attempt."""
    cluster.start_coordinator()
    cluster.start_agent("u3", extra=("--sample-interval", "0.2", "--memory-limit-factor", "1.5"))
    await cluster.wait_online("u3")
    (job_id,) = await cluster.submit(hog_job("greedy", 96, 0.0, "hang", memory="16MiB"))
    (done,) = (await cluster.wait_finished(job_id)).values()
    assert done.status == "failed", done
    (failed,) = [
        r.event
        for r in await cluster.journal_events()
        if r.stream_id == f"job:{job_id}" and isinstance(r.event, TaskFailed)
    ]
    assert (failed.outcome, failed.kind) == ("oom", "oom")
    assert failed.error is not None
    assert "exceeded 1.5 x its request of 16 MiB" in failed.error
    assert failed.peak_rss > 24 * MIB  # over 1.5 x 16 MiB when it was stopped


class MoreMemoryAfterOom(FifoPolicy):
    """Retries an attempt stopped as ``oom`` at once with twice its memory request."""

    name = "more-memory"

    def on_failure(
        self, job: JobView, task: TaskView, failure: Failure, default: RetryDecision, now: datetime
    ) -> RetryDecision:
        if failure.kind == "oom":
            bigger = msgspec.structs.replace(task.request, memory=task.request.memory * 2)
            return RetryDecision(action="retry", resources=bigger)
        return default


async def test_a_policy_retries_an_oom_stop_with_more_memory(cluster: Cluster) -> None:
    """A policy's on_failure answers the agent's oom stop with twice the memory: the second
    attempt (request 64 MiB, limit 96 MiB) holds its ~58 MiB and completes."""
    config = CoordinatorConfig(
        journal=cluster.journal,
        token=cluster.token,
        port=0,
        work_dir=cluster.root / "coordinator-work",
        heartbeat_interval=0.4,
        heartbeat_timeout=2.0,
    )
    async with open_coordinator(config, policy=MoreMemoryAfterOom()) as coordinator:
        cluster.port = coordinator.port
        cluster.start_agent(
            "u4", extra=("--sample-interval", "0.1", "--memory-limit-factor", "1.5")
        )
        await cluster.wait_online("u4")
        # 48 MiB on top of the interpreter, then a second of CPU: sampled while resident.
        (job_id,) = await cluster.submit(hog_job("grows", 48, 1.0, "exit", memory="32MiB"))
        (done,) = (await cluster.wait_finished(job_id)).values()
        assert done.status == "completed", done
        records = await cluster.journal_events()
    (failed,) = [
        r.event
        for r in records
        if r.stream_id == f"job:{job_id}" and isinstance(r.event, TaskFailed)
    ]
    assert failed.kind == "oom"
    assert failed.resources is not None
    assert failed.resources.memory == 64 * MIB
    (completed,) = [
        r.event
        for r in records
        if r.stream_id == f"job:{job_id}" and isinstance(r.event, TaskCompleted)
    ]
    assert completed.peak_rss > 48 * MIB
    assert done.tasks[0].attempt == 2
