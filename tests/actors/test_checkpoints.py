"""Checkpoints that survive their host: manifests verified before a report counts, the last K
kept (older ones deleted, never one an attempt may still read), fallback to the one before a
checkpoint that fails verification, and the checkpoint warning before ``max_runtime``."""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import structlog

from actors import (
    AttemptCheckpointed,
    AttemptMetric,
    AttemptProgress,
    AttemptSpec,
    AttemptStarted,
    CheckpointManifestError,
    ReportLineError,
    SpecError,
    open_subprocess_executor,
    parse_spec,
)
from actors.engine import (
    ENGINE_CODEC,
    JobAggregate,
    JobState,
    JobSubmitted,
    SubmitJob,
    TaskCheckpointed,
    TaskSpec,
    TaskStarted,
)
from actors.executors import (
    CheckpointManifest,
    CheckpointRecord,
    ManifestFile,
    delete_checkpoint,
    hash_file,
    parse_report_line,
    read_manifest,
    retain,
    verify_manifest,
    write_manifest,
)
from runtime import ConfigurationError, SystemClock, VirtualClock, create_token_file

_T0 = datetime(2026, 1, 1, tzinfo=UTC)
STEPPER = Path(__file__).parent / "workloads" / "stepper.py"
CHILD = Path(__file__).parent / "workloads" / "child.py"


def _folder(root: Path, name: str, files: dict[str, bytes]) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    return folder


def _record(folder: Path) -> CheckpointRecord:
    checkpoint, manifest = read_manifest(str(write_manifest(folder)))
    return CheckpointRecord(checkpoint=checkpoint, manifest=manifest)


# -- manifests --------------------------------------------------------------------------------


def test_a_written_manifest_reads_back_and_verifies(tmp_path: Path) -> None:
    """write_manifest lists every file with its size and SHA-256; the checkpoint defaults to
    the manifest's folder, paths are relative to it, and the files verify."""
    folder = _folder(tmp_path, "ck", {"a.bin": b"x" * 5000, "sub/b.json": b"{}"})
    path = write_manifest(folder)
    checkpoint, manifest = read_manifest(str(path))
    assert checkpoint == str(folder)
    assert manifest.root == str(folder)
    assert manifest.source == str(path)
    assert [(f.path, f.size) for f in manifest.files] == [("a.bin", 5000), ("sub/b.json", 2)]
    assert manifest.files[0].sha256 == hashlib.sha256(b"x" * 5000).hexdigest()
    assert manifest.size == 5002
    verify_manifest(manifest)
    assert hash_file(str(folder / "a.bin")) == (5000, manifest.files[0].sha256)


def test_a_manifest_names_its_own_checkpoint_token(tmp_path: Path) -> None:
    """A manifest's "checkpoint" is what a resumed attempt gets in TASKFARM_RESUME_FROM; a
    relative manifest path is read from the program's working directory."""
    folder = _folder(tmp_path, "ck", {"a": b"1"})
    write_manifest(folder, ["a"], checkpoint="step-7")
    checkpoint, manifest = read_manifest("ck/manifest.json", cwd=str(tmp_path))
    assert checkpoint == "step-7"
    assert [f.path for f in manifest.files] == ["a"]


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda p: p.write_bytes(b"y" + p.read_bytes()[1:]), "SHA-256 differs"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "100 bytes, the manifest says 4096"),
        (lambda p: p.unlink(), "cannot read it"),
    ],
    ids=["flipped", "torn", "missing"],
)
def test_a_damaged_checkpoint_fails_verification_naming_the_file(
    tmp_path: Path, damage: Any, problem: str
) -> None:
    """A flipped byte, a short file or a missing one fails verification, naming the file."""
    folder = _folder(tmp_path, "ck", {"ok": b"fine", "data": b"x" * 4096})
    _, manifest = read_manifest(str(write_manifest(folder)))
    damage(folder / "data")
    with pytest.raises(CheckpointManifestError) as caught:
        verify_manifest(manifest)
    assert caught.value.path == str(folder / "data")
    assert problem in caught.value.problem


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (b"not json", "not JSON"),
        (b'{"files": []}', "not a valid manifest"),
        (b'{"files": [{"path": "a", "size": 1}]}', "not a valid manifest"),
        (b'{"files": [{"path": "a", "size": -1, "sha256": "' + b"0" * 64 + b'"}]}', "valid"),
        (b'{"files": [{"path": "a", "size": 1, "sha256": "xyz"}]}', "64 hexadecimal digits"),
        (b'{"files": [{"path": "../a", "size": 1, "sha256": "' + b"0" * 64 + b'"}]}', "inside"),
        (b'{"files": [{"path": "/etc/passwd", "size": 1, "sha256": "' + b"0" * 64 + b'"}]}', "in"),
        (b'{"files": [], "extra": 1}', "not a valid manifest"),
    ],
)
def test_a_malformed_manifest_is_refused_with_what_is_wrong(
    tmp_path: Path, document: bytes, problem: str
) -> None:
    """A manifest that is not JSON, lists no files, lacks a field, has a bad digest or a path
    outside its folder is refused, naming the problem."""
    path = tmp_path / "manifest.json"
    path.write_bytes(document)
    with pytest.raises(CheckpointManifestError, match=problem):
        read_manifest(str(path))


