"""Previews first: stride frames as single-frame tasks at the front, then the rest in chunks;
low-quality passes first of all, within their compute budget; the first preview of a
45-minute job by 4.5 minutes; previews listed per job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from actors import (
    AttemptSpec,
    FarmView,
    JobSubmittedObservation,
    Resources,
    SpecError,
    TaskCompleted,
    TaskPreviewObservation,
)
from domains.render_farm import (
    PreviewDefaults,
    PreviewSettings,
    RenderFarmPolicy,
    RenderJob,
    RenderMetadata,
    RenderNode,
    parse_farm_config,
)
from domains.render_farm._previews import plan_previews, preview_choice, substitute
from domains.render_farm._simulation import open_simulated_farm

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
PASS_COMMAND = [
    "render",
    "--quality",
    "{quality}",
    "--frames",
    "{start}-{end}",
    "--step",
    "{stride}",
]
CONFIG = parse_farm_config("[[clients]]\nid = 'acme'\n")


def _job(frames: int, chunk: int, preview: PreviewSettings | None = None) -> RenderJob:
    return RenderJob(
        name="shot",
        client="acme",
        command=["render", "--frames", "{start}-{end}"],
        frames=(1, frames),
        chunk=chunk,
        frame_estimate=225.0,
        preview=preview,
    )


DEFAULTS = PreviewDefaults()


def _plan(job: RenderJob) -> list[str]:
    meta = job.to_spec().metadata_as(RenderMetadata)
    planned = plan_previews(job.to_spec(), preview_choice(meta.render.preview, DEFAULTS))
    assert planned is not None
    return [task.name for task in planned[0]]


def test_stride_frames_come_first_then_the_rest_in_chunks() -> None:
    """Every 8th frame of 1-20 first (1, 9, 17), then the other frames in chunks of 5."""
    assert _plan(_job(20, 5)) == ["1", "9", "17", "2-6", "7-8", "10-14", "15-16", "18-20"]


@pytest.mark.parametrize(
    ("passes", "overhead", "kept"),
    [
        ([0.25, 0.5], 0.05, [0.25, 0.5]),  # 0.8 % + 3.1 % of the job's frames
        ([0.25, 0.5, 0.75], 0.05, [0.25, 0.5]),  # 0.75 would cost another 7 %
        ([0.25, 0.5], 0.01, [0.25]),
        ([0.5], 0.0, []),
    ],
)
def test_passes_are_kept_within_the_overhead_budget(
    passes: list[float], overhead: float, kept: list[float]
) -> None:
    """Passes in rising quality while their summed cost (q^2 per frame) stays in budget."""
    job = _job(96, 12, PreviewSettings(passes=passes, command=PASS_COMMAND, overhead=overhead))
    spec = job.to_spec()
    meta = spec.metadata_as(RenderMetadata)
    planned = plan_previews(spec, preview_choice(meta.render.preview, PreviewDefaults()))
    assert planned is not None
    tasks, plan = planned
    assert sorted(set(plan.passes)) == kept
    assert len(plan.passes) == sum(1 for t in tasks if t.name.startswith("preview-q"))
    assert plan.strides == 12
    assert all(t.command for t in tasks[: len(plan.passes)])
    assert not any(t.command for t in tasks[len(plan.passes) :])


def test_the_first_pass_is_cut_so_its_first_task_finishes_within_10_percent() -> None:
    """Chunks of 2 frames: 10 % of a chunk is 0.2 frames, a q=0.25 frame costs 0.0625, so the
    first pass runs 3 frames per task; the second pass (q=0.5) runs 8 per task."""
    names = _plan(_job(64, 2, PreviewSettings(passes=[0.25, 0.5], command=PASS_COMMAND)))
    assert names[:3] == ["preview-q0.25-1-17", "preview-q0.25-25-41", "preview-q0.25-49-57"]
    assert names[3] == "preview-q0.5-1-57"
    assert names[4:12] == ["1", "9", "17", "25", "33", "41", "49", "57"]


def test_the_preview_command_gets_quality_and_stride_and_keeps_start_and_end() -> None:
    """{quality} and {stride} are filled in at submission; {start} and {end} by the engine."""
    assert substitute("--q={quality:.2f}/{stride}/{start}", quality=0.25, stride=8) == (
        "--q=0.25/8/{start}"
    )


@pytest.mark.parametrize(
    ("preview", "field", "problem"),
    [
        (PreviewSettings(passes=[0.5]), "preview.passes", "need a preview command"),
        (PreviewSettings(command=["render"]), "preview.command", "{quality}"),
        (
            PreviewSettings(command=["render", "{quality}", "{frame}"]),
            "preview.command",
            "not {frame}",
        ),
    ],
)
def test_bad_preview_settings_are_refused_at_submission(
    preview: PreviewSettings, field: str, problem: str
) -> None:
    """Passes without a command, a command without {quality} or with {frame}: refused."""
    policy = RenderFarmPolicy(CONFIG)
    with pytest.raises(SpecError) as caught:
        policy.validate(_job(16, 4, preview).to_spec(source="shot.toml"), NOW)
    assert caught.value.field == f"jobs.shot.metadata.render.{field}"
    assert problem in caught.value.problem


def _seconds(node: str, spec: AttemptSpec) -> float:
    """225 s a frame; a pass at quality q costs q^2 a frame (from the rendered command)."""
    argv = list(spec.argv)
    first, last = (int(x) for x in argv[argv.index("--frames") + 1].split("-"))
    if "--quality" in argv:
        quality = float(argv[argv.index("--quality") + 1])
        step = int(argv[argv.index("--step") + 1])
        return len(range(first, last + 1, step)) * 225.0 * quality**2
    return (last - first + 1) * 225.0


async def test_a_45_minute_job_gets_its_first_preview_by_4_5_minutes() -> None:
    """48 frames of 225 s in chunks of 12 on four nodes: an estimated 45 minutes.  Its first
    preview (a quarter-quality pass) is done by 4.5 minutes, and the job still completes."""
    policy = RenderFarmPolicy(CONFIG)
    nodes = [RenderNode(name=f"n{i}", cores=4, memory="16GiB") for i in range(4)]
    job = RenderJob(
        name="shot",
        client="acme",
        command=["render", "--frames", "{start}-{end}"],
        frames=(1, 48),
        chunk=12,
        frame_estimate=225.0,
        resources=Resources.of(cores=4, memory="4GiB"),
        preview=PreviewSettings(passes=[0.25, 0.5], command=PASS_COMMAND),
    )
    async with open_simulated_farm(policy=policy, nodes=nodes, duration=_seconds) as farm:
        started = farm.clock.now()
        await farm.engine.submit([job.to_spec()])
        summary = await farm.engine.wait_job("shot")
        assert summary.status == "completed"
        first = policy.first_preview_at("shot")
        assert first is not None
        assert first - started <= timedelta(minutes=4.5)
        ends = [
            r.timestamp
            for r in await farm.journal.read_stream("job:shot")
            if isinstance(r.event, TaskCompleted)
        ]
        assert max(ends) - started >= timedelta(minutes=45)


def test_previews_are_listed_per_job_with_their_quality_and_frames() -> None:
    """Each preview an attempt reports is kept; the latest is in the job's status columns."""
    policy = RenderFarmPolicy(CONFIG)
    spec = policy.prepare(
        _job(16, 4, PreviewSettings(passes=[0.25], command=PASS_COMMAND)).to_spec(), NOW
    )
    policy.observe(JobSubmittedObservation(job_id="shot", spec=spec, at=NOW))
    for task, path in ((0, "/out/previews/q0.25.png"), (1, "/out/frames/0001.png")):
        policy.observe(TaskPreviewObservation(job_id="shot", task=task, path=path, at=NOW))
    reply = policy.command("previews", {"job": "shot"}, FarmView(), NOW).reply
    assert [(p["task"], p["quality"], p["frames"], p["path"]) for p in reply] == [
        (0, 0.25, [1, 9], "/out/previews/q0.25.png"),
        (1, 1.0, [1, 1], "/out/frames/0001.png"),
    ]
