"""Sleeping and waking nodes on a real cluster: ``taskfarm agent --sleep-command`` runs when the
coordinator puts an idle node to sleep, ``taskfarm serve --wake-command`` runs when a sleeping
node whose agent is away is woken.  Real coordinator and agent processes over loopback TCP; the
power commands are a small script that writes a marker file (and may SIGTERM its agent, as a
suspended host takes its agent away).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest
import structlog

from actors import NodeHealthChanged
from actors.cluster import WAKE_PLACEHOLDERS, CoordinatorConfig, open_coordinator, parse_command
from actors.engine import FarmView, FifoPolicy, NodeAction

if TYPE_CHECKING:
    from conftest import Cluster

pytestmark = pytest.mark.slow

POWER = Path(__file__).with_name("power_command.py")
MAC = "aa:bb:cc:dd:ee:01"
SMALL = 'resources = { cores = "100m", memory = "16MiB" }'
LIMIT = 60.0


def power(marker: Path, *arguments: str) -> str:
    """A power command line running the stand-in script, writing ``marker``."""
    return shlex.join([sys.executable, str(POWER), str(marker), *arguments])


async def ok(cluster: Cluster, *args: str) -> str:
    """Run a client command that must succeed; return its stdout."""
    with anyio.fail_after(LIMIT):
        result = await cluster.cli(*args)
    assert result.returncode == 0, (args, result.stderr.decode())
    return result.stdout.decode()


async def wait_file(cluster: Cluster, path: Path) -> list[str]:
    """Wait until the power script wrote ``path``; return its lines."""

    async def written() -> bool:
        return await anyio.Path(path).exists()

    await cluster.wait_until(written, what=f"{path.name} written", limit=LIMIT)
    return (await anyio.Path(path).read_text()).splitlines()


async def wait_exit(cluster: Cluster, process: subprocess.Popen[bytes]) -> int:
    """Wait until ``process`` exits; return its status."""

    async def exited() -> bool:
        return process.poll() is not None

    await cluster.wait_until(exited, what="the agent to exit", limit=LIMIT)
    assert process.returncode is not None
    return process.returncode


async def wait_count(cluster: Cluster, process: str, event: str, count: int) -> None:
    """Wait until ``process`` has logged ``event`` (for node n1) ``count`` times."""

    async def logged() -> bool:
        entries = cluster.log_entries(process)
        seen = [e for e in entries if e.get("event") == event and e.get("node_id") == "n1"]
        assert len(seen) <= count, seen
        return len(seen) == count

    await cluster.wait_until(logged, what=f"{process} to log {event} x{count}", limit=LIMIT)


def held_until(release: Path) -> list[str]:
    """A task's command that runs until ``release`` exists (polling is the work's business)."""
    code = (
        f"import pathlib, time\nwhile not pathlib.Path({str(release)!r}).exists(): time.sleep(0.05)"
    )
    return [sys.executable, "-c", code]


def job(name: str, command: list[str], resources: str = SMALL) -> str:
    return f"[[jobs]]\nname = {json.dumps(name)}\ncommand = {json.dumps(command)}\n{resources}\n"


async def test_sleep_runs_the_agents_command_and_resume_runs_the_wake_command(
    cluster: Cluster, tmp_path: Path
) -> None:
    """`node sleep` on an idle agent runs its --sleep-command (the node sleeps, not lost);
    `node resume` while it is away runs serve's --wake-command with {node} and {mac}, and the
    restarted agent brings the node back online to run the work queued meanwhile."""
    slept, woke = tmp_path / "slept", tmp_path / "woke"
    cluster.start_coordinator(
        "--wake-command",
        power(woke, "{node}", "{mac}", "{address}"),
        "--lease",
        "2",
        "--fence",
        "4.5",  # short, so that the test sees the node asleep past it
    )
    sleep_command = power(slept, "--stop-parent", "suspend")
    agent_flags = ("--label", f"mac={MAC}", "--sleep-command", sleep_command)
    agent = cluster.start_agent("n1", extra=agent_flags)
    await cluster.wait_online("n1")

    await ok(cluster, "node", "sleep", "n1", "--reason", "night")
    assert await wait_file(cluster, slept) == ["suspend"]
    await wait_exit(cluster, agent)  # the host "suspended": its agent is gone
    entry = await cluster.wait_for_log("agent-n1", "node_sleeping", node_id="n1")
    assert entry["reason"] == "night"
    await cluster.wait_for_log("coordinator", "node_sleep_requested", node_id="n1")
    # Past the fence the node is asleep offline, not lost.
    await cluster.wait_for_log("coordinator", "node_asleep_offline", node_id="n1")
    assert (await cluster.nodes())["n1"].health == "sleeping"
    lost = [e for e in cluster.coordinator_log() if e.get("event") == "node_lost"]
    assert lost == []  # asleep, expected to be away: not a warning

    (job_id,) = await cluster.submit(job("queued", ["true"]), source=f"{tmp_path}/spec.toml")
    await ok(cluster, "node", "resume", "n1")
    lines = await wait_file(cluster, woke)
    assert lines == ["n1", MAC, "127.0.0.1"]
    sent = await cluster.wait_for_log("coordinator", "node_wake_sent", node_id="n1")
    assert sent["by"] == "operator"
    (summary,) = await cluster.status(job_id)
    assert summary.status != "completed"  # nothing ran while the node slept

    cluster.agents.pop("n1")  # what wake-on-LAN does: the host, and its agent, start again
    cluster.start_agent("n1", extra=agent_flags)
    await cluster.wait_online("n1")
    done = await cluster.wait_finished(job_id)
    assert done[job_id].status == "completed"
    changes = [
        r.event.health
        for r in await cluster.journal_events()
        if r.stream_id == "node:n1" and isinstance(r.event, NodeHealthChanged)
    ]
    assert changes == ["sleeping", "online"]


async def test_sleep_waits_for_the_running_attempt(cluster: Cluster, tmp_path: Path) -> None:
    """A node put to sleep while an attempt runs there is told to sleep only once that
    attempt has ended; its agent then runs the sleep command."""
    slept, release = tmp_path / "slept", tmp_path / "release"
    cluster.start_coordinator()
    cluster.start_agent("n1", extra=("--sleep-command", power(slept, "suspend")))
    await cluster.wait_online("n1")
    # The work itself waits for the test's release file (polling is the workload's business).
    wait = (
        f"import pathlib, time\nwhile not pathlib.Path({str(release)!r}).exists(): time.sleep(0.05)"
    )
    (job_id,) = await cluster.submit(
        job("busy", [sys.executable, "-c", wait]), source=f"{tmp_path}/spec.toml"
    )
    await cluster.wait_job(
        job_id, lambda j: any(t.status == "running" for t in j.tasks), what="running"
    )

    await ok(cluster, "node", "sleep", "n1")
    deferred = await cluster.wait_for_log("coordinator", "node_sleep_deferred", node_id="n1")
    assert deferred["running"] == 1
    assert not slept.exists()
    assert not [e for e in cluster.log_entries("agent-n1") if e.get("event") == "node_sleeping"]

    release.touch()
    assert await wait_file(cluster, slept) == ["suspend"]
    done = await cluster.wait_finished(job_id)
    assert done[job_id].status == "completed"
    await cluster.wait_for_log("agent-n1", "node_sleep_command_done", node_id="n1")
    assert (await cluster.nodes())["n1"].health == "sleeping"


async def test_a_failing_sleep_command_and_a_wake_without_a_mac_are_logged(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A failing sleep command is logged with its exit status and last stderr line and the
    agent stays connected; an agent back while its node sleeps is told again; a wake command
    needing {mac} for a node without a mac= label is logged as node_wake_failed naming the
    node and the label."""
    woke = tmp_path / "woke"
    cluster.start_coordinator("--wake-command", power(woke, "{mac}"))
    failing = shlex.join([sys.executable, "-c", "import sys; sys.exit('no permission\\n' * 2)"])
    agent = cluster.start_agent("n1", extra=("--sleep-command", failing))
    await cluster.wait_online("n1")

    await ok(cluster, "node", "sleep", "n1")
    entry = await cluster.wait_for_log("agent-n1", "node_sleep_failed", node_id="n1")
    assert entry["status"] == 1
    assert entry["stderr"] == "no permission"
    assert agent.poll() is None
    await ok(cluster, "node", "resume", "n1")  # (a wake is tried: it was told to sleep)
    await cluster.wait_online("n1")

    await ok(cluster, "node", "sleep", "n1")
    await wait_count(cluster, "agent-n1", "node_sleep_failed", 2)
    # An agent that comes back while its node still sleeps is told again.
    cluster.kill_agent("n1")
    await wait_count(cluster, "coordinator", "agent_disconnected", 1)
    cluster.start_agent("n1", extra=("--sleep-command", failing))
    await wait_count(cluster, "agent-n1", "node_sleep_failed", 3)
    cluster.kill_agent("n1")
    await wait_count(cluster, "coordinator", "agent_disconnected", 2)
    await ok(cluster, "node", "resume", "n1")
    await wait_count(cluster, "coordinator", "node_wake_failed", 2)  # each resume tried one
    failed = [e for e in cluster.coordinator_log() if e.get("event") == "node_wake_failed"][-1]
    assert failed["missing"] == ["mac"]
    assert "no {mac} for node n1" in failed["error"]
    assert "mac= label" in failed["error"]
    assert not woke.exists()
    assert cluster.coordinator is not None
    assert cluster.coordinator.poll() is None