def test_a_missing_manifest_is_refused(tmp_path: Path) -> None:
    """A manifest that does not exist is refused naming it."""
    with pytest.raises(CheckpointManifestError) as caught:
        read_manifest(str(tmp_path / "nope.json"))
    assert caught.value.path == str(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("count", "keep", "kept", "dropped"),
    [(0, 3, [], []), (2, 3, [0, 1], []), (3, 3, [0, 1, 2], []), (5, 3, [2, 3, 4], [0, 1])],
)
def test_retain_keeps_the_last_k(
    count: int, keep: int, kept: list[int], dropped: list[int]
) -> None:
    """retain splits a task's checkpoints into the last K and the older ones, in order."""
    records = [CheckpointRecord(checkpoint=str(i)) for i in range(count)]
    got_kept, got_dropped = retain(records, keep)
    assert [int(r.checkpoint) for r in got_kept] == kept
    assert [int(r.checkpoint) for r in got_dropped] == dropped


def test_deleting_a_checkpoint_spares_files_a_kept_one_lists(tmp_path: Path) -> None:
    """Deleting removes the checkpoint's files, its manifest and its emptied folder, but not
    a file that a retained manifest lists too (a program that rewrites one file in place)."""
    shared = tmp_path / "shared.bin"
    shared.write_bytes(b"s")
    old_folder = _folder(tmp_path, "old", {"a": b"1"})
    new_folder = _folder(tmp_path, "new", {"b": b"2"})
    old = _record(old_folder)
    new = _record(new_folder)
    share = CheckpointManifest(
        root=str(tmp_path), files=(ManifestFile(path="shared.bin", size=1, sha256="0" * 64),)
    )
    old = msgspec.structs.replace(
        old,
        manifest=msgspec.structs.replace(
            share, files=(*share.files,), source=str(old_folder / "manifest.json")
        ),
    )
    keeper = CheckpointRecord(checkpoint="k", manifest=share)
    deleted = delete_checkpoint(old, [new, keeper])
    assert shared.exists()
    assert deleted == [str(old_folder / "manifest.json")]
    assert (old_folder / "a").exists()  # not listed by the (replaced) manifest: not ours
    assert delete_checkpoint(new, [keeper]) == [
        str(new_folder / "b"),
        str(new_folder / "manifest.json"),
    ]
    assert not new_folder.exists()
    assert delete_checkpoint(CheckpointRecord(checkpoint="token"), []) == []


def test_report_lines_carry_a_manifest() -> None:
    """``@taskfarm checkpoint --manifest FILE`` names a manifest to verify; without the file
    it is a malformed line; any other checkpoint text stays a token."""
    spec = AttemptSpec(job_id="j", task_id="0", attempt=1, fencing_token=1, argv=("x",))
    parsed = parse_report_line("@taskfarm checkpoint --manifest ck/m f.json", spec)
    assert parsed is not None
    assert not isinstance(parsed, AttemptCheckpointed)
    assert parsed.path == "ck/m f.json"  # type: ignore[union-attr]
    with pytest.raises(ReportLineError, match="--manifest needs"):
        parse_report_line("@taskfarm checkpoint --manifest", spec)
    token = parse_report_line("@taskfarm checkpoint --manifesto", spec)
    assert isinstance(token, AttemptCheckpointed)
    assert token.checkpoint == "--manifesto"


# -- the executor -----------------------------------------------------------------------------


def _stepper(tmp_path: Path, *args: str, **fields: Any) -> AttemptSpec:
    argv = (sys.executable, str(STEPPER), "--output", str(tmp_path / "result.json"), *args)
    return AttemptSpec(job_id="job", task_id="0", attempt=1, fencing_token=3, argv=argv, **fields)


