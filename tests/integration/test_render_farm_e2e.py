"""The render farm end to end with real processes: ``taskfarm serve --policy render-farm``, two
agents, an animation for one client rendered previews first with a deadline beside another
client's shot, an agent SIGKILLed mid-run, and the audit trail queried afterwards from the
journal (``taskfarm audit``), with ``taskfarm render status|clients|previews`` on the way."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from actors import JobSummary, TaskAssigned, TaskCompleted, TaskRequeued
from domains.render_farm import RENDER_CODEC, PriorityChanged
from persistence import EventCodec, RecordedEvent, open_sqlite_journal
from runtime import SystemClock

if TYPE_CHECKING:
    from conftest import Cluster

pytestmark = pytest.mark.slow

FARM = """
margin = "1m"
frame_estimate = "1s"
[[clients]]
id = "studio-a"
guaranteed = 60
[[clients]]
id = "studio-b"
guaranteed = 40
[energy]
mode = "performance"
[previews]
stride = 4
passes = [0.25]
"""
RENDERER = [sys.executable, "-m", "domains.render_farm.tiny_renderer"]
SIZE = ["--width", "160", "--height", "90", "--samples", "2"]


def _spec(out: Path, deadline: datetime) -> str:
    def argv(items: list[str]) -> str:
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    render = argv([*RENDERER, *SIZE, "--frames", "{start}-{end}", "--output", str(out / "shot")])
    passes = argv(
        [*RENDERER, *SIZE, "--frames", "{start}-{end}", "--step", "{stride}", "--quality",
         "{quality}", "--output", str(out / "shot")]
    )  # fmt: skip
    other = argv([*RENDERER, *SIZE, "--scene", "bounce", "--frames", "{start}-{end}",
                  "--output", str(out / "plate")])  # fmt: skip
    return f"""
[[jobs]]
name = "shot"
frames = "1-12"
chunk = 4
command = {render}
resources = {{ cores = 1, memory = "256MiB" }}
checkpointable = true
preemptible = true
[jobs.metadata.render]
client = "studio-a"
type = "animation"
deadline = {deadline.isoformat().replace("+00:00", "Z")}
frame_estimate = "1s"
preview = {{ command = {passes} }}

