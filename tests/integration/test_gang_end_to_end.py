"""A two-node task on three real agents: its ranks meet over TCP through the host list; the
agent of one member is SIGKILLed mid-run; the attempt ends on every node (no orphan rank) and
is requeued as one, completing on the two nodes that are left."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from actors import JobSummary, TaskAssigned, TaskRequeued

if TYPE_CHECKING:
    from conftest import Cluster

RANK = Path(__file__).resolve().parent / "gang_rank.py"


def alive(pid: int) -> bool:
    """Return whether ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
async def test_a_two_node_task_survives_losing_a_member_agent(cluster: Cluster) -> None:
    """Ranks 0 and 1 exchange a message over TCP (TASKFARM_NODES, TASKFARM_PORT); SIGKILL
    rank 1's agent: rank 0 is stopped too, the attempt is requeued as lost, and the second
    attempt exchanges again and completes on the two remaining agents."""
    out = cluster.root / "out"
    command = [sys.executable, str(RANK), str(out), "--hold-first"]
    cluster.start_coordinator(heartbeat_timeout=2.0)
    for name in ("a1", "a2", "a3"):
        cluster.start_agent(name)
    await cluster.wait_online("a1", "a2", "a3")
    await cluster.submit(
        f"""
[[jobs]]
name = "gang"
nodes = 2
command = {json.dumps(command)}
resources = {{ cores = 1, memory = "64MiB" }}
"""
    )

    def exchanged(job: JobSummary) -> bool:
        return job.tasks[0].progress >= 0.5

    await cluster.wait_job("gang", exchanged, what="the ranks exchanged their messages")
    assert (out / "exchange-1.txt").read_text() == "hello from rank 1\n"
    first = [e for e in await _stream(cluster) if isinstance(e, TaskAssigned)]
    (assigned,) = first
    leader, member = assigned.nodes
    cluster.kill_agent(member)

    (done,) = (await cluster.wait_finished("gang", limit=120.0)).values()
    assert done.status == "completed", done
    stream = await _stream(cluster)
    requeued = [e for e in stream if isinstance(e, TaskRequeued)]
    assert len(requeued) == 1
    assert requeued[0].lost
    attempts = [e for e in stream if isinstance(e, TaskAssigned)]
    assert len(attempts) == 2
    assert set(attempts[1].nodes) == {"a1", "a2", "a3"} - {member}
    assert (out / "exchange-2.txt").read_text() == "hello from rank 1\n"
    # No orphan rank: the first attempt's rank 0, on an agent that lived, was stopped too.
    await cluster.wait_for_log(f"agent-{leader}", "attempt_finished", job_id="gang", attempt=1)
    for rank in (0, 1):
        pid = int((out / f"rank-1-{rank}.pid").read_text())
        assert not alive(pid), f"rank {rank} of the first attempt (pid {pid}) survived"
    assert (out / "rank-2-1.pid").is_file()


async def _stream(cluster: Cluster) -> list[object]:
    return [r.event for r in await cluster.journal_events() if r.stream_id == "job:gang"]