class Reports:
    """A report sink that keeps every report and lets a test wait for them."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = anyio.Event()

    async def __call__(self, report: Any) -> None:
        self.items.append(report)
        self._changed.set()
        self._changed = anyio.Event()

    def of(self, kind: type[Any]) -> list[Any]:
        return [r for r in self.items if isinstance(r, kind)]

    async def wait_for(self, kind: type[Any], count: int) -> None:
        with anyio.fail_after(20):
            while len(self.of(kind)) < count:
                await self._changed.wait()


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in folder.glob("step-*"))


async def test_a_torn_checkpoint_is_refused_and_older_ones_are_deleted(tmp_path: Path) -> None:
    """Verified checkpoints are reported with their manifests; a torn one (its data cut after
    its manifest was written) is refused: never reported, logged, noted in the attempt log.
    Only the last K (here 2) stay on disk."""
    reports = Reports()
    spec = _stepper(
        tmp_path, "--steps", "50", "--every", "10", "--tear-at", "40", checkpoint_retention=2
    )
    with structlog.testing.capture_logs() as logs:
        async with open_subprocess_executor(
            log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "ck", clock=SystemClock()
        ) as executor:
            handle = await executor.start(spec, reports)
            finished = await handle.wait()
    folder = executor.checkpoint_dir(spec)
    assert finished.outcome == "completed"
    reported = reports.of(AttemptCheckpointed)
    assert [Path(r.checkpoint).name for r in reported] == [
        "step-000010",
        "step-000020",
        "step-000030",
        "step-000050",
    ]
    assert all(r.manifest is not None and len(r.manifest.files) == 2 for r in reported)
    assert finished.checkpoint == str(folder / "step-000050")
    refused = [e for e in logs if e["event"] == "checkpoint_refused"]
    assert len(refused) == 1
    assert refused[0]["path"] == str(folder / "step-000040" / "data.bin")
    assert "torn" in refused[0]["problem"]
    log = executor.log_path(spec).read_text()
    assert "checkpoint refused:" in log
    metrics = [(m.name, m.value) for m in reports.of(AttemptMetric)]
    assert metrics == [("checkpoints_refused", 1.0)]
    # Kept: the last two verified (30, 50); the torn 40 was never a checkpoint: left as is.
    assert _steps(folder) == [30, 40, 50]


def _checkpoints(folder: Path, steps: int) -> list[CheckpointRecord]:
    """Run nothing: build the checkpoints an earlier attempt left (as the stepper writes them)."""
    state = "start"
    records = []
    for step in range(1, steps + 1):
        state = hashlib.sha256(f"{state}:{step}".encode()).hexdigest()
        if step % 10 == 0:
            ck = folder / f"step-{step:06d}"
            ck.mkdir(parents=True)
            (ck / "data.bin").write_bytes(hashlib.shake_256(state.encode()).digest(4096))
            (ck / "state.json").write_text(json.dumps({"step": step, "state": state}))
            records.append(_record(ck))
    return records


async def test_a_resume_falls_back_past_checkpoints_that_fail_verification(
    tmp_path: Path,
) -> None:
    """Before it starts, the executor verifies the checkpoint to resume from; the latest has a
    flipped byte, so it resumes from the one before and says so: in its log, the attempt's
    log, TASKFARM_RESUME_FALLBACK and the start report (resumed_from, refused)."""
    folder = tmp_path / "ck" / "job" / "0"
    records = _checkpoints(folder, 30)
    data = folder / "step-000030" / "data.bin"
    data.write_bytes(bytes([data.read_bytes()[0] ^ 1]) + data.read_bytes()[1:])
    env_file = tmp_path / "env.json"
    spec = _stepper(
        tmp_path,
        *("--steps", "40", "--every", "10", "--env", str(env_file)),
        resume_from=records[-1].checkpoint,
        checkpoints=tuple(records),
    )
    reports = Reports()
    with structlog.testing.capture_logs() as logs:
        async with open_subprocess_executor(
            log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "ck", clock=SystemClock()
        ) as executor:
            finished = await (await executor.start(spec, reports)).wait()
    assert finished.outcome == "completed"
    (started,) = reports.of(AttemptStarted)
    previous = str(folder / "step-000020")
    assert started.resumed_from == previous
    assert started.refused == (str(folder / "step-000030"),)
    assert started.fallback is not None
    assert "SHA-256 differs" in started.fallback
    env = json.loads(env_file.read_text())
    assert env["TASKFARM_RESUME_FROM"] == previous
    assert env["TASKFARM_RESUME_FALLBACK"] == started.fallback
    (fallback,) = [e for e in logs if e["event"] == "checkpoint_fallback"]
    assert fallback["resume_from"] == previous
    assert "resuming from the one before" in executor.log_path(spec).read_text()
    # It resumed at step 20, so it wrote 30 and 40 again: the result is an uninterrupted run's.
    alone = _checkpoints(tmp_path / "alone", 40)
    expected = await anyio.Path(alone[-1].checkpoint, "state.json").read_text()
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(expected)


async def test_a_resume_with_no_valid_checkpoint_starts_over(tmp_path: Path) -> None:
    """When every kept checkpoint fails verification the attempt starts over, without
    TASKFARM_RESUME_FROM, and says so."""
    folder = tmp_path / "ck" / "job" / "0"
    records = _checkpoints(folder, 20)
    for record in records:
        (Path(record.checkpoint) / "state.json").write_text("{}")
    env_file = tmp_path / "env.json"
    spec = _stepper(
        tmp_path,
        *("--steps", "10", "--every", "10", "--env", str(env_file)),
        resume_from=records[-1].checkpoint,
        checkpoints=tuple(records),
    )
    reports = Reports()
    async with open_subprocess_executor(
        log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "ck", clock=SystemClock()
    ) as executor:
        finished = await (await executor.start(spec, reports)).wait()
    assert finished.outcome == "completed"
    (started,) = reports.of(AttemptStarted)
    assert started.resumed_from is None
    assert len(started.refused) == 2
    assert started.fallback is not None
    assert started.fallback.endswith("(2 refused in all)")
    assert "starting over" in started.fallback
    assert "TASKFARM_RESUME_FROM" not in json.loads(env_file.read_text())


async def test_checkpoints_refused_at_a_resume_are_deleted_before_it_starts(
    tmp_path: Path,
) -> None:
    """Every kept checkpoint fails verification: the attempt starts over, and the refused ones'
    files are deleted before it starts (no attempt resumes from them again), said in the start
    report, the log and the attempt's log; what the attempt writes afresh is kept."""
    folder = tmp_path / "ck" / "job" / "0"
    records = _checkpoints(folder, 20)
    for record in records:
        (Path(record.checkpoint) / "state.json").write_text("{}")
    spec = _stepper(
        tmp_path,
        *("--steps", "10", "--every", "10"),
        resume_from=records[-1].checkpoint,
        checkpoints=tuple(records),
    )
    reports = Reports()
    with structlog.testing.capture_logs() as logs:
        async with open_subprocess_executor(
            log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "ck", clock=SystemClock()
        ) as executor:
            finished = await (await executor.start(spec, reports)).wait()
    assert finished.outcome == "completed"
    (started,) = reports.of(AttemptStarted)
    assert set(started.deleted) == {r.checkpoint for r in records}
    assert set(started.refused) == set(started.deleted)
    (deleted,) = [e for e in logs if e["event"] == "checkpoints_deleted"]
    assert (deleted["reason"], deleted["files"]) == ("refused", 6)  # data, state, manifest
    assert "deleted refused checkpoint(s)" in executor.log_path(spec).read_text()
    assert _steps(folder) == [10]  # written again by this attempt; the refused 20 is gone
    assert json.loads((folder / "step-000010" / "state.json").read_text())["step"] == 10