[[jobs]]
name = "plate"
frames = "1-4"
chunk = 4
command = {other}
resources = {{ cores = 1, memory = "256MiB" }}
[jobs.metadata.render]
client = "studio-b"
type = "compositing"
"""


async def _journal(path: Path) -> list[RecordedEvent]:
    from actors import ENGINE_CODEC

    codec = EventCodec(keep_undecodable=True)
    codec.update(ENGINE_CODEC)
    codec.update(RENDER_CODEC)
    async with open_sqlite_journal(path, clock=SystemClock(), codec=codec, read_only=True) as j:
        return [record async for batch in j.read_all() for record in batch]


async def test_a_render_farm_renders_previews_first_survives_a_lost_node_and_audits(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Previews first, a deadline verdict, two clients, a SIGKILLed agent whose chunk resumes
    on the other node from its last finished frame, and the audit trail from the journal."""
    farm = tmp_path / "farm.toml"
    farm.write_text(FARM, encoding="utf-8")
    cluster.start_coordinator("--policy", "render-farm", "--policy-config", str(farm))
    cluster.start_agent("n1", cores="1")
    cluster.start_agent("n2", cores="1")
    await cluster.wait_online("n1", "n2")
    deadline = datetime.now(UTC) + timedelta(minutes=3)
    out = tmp_path / "out"
    ids = await cluster.submit(_spec(out, deadline), source="shots.toml")
    assert ids == ["shot", "plate"]

    # The first tasks of the shot are its preview pass and its stride frames.
    await cluster.wait_job(
        "shot",
        lambda s: any(t.status == "running" and t.node == "n1" and t.index >= 1 for t in s.tasks),
        what="a frame of the shot running on n1",
    )
    status = await cluster.cli("render", "status", "--json")
    assert status.returncode == 0, status.stderr
    rows = {row["job"]: row for row in json.loads(status.stdout)}
    assert rows["shot"]["client"] == "studio-a"
    assert rows["shot"]["verdict"] in ("will meet", "at risk", "will miss")
    assert rows["shot"]["priority"] == "high"  # due within 24 h: lifted from medium
    why = await cluster.cli("why", "shot")
    assert why.returncode == 0, why.stderr
    explained = why.stdout.decode()
    assert "effective priority high" in explained, explained  # the policy's decision, and why
    assert "client: studio-a" in explained, explained
    assert "verdict: " in explained, explained
    cluster.kill_agent("n1")  # power lost mid-chunk

    done = await cluster.wait_finished("shot", "plate", limit=120)
    assert {job: s.status for job, s in done.items()} == {"shot": "completed", "plate": "completed"}
    _check_frames(out / "shot", 12)

    records = await _journal(cluster.journal)
    assigned = [
        r.event for r in records if r.stream_id == "job:shot" and isinstance(r.event, TaskAssigned)
    ]
    assert assigned[0].task == 0  # the preview pass is placed first
    lost = [
        r.event for r in records if r.stream_id == "job:shot" and isinstance(r.event, TaskRequeued)
    ]
    assert any(e.lost for e in lost)
    completed = {
        r.event.task
        for r in records
        if r.stream_id == "job:shot" and isinstance(r.event, TaskCompleted)
    }
    assert completed == set(range(len(_tasks(done["shot"]))))
    assert any(isinstance(r.event, PriorityChanged) for r in records)

    clients = await cluster.cli("render", "clients", "--json")
    assert {row["client"] for row in json.loads(clients.stdout)} == {"studio-a", "studio-b"}
    previews = await cluster.cli("render", "previews", "shot")
    assert previews.returncode == 0, previews.stderr
    assert "q0.25" in previews.stdout.decode()

    # The operator's commands: the energy mode (journaled), the configuration, a chart.
    mode = await cluster.cli("render", "mode", "balanced", "--reason", "night shift")
    assert mode.stdout.decode().strip() == "energy mode: balanced", mode.stderr
    shown = await cluster.cli("render", "config", "show")
    assert json.loads(shown.stdout)["mode"] == "balanced"
    reload = await cluster.cli("render", "config", "reload")
    assert reload.stdout.decode().splitlines()[0] == "no change", reload.stderr
    chart = await cluster.cli("render", "chart", "--out", str(tmp_path / "schedule.svg"))
    assert chart.returncode == 0, chart.stderr
    assert (tmp_path / "schedule.svg").read_text().startswith("<svg")

    whole = await _audit(cluster, "--json")
    assert "mode" in [entry["kind"] for entry in json.loads(whole.stdout)["entries"]]
    audit = await _audit(cluster, "--job", "shot", "--json")
    assert audit.returncode == 0, audit.stderr
    report = json.loads(audit.stdout)
    kinds = [entry["kind"] for entry in report["entries"]]
    for kind in ("submitted", "scheduled", "priority", "node lost", "preview", "finished"):
        assert kind in kinds, kinds
    [lost_entry] = [e for e in report["entries"] if e["kind"] == "node lost"]
    assert lost_entry["node"] == "n1"
    assert report["figures"]["job"]["client"] == "studio-a"
    assert report["figures"]["with_deadline"] == 1
    text = await _audit(cluster, "--client", "studio-b")
    assert b"plate" in text.stdout
    assert b"shot " not in text.stdout


async def _audit(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``taskfarm audit`` on the cluster's journal (a local tool: it reads the file)."""
    return await anyio.run_process(
        cluster.command("audit", "--journal", str(cluster.journal), *args),
        check=False,
        env=cluster.env("audit"),
    )


def _tasks(summary: JobSummary) -> list[int]:
    return [t.index for t in summary.tasks] or list(range(summary.tasks_total))


def _check_frames(folder: Path, count: int) -> None:
    frames = sorted(folder.glob("orbit_*.png"))
    assert len(frames) == count, frames
