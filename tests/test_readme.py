"""The README's promises: its embedding example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _embedding_example() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"## Embedding.*?```python\n(.*?)```", text, re.S)
    assert match is not None, "the README has no embedding example"
    return match.group(1)


def test_embedding_example_runs_and_refuses_a_duplicate(tmp_path: Path) -> None:
    """The example completes its job, and a second run refuses the same job id."""
    script = tmp_path / "example.py"
    script.write_text(_embedding_example(), encoding="utf-8")
    first = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "shot-010 completed {'completed': 8}"
    second = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert second.returncode != 0
    assert "shot-010" in second.stderr
    assert "already exists" in second.stderr


def test_the_policy_example_defers_energy_work_to_the_night(tmp_path: Path) -> None:
    """The "Writing a policy" example starts the preview at once and the simulation at 22:00."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"## Writing a policy.*?```python\n(.*?)```", text, re.S)
    assert match is not None, "the README has no policy example"
    script = tmp_path / "policy.py"
    script.write_text(match.group(1), encoding="utf-8")
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["preview", "09:00", "simulation", "22:00"]


def _render_section() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"\n## Render farm \(`domains\.render_farm`\)\n(.*?)\n## ", text, re.S)
    assert match is not None, "the README has no render farm section"
    return match.group(1)


def test_the_render_farm_toml_is_valid_and_its_errors_name_the_file_and_field() -> None:
    """The README's farm.toml parses as it says; a maximum below its guarantee is refused with
    the message the README quotes."""
    from domains.render_farm import parse_farm_config
    from runtime import ConfigurationError

    farm, _shot = re.findall(r"```toml\n(.*?)```", _render_section(), re.S)
    config = parse_farm_config(farm, source="farm.toml")
    assert [c.id for c in config.clients] == ["acme", "blue"]
    assert (config.margin, config.reclaim_after, config.max_errors) == (7200.0, 120.0, 3)
    assert [c.name for c in config.node_classes] == ["std", "gpu"]
    assert config.previews.stride == 8
    assert config.energy.mode == "balanced"
    broken = farm.replace("maximum = 60", "maximum = 20")
    try:
        parse_farm_config(broken, source="farm.toml")
    except ConfigurationError as error:
        message = str(error)
    else:
        raise AssertionError("a maximum below the guarantee was accepted")
    assert message == "farm.toml: clients[1].maximum: 20 % is below the guarantee of 30 %"
    assert "`farm.toml: clients[1].maximum: 40 % is below the guarantee of 50 %`" in (
        " ".join(_render_section().split())
    )


async def test_the_render_farm_example_runs_previews_first_with_its_deadline_verdict() -> None:
    """The README's shot, under its farm.toml on four simulated 16-core nodes at 09:00 on 5 March
    2027: high (base medium), will meet; its low-quality passes, then every 8th frame, then the
    rest in chunks of 8; it completes."""
    from datetime import UTC, datetime

    from actors import TaskAssigned
    from domains.render_farm import RenderFarmPolicy, RenderNode, parse_farm_config
    from domains.render_farm._simulation import open_simulated_farm
    from runtime import VirtualClock

    farm_toml, shot = re.findall(r"```toml\n(.*?)```", _render_section(), re.S)
    policy = RenderFarmPolicy(parse_farm_config(farm_toml, source="farm.toml"))
    clock = VirtualClock(auto_advance=True, start=datetime(2027, 3, 5, 9, 0, tzinfo=UTC))
    nodes = [RenderNode(name=f"n{i}", node_class="std", cores=16, memory="64GiB") for i in range(4)]
    async with open_simulated_farm(
        policy=policy, nodes=nodes, duration=lambda node, spec: 240.0, clock=clock
    ) as farm:
        clock.activity.acquire()  # look before the virtual clock moves
        assert await farm.engine.submit_text(shot, fmt="toml", source="shot.toml") == ["shot040"]
        [row] = await farm.engine.policy_command("status")
        assert (row["priority"], row["base_priority"], row["verdict"]) == (
            "high",
            "medium",
            "will meet",
        )
        clock.activity.release()
        summary = await farm.engine.wait_job("shot040")
        records = await farm.journal.read_stream("job:shot040")
    assert summary.status == "completed"
    submitted = records[0].event
    names = [task.name for task in submitted.job.tasks]  # type: ignore[attr-defined]
    assert [name.rpartition("-1-")[0] for name in names[:2]] == ["preview-q0.25", "preview-q0.5"]
    assert names[2:14] == [str(frame) for frame in range(1, 97, 8)]
    first = next(r.event for r in records if isinstance(r.event, TaskAssigned))
    assert first.task == 0
    section = " ".join(_render_section().split())
    assert "quarter- and half-quality passes first" in section
    assert "it is `high` (base `medium`, due within 24 h) and its verdict is `will meet`" in section