async def test_the_checkpoint_an_attempt_resumed_from_is_deleted_only_once_it_ended(
    tmp_path: Path,
) -> None:
    """With K = 1, the checkpoint the attempt resumed from falls out of the window at its first
    new checkpoint, but it is deleted only after the attempt ended (it may still read it);
    the others go as soon as they fall out."""
    folder = tmp_path / "ck" / "job" / "0"
    (source,) = _checkpoints(folder, 10)
    spec = _stepper(
        tmp_path,
        *("--steps", "30", "--every", "10", "--hold"),
        resume_from=source.checkpoint,
        checkpoints=(source,),
        checkpoint_retention=1,
        checkpointable=True,
    )
    reports = Reports()
    async with open_subprocess_executor(
        log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "ck", clock=SystemClock()
    ) as executor:
        handle = await executor.start(spec, reports)
        # Lines are handled in order: once the line after checkpoint 30 is reported, what
        # that checkpoint pushed out of the window is deleted.
        await reports.wait_for(AttemptProgress, 3)
        assert len(reports.of(AttemptCheckpointed)) == 2
        assert _steps(folder) == [10, 30]
        assert handle.request_checkpoint()  # --hold: SIGUSR1 lets it exit
        finished = await handle.wait()
    assert finished.outcome == "completed"
    assert _steps(folder) == [30]