class SleepyFarm(FifoPolicy):
    """Sleeps every idle connected node beyond one; wakes its sleepers when work is queued."""

    def node_actions(self, farm: FarmView, now: datetime) -> Sequence[NodeAction]:
        if any(job.queued for job in farm.jobs.values()):
            return [
                NodeAction(node=name, health="online", reason="work waits")
                for name, view in sorted(farm.nodes.items())
                if view.health == "sleeping" and view.health_by == "policy"
            ]
        idle = sorted(
            name
            for name, view in farm.nodes.items()
            if view.health == "online" and view.reachable == "connected" and not view.running
        )
        return [NodeAction(node=name, health="sleeping", reason="idle") for name in idle[1:]]


async def test_a_policy_sleeps_a_node_for_real_and_wakes_it_for_queued_work(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A policy's node_actions sleep reaches the agent's --sleep-command, and its wake for
    queued work runs the coordinator's --wake-command (an in-process coordinator, real agent
    processes)."""
    slept, woke, release = tmp_path / "slept", tmp_path / "woke", tmp_path / "release"
    wake = parse_command(
        power(woke, "{node}", "{mac}"), where="--wake-command", placeholders=WAKE_PLACEHOLDERS
    )
    config = CoordinatorConfig(
        journal=cluster.journal,
        token=cluster.token,
        port=0,
        work_dir=tmp_path / "coordinator-work",
        heartbeat_interval=0.4,
        heartbeat_timeout=2.0,
        wake_command=wake,
    )
    flags = ("--sleep-command", power(slept, "--stop-parent", "suspend"))
    with structlog.testing.capture_logs() as logs:
        async with open_coordinator(config, policy=SleepyFarm()) as coordinator:
            cluster.port = coordinator.port
            cluster.start_agent("n1", extra=flags)
            await cluster.wait_online("n1")
            n2 = cluster.start_agent("n2", extra=("--label", f"mac={MAC}", *flags))
            assert await wait_file(cluster, slept) == ["suspend"]  # n2: idle beyond one
            await wait_exit(cluster, n2)
            assert (await cluster.nodes())["n2"].health == "sleeping"

            # Two tasks of a whole core each: one runs on n1, the other waits for n2.
            whole = 'resources = { cores = 1, memory = "16MiB" }'
            spec = job("wide", held_until(release), whole).replace(
                "[[jobs]]\n", '[[jobs]]\nframes = "1-2"\nchunk = 1\n'
            )
            (job_id,) = await cluster.submit(spec, source=f"{tmp_path}/spec.toml")
            assert await wait_file(cluster, woke) == ["n2", MAC]
            release.touch()
            cluster.agents.pop("n2")
            cluster.start_agent("n2", extra=("--label", f"mac={MAC}"))
            done = await cluster.wait_finished(job_id)
            assert done[job_id].status == "completed"
    sent = [e for e in logs if e["event"] == "node_wake_sent"]
    assert [(e["node_id"], e["by"]) for e in sent] == [("n2", "policy")]
    requested = [e["node_id"] for e in logs if e["event"] == "node_sleep_requested"]
    assert requested[0] == "n2"


async def test_a_node_told_to_sleep_is_woken_even_while_its_connection_lingers(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A suspended host's agent is frozen with its connection still open: `node resume` before
    the heartbeat timeout runs the wake command all the same, and the node carries on."""
    slept, woke = tmp_path / "slept", tmp_path / "woke"
    cluster.start_coordinator(
        "--wake-command", power(woke, "{node}", "{mac}"), heartbeat_timeout=60.0
    )
    flags = ("--label", f"mac={MAC}", "--sleep-command", power(slept, "--suspend-parent", "zz"))
    cluster.start_agent("n1", extra=flags)
    await cluster.wait_online("n1")

    await ok(cluster, "node", "sleep", "n1")
    assert await wait_file(cluster, slept) == ["zz"]  # the agent is frozen now
    await ok(cluster, "node", "resume", "n1")
    assert await wait_file(cluster, woke) == ["n1", MAC]
    assert not [e for e in cluster.coordinator_log() if e.get("event") == "agent_disconnected"]
    cluster.resume_agent("n1")  # the host woke up
    (job_id,) = await cluster.submit(job("after", ["true"]), source=f"{tmp_path}/spec.toml")
    done = await cluster.wait_finished(job_id)
    assert done[job_id].status == "completed"
