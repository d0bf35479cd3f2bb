"""Choosing a policy, its commands and events, licence counters and what a restarted
coordinator says, against real ``taskfarm serve`` processes.

The policy plugin lives in ``plugin/`` beside this file (a module and the ``.dist-info`` that
registers it under ``taskfarm.policies`` and ``taskfarm.events``); the processes find it
through ``PYTHONPATH``, as an installed domain package would be found.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from actors import TaskCompleted, TaskStarted
from actors.cli import RequestError, add_client_arguments, run_policy_command

if TYPE_CHECKING:
    from conftest import Cluster

pytestmark = pytest.mark.slow

PLUGIN = Path(__file__).with_name("plugin")
WORK = Path(__file__).with_name("operator_work.py")
LIMIT = 60.0


def client_args(cluster: Cluster, *extra: str) -> argparse.Namespace:
    """The parsed client flags a domain CLI module would get (``add_client_arguments``)."""
    parser = argparse.ArgumentParser()
    add_client_arguments(parser)
    return parser.parse_args([*cluster.client_args(), *extra])


async def output(cluster: Cluster, *args: str) -> str:
    """Run a taskfarm command that must succeed; return its stdout."""
    with anyio.fail_after(LIMIT):
        result = await cluster.cli(*args)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def offline(cluster: Cluster, *args: str) -> str:
    """Run a taskfarm command that takes no client flags; return its stdout."""
    with anyio.fail_after(LIMIT):
        result = await anyio.run_process(
            cluster.command(*args), check=False, env=cluster.env("cli")
        )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def next_line(cluster: Cluster) -> str:
    """Read the coordinator's next line of output (after the address line)."""
    assert cluster.coordinator is not None
    assert cluster.coordinator.stdout is not None
    return cluster.coordinator.stdout.readline()