async def test_checkpoint_warning_sends_sigusr1_before_max_runtime(tmp_path: Path) -> None:
    """With checkpoint_warning = 10 s and max_runtime = 60 s, a checkpointable attempt gets
    SIGUSR1 at 50 s on the clock (not before), and checkpoints before it is stopped."""
    clock = VirtualClock()
    spec = AttemptSpec(
        job_id="job",
        task_id="0",
        attempt=1,
        fencing_token=1,
        argv=(sys.executable, str(CHILD), "checkpoint-on-signal"),
        checkpointable=True,
        max_runtime=60.0,
        checkpoint_warning=10.0,
    )
    reports = Reports()
    with structlog.testing.capture_logs() as logs:
        async with open_subprocess_executor(
            log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "ck", clock=clock
        ) as executor:
            handle = await executor.start(spec, reports)
            await reports.wait_for(AttemptProgress, 1)
            await clock.advance(49.0)
            assert not reports.of(AttemptCheckpointed)
            await clock.advance(1.0)
            with anyio.fail_after(10):
                finished = await handle.wait()
    assert finished.outcome == "completed"
    assert reports.of(AttemptCheckpointed)
    (sent,) = [e for e in logs if e["event"] == "checkpoint_warning_sent"]
    assert sent["before"] == "max_runtime"
    assert sent["delivered"] is True


# -- the job's state and the spec -------------------------------------------------------------


def _job(retention: int = 3) -> SubmitJob:
    return SubmitJob(
        job_id="sim",
        name="sim",
        command=("x",),
        tasks=(TaskSpec(index=0, name="0"),),
        checkpointable=True,
        checkpoint_retention=retention,
    )


def _manifest(name: str) -> CheckpointManifest:
    return CheckpointManifest(
        root=f"/ck/{name}", files=(ManifestFile(path="a", size=1, sha256="0" * 64),)
    )


def test_the_job_state_keeps_the_last_k_checkpoints_and_drops_refused_ones() -> None:
    """The job folds verified checkpoints into the last K (the executor's rule); a start that
    refused the latest drops it and makes the one it resumed from current, with the note."""
    aggregate = JobAggregate()
    state = aggregate.apply(JobState(), JobSubmitted(job=_job(3), submitted_at=_T0))
    for step in range(1, 6):
        state = aggregate.apply(
            state,
            TaskCheckpointed(
                task=0, token=1, checkpoint=f"c{step}", manifest=_manifest(f"c{step}")
            ),
        )
    task = state.tasks[0]
    assert [c.checkpoint for c in task.checkpoints] == ["c3", "c4", "c5"]
    assert task.checkpoints[-1].manifest == _manifest("c5")
    state = aggregate.apply(
        state,
        TaskStarted(task=0, token=2, resumed_from="c4", refused=("c5",), fallback="c5 failed"),
    )
    task = state.tasks[0]
    assert task.checkpoint == "c4"
    assert [c.checkpoint for c in task.checkpoints] == ["c3", "c4"]
    assert task.resume_note == "c5 failed"


def test_a_start_that_deleted_refused_checkpoints_says_so_in_the_resume_note() -> None:
    """The job's state drops the refused checkpoints and its resume note names those whose
    files were deleted."""
    aggregate = JobAggregate()
    state = aggregate.apply(JobState(), JobSubmitted(job=_job(3), submitted_at=_T0))
    for step in (1, 2):
        state = aggregate.apply(
            state,
            TaskCheckpointed(
                task=0, token=1, checkpoint=f"c{step}", manifest=_manifest(f"c{step}")
            ),
        )
    state = aggregate.apply(
        state,
        TaskStarted(
            task=0,
            token=2,
            resumed_from="c1",
            refused=("c2",),
            fallback="c2 failed",
            deleted=("c2",),
        ),
    )
    task = state.tasks[0]
    assert [c.checkpoint for c in task.checkpoints] == ["c1"]
    assert task.resume_note == "c2 failed; deleted the refused c2"