def _checkpoint_block(language: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = re.search(r"### Checkpoints that survive their host\n(.*?)\n### ", text, re.S)
    assert section is not None, "the README has no shared checkpoint section"
    match = re.search(rf"```{language}\n(.*?)```", section.group(1), re.S)
    assert match is not None, f"the shared checkpoint section has no {language} block"
    return match.group(1)


def test_the_checkpoint_spec_example_loads_with_its_fields() -> None:
    """The shared checkpoint section's spec loads: retention 3, a 10-minute warning."""
    from actors import parse_spec

    (job,) = parse_spec(_checkpoint_block("toml"), fmt="toml", source="README.md").jobs
    assert job.checkpointable
    assert job.checkpoint_retention == 3
    assert job.task_checkpoint_warning(0) == 600.0
    assert job.task_max_runtime(0) == 12 * 3600.0


async def test_the_checkpoint_program_example_is_verified_kept_and_resumed(
    tmp_path: Path,
) -> None:
    """The section's program checkpoints with manifests that its executor verifies; with K = 2
    the oldest is deleted; and a resume whose latest checkpoint was damaged falls back to
    the one before and still finishes."""
    from actors import AttemptCheckpointed, AttemptSpec, AttemptStarted, open_subprocess_executor
    from actors.executors import CheckpointRecord
    from runtime import SystemClock

    program = tmp_path / "model.py"
    program.write_text(_checkpoint_block("python"), encoding="utf-8")
    reports: list[object] = []

    async def sink(report: object) -> None:
        reports.append(report)

    def spec(attempt: int, **fields: object) -> AttemptSpec:
        return AttemptSpec(
            job_id="ocean",
            task_id="0",
            attempt=attempt,
            fencing_token=attempt,
            argv=(sys.executable, str(program)),
            checkpointable=True,
            checkpoint_retention=2,
            **fields,  # type: ignore[arg-type]
        )

    async with open_subprocess_executor(
        log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "ck", clock=SystemClock()
    ) as executor:
        first = await (await executor.start(spec(1), sink)).wait()
        assert first.outcome == "completed"
        checkpoints = [r for r in reports if isinstance(r, AttemptCheckpointed)]
        assert [Path(c.checkpoint).name for c in checkpoints] == [
            "step-000100",
            "step-000200",
            "step-000300",
        ]
        folder = tmp_path / "ck" / "ocean" / "0"
        assert sorted(p.name for p in folder.iterdir()) == ["step-000200", "step-000300"]
        (folder / "step-000300" / "state.json").write_text('{"step": 299}')
        kept = tuple(
            CheckpointRecord(checkpoint=c.checkpoint, manifest=c.manifest) for c in checkpoints[1:]
        )
        reports.clear()
        second = await (
            await executor.start(spec(2, resume_from=kept[-1].checkpoint, checkpoints=kept), sink)
        ).wait()
    assert second.outcome == "completed"
    (started,) = [r for r in reports if isinstance(r, AttemptStarted)]
    assert started.resumed_from == str(folder / "step-000200")
    assert started.refused == (str(folder / "step-000300"),)