async def test_a_plugin_policy_runs_its_commands_columns_and_events_across_a_restart(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve --policy NAME --policy-config FILE runs a taskfarm.policies plugin: its columns
    show in status and why, its commands run over the wire with the roles it names, their
    events are journaled (and decoded by replay), and a restart replays them; the restarted
    coordinator prints what it recovered."""
    monkeypatch.setenv("PYTHONPATH", str(PLUGIN))
    config = cluster.root / "policy.toml"
    config.write_text('label = "night"\n')
    policy = ("--policy", "test-deadline", "--policy-config", str(config))
    cluster.start_coordinator(*policy)
    cluster.start_agent("a1")
    await cluster.wait_online("a1")
    spec = (
        '[[jobs]]\nname = "shot"\nmetadata = { deadline = 2025-03-14T18:00:00Z }\n'
        f"command = {json.dumps([sys.executable, str(WORK), 'quiet'])}\n"
        'resources = { cores = "100m", memory = "16MiB" }\n'
    )
    assert await cluster.submit(spec) == ["shot"]
    await cluster.wait_job("shot", lambda j: j.tasks[0].status == "running", what="running")
    status = await output(cluster, "status", "shot")
    assert "    deadline: 2025-03-14T18:00:00Z" in status.splitlines()
    assert "    shift: night" in status.splitlines()
    assert "deadline: 2025-03-14T18:00:00Z" in await output(cluster, "why", "shot")
    (data,) = json.loads(await output(cluster, "status", "shot", "--json"))
    assert data["domain"] == {"deadline": "2025-03-14T18:00:00Z", "shift": "night"}

    admin = client_args(cluster)
    assert await run_policy_command(admin, "bump", {"by": 2}) == {"bumps": 2}
    with pytest.raises(RequestError, match="by: expected a whole number") as bad:
        await run_policy_command(admin, "bump", {"by": "two"})
    assert bad.value.exit_status == 2
    with pytest.raises(RequestError, match="has no command 'nope'"):
        await run_policy_command(admin, "nope")
    reader = cluster.root / "reader.cred"
    await output(
        cluster, "token", "issue", "--client", "reader", "--role", "read", "--out", str(reader)
    )
    as_reader = client_args(cluster, "--credential-file", str(reader))
    assert await run_policy_command(as_reader, "count") == {"bumps": 2, "shift": "night"}
    with pytest.raises(
        RequestError,
        match="access denied: 'reader' \\(role read\\) may not run the policy command 'bump'",
    ) as denied:
        await run_policy_command(as_reader, "bump")
    assert denied.value.exit_status == 2

    cluster.kill_coordinator()
    cluster.start_coordinator(*policy)
    recovered = await anyio.to_thread.run_sync(next_line, cluster)
    assert recovered.startswith(
        "recovered 1 job(s) (1 unfinished), 1 attempt(s) in doubt (their agents have 4 s to "
        "re-claim them), 1 node(s) from "
    ), recovered
    entry = await cluster.wait_for_log("coordinator", "coordinator_recovered")
    assert (entry["jobs"], entry["unfinished"], entry["in_doubt"], entry["nodes"]) == (1, 1, 1, 1)
    await cluster.wait_until(
        lambda: _count_is(admin, 2), what="the restarted policy replayed its events"
    )
    replay = json.loads(
        await offline(
            cluster, "replay", str(cluster.journal), "--stream", "policy:test-deadline", "--json"
        )
    )
    stream = replay["streams"]["policy:test-deadline"]
    assert stream["events_by_tag"] == {"verbstest.bumped": 1}
    assert replay["undecoded"] == []
    await output(cluster, "cancel", "shot")


async def _count_is(args: argparse.Namespace, bumps: int) -> bool:
    result = await run_policy_command(args, "count")
    return isinstance(result, dict) and result.get("bumps") == bumps


async def test_serve_refuses_an_unknown_policy_naming_the_known_ones(cluster: Cluster) -> None:
    """serve --policy with a name nobody registered exits 2 listing the known policies."""
    argv = cluster.command(
        "serve",
        "--journal",
        str(cluster.root / "x.db"),
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        str(cluster.token_file),
        "--policy",
        "fastest",
    )
    with anyio.fail_after(LIMIT):
        result = await anyio.run_process(argv, check=False, env=cluster.env("serve"))
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        "taskfarm: error: --policy: unknown policy 'fastest'; known policies: fifo, "
        "priority-preemption, render-farm, science"
    ]
    assert not (cluster.root / "x.db").exists()


async def test_farm_wide_and_node_local_counters(cluster: Cluster) -> None:
    """The README's comp resources (counters = { nuke = 1 }) run on a farm started with
    --counter nuke=1, one at a time although the node has room for two; a node-local counter
    (agent --counter houdini=1) draws work that needs it to that node."""
    cluster.start_coordinator("--counter", "nuke=1")
    cluster.start_agent("big", cores="4", extra=("--memory", "16GiB"))
    cluster.start_agent("fx", cores="1", extra=("--counter", "houdini=1"))
    await cluster.wait_online("big", "fx")
    sleep = json.dumps([sys.executable, "-c", "import time; time.sleep(1)"])
    spec = f"""
[[jobs]]
name = "comp"
frames = "1-2"
chunk = 1
command = {sleep}
resources = {{ cores = "1500m", memory = "8GiB", counters = {{ nuke = 1 }} }}

[[jobs]]
name = "sim"
command = {sleep}
resources = {{ cores = "100m", memory = "16MiB", counters = {{ houdini = 1 }} }}
"""
    assert await cluster.submit(spec) == ["comp", "sim"]
    done = await cluster.wait_finished("comp", "sim")
    assert done["comp"].status == "completed"
    assert done["sim"].status == "completed"
    assert done["sim"].tasks[0].nodes == ("fx",)
    times: dict[tuple[str, int], float] = {}
    for record in await cluster.journal_events():
        event = record.event
        if record.stream_id == "job:comp" and isinstance(event, TaskStarted | TaskCompleted):
            times[(type(event).__name__, event.task)] = record.timestamp.timestamp()
    first, second = sorted((0, 1), key=lambda t: times[("TaskStarted", t)])
    assert times[("TaskStarted", second)] >= times[("TaskCompleted", first)]  # never together