def test_events_journaled_before_manifests_still_decode() -> None:
    """A TaskCheckpointed or TaskStarted written before manifests existed decodes, with the
    new fields at their defaults."""
    old = b'{"type":"engine.task_checkpointed","task":0,"token":1,"checkpoint":"ck"}'
    event = ENGINE_CODEC.decode("engine.task_checkpointed", 1, old)
    assert isinstance(event, TaskCheckpointed)
    assert event.manifest is None
    started = ENGINE_CODEC.decode(
        "engine.task_started", 1, b'{"type":"engine.task_started","task":0,"token":1}'
    )
    assert isinstance(started, TaskStarted)
    assert started.refused == ()
    # A snapshot taken before: its tasks have no kept checkpoints.
    snapshot = b'{"status":"active","tasks":[{"status":"running","checkpoint":"ck"}]}'
    state = ENGINE_CODEC.decode_state(snapshot, JobState)
    assert state.tasks[0].checkpoints == []


def _load(body: str) -> SubmitJob:
    text = f'[[jobs]]\nname = "sim"\ncommand = ["x"]\n{body}'
    (job,) = parse_spec(text, fmt="toml", source="sim.toml").jobs
    return job


def test_checkpoint_fields_in_a_spec() -> None:
    """checkpoint_warning (job, overridden per task) and checkpoint_retention load."""
    job = _load(
        'checkpointable = true\ncheckpoint_warning = "10m"\ncheckpoint_retention = 5\n'
        'timeouts = { max_runtime = "2h" }\n'
        '[[jobs.tasks]]\nname = "a"\n[[jobs.tasks]]\nname = "b"\ncheckpoint_warning = "30s"\n'
    )
    assert job.checkpoint_retention == 5
    assert job.task_checkpoint_warning(0) == 600.0
    assert job.task_checkpoint_warning(1) == 30.0
    assert _load("").checkpoint_retention == 3
    assert _load("").task_checkpoint_warning(0) is None


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ('checkpoint_warning = "10m"', "jobs[0].checkpoint_warning", "needs checkpointable"),
        (
            'checkpointable = true\ncheckpoint_warning = "1h"\ntimeouts = { max_runtime = "1h" }',
            "jobs[0].checkpoint_warning",
            "not shorter than the max_runtime",
        ),
        (
            'checkpointable = true\n[[jobs.tasks]]\nmax_runtime = "5m"\ncheckpoint_warning = "9m"',
            "jobs[0].tasks[0].checkpoint_warning",
            "not shorter",
        ),
        ('checkpointable = true\ncheckpoint_warning = "0s"', "checkpoint_warning", "above zero"),
        ('checkpointable = true\ncheckpoint_warning = "400d"', "checkpoint_warning", "maximum"),
        ("checkpoint_retention = 0", "checkpoint_retention", ""),
        ("checkpoint_retention = 21", "checkpoint_retention", ""),
    ],
)
def test_bad_checkpoint_fields_are_refused_naming_the_field(
    body: str, field: str, problem: str
) -> None:
    """A warning without checkpointable, one not shorter than the walltime, a zero or huge
    one, and a retention outside 1..100 are refused naming the field."""
    with pytest.raises(SpecError) as caught:
        _load(body)
    assert field in str(caught.value)
    assert problem in str(caught.value)


# -- the agent's flag -------------------------------------------------------------------------


def _agent_args(tmp_path: Path, *extra: str) -> Any:
    import argparse

    from actors.cli._agent import configure

    parser = argparse.ArgumentParser()
    configure(parser)
    token = tmp_path / "token"
    if not token.exists():
        create_token_file(token)
    base = ["--connect", "127.0.0.1:7717", "--token-file", str(token)]
    return parser.parse_args([*base, "--work-dir", str(tmp_path / "w"), *extra])


def test_the_agent_takes_a_shared_checkpoint_folder(tmp_path: Path) -> None:
    """--checkpoint-dir is created and kept absolute; without it the work folder's is used;
    a path that is a file is refused naming the flag."""
    from actors.cli._agent import config_from_args

    shared = tmp_path / "shared" / "ck"
    config = config_from_args(_agent_args(tmp_path, "--checkpoint-dir", str(shared)))
    assert config.checkpoint_dir == str(shared.resolve())
    assert shared.is_dir()
    assert config_from_args(_agent_args(tmp_path)).checkpoint_dir is None
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ConfigurationError) as caught:
        config_from_args(_agent_args(tmp_path, "--checkpoint-dir", str(afile)))
    assert caught.value.where == "--checkpoint-dir"
