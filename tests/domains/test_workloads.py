"""The demo workloads as real subprocesses: the tiny renderer and the heat simulation."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from actors.executors import read_manifest, verify_manifest
from domains.scientific.heat_simulation import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RENDERER = "domains.render_farm.tiny_renderer"
SIMULATION = "domains.scientific.heat_simulation"
SMALL_FRAME = ["--width", "32", "--height", "18", "--samples", "2"]
VERBS = {"progress", "checkpoint", "preview", "metric"}


# -- helpers -----------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TASKFARM_")}
    return env | extra


def run(module: str, *args: str | Path, env: Mapping[str, str] | None = None) -> Result:
    """Run a workload to completion and return its exit code, report lines and stderr."""
    done = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        env=_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


@contextmanager
def start(
    module: str, *args: str | Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """Start a workload with its stdout piped; kill it on the way out."""
    with subprocess.Popen(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        env=_env(**(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()


def read_until(process: subprocess.Popen[str], wanted: Callable[[list[str]], bool]) -> list[str]:
    """Read report lines from the running workload until ``wanted(fields)``; return those."""
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("@taskfarm "):
            fields = line.split()[1:]
            if wanted(fields):
                return fields
    raise AssertionError("the workload ended before the expected report")


class Result:
    """A finished workload run."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode = returncode
        self.stderr = stderr
        self.reports = [
            line.split(maxsplit=2)[1:]
            for line in stdout.splitlines()
            if line.startswith("@taskfarm ")
        ]

    def ok(self) -> Result:
        assert self.returncode == 0, self.stderr
        return self

    def of(self, verb: str) -> list[str]:
        return [rest[0] if rest else "" for v, *rest in self.reports if v == verb]

    def progress(self) -> list[float]:
        return [float(rest.split()[0]) for rest in self.of("progress")]


def png_info(path: Path) -> tuple[int, int]:
    """Check a PNG file chunk by chunk (CRCs, IHDR, pixel data length); return its size."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, tags, idat = 8, [], b""
    header = b""
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, f"bad CRC in {tag!r}"
        tags.append(tag)
        header = body if tag == b"IHDR" else header
        idat += body if tag == b"IDAT" else b""
        pos += 12 + length
    assert pos == len(data)
    assert tags[0] == b"IHDR"
    assert tags[-1] == b"IEND"
    assert b"IDAT" in tags
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", header
    )
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + 3 * width)
    assert all(raw[y * (1 + 3 * width)] <= 4 for y in range(height))  # valid filter types
    return width, height


def final_grid(output: Path, stage: str) -> Any:
    return json.loads((output / f"{stage}.json").read_text())["grid"]


# -- the renderer ------------------------------------------------------------------------------


def test_frame_is_a_valid_png(tmp_path: Path) -> None:
    """A frame is written as a well-formed RGB PNG of the requested size."""
    run(RENDERER, "--frame", "3", "--output", tmp_path, *SMALL_FRAME).ok()
    assert png_info(tmp_path / "orbit_0003.png") == (32, 18)


@pytest.mark.parametrize("scene", ["orbit", "bounce"])
def test_frames_are_deterministic_and_animated(tmp_path: Path, scene: str) -> None:
    """The same frame renders to identical bytes twice; the next frame differs."""
    for folder, frame in [("a", "5"), ("b", "5"), ("c", "6")]:
        run(
            RENDERER,
            "--scene",
            scene,
            "--frame",
            frame,
            "--output",
            tmp_path / folder,
            *SMALL_FRAME,
        ).ok()
    first = (tmp_path / "a" / f"{scene}_0005.png").read_bytes()
    assert (tmp_path / "b" / f"{scene}_0005.png").read_bytes() == first
    assert (tmp_path / "c" / f"{scene}_0006.png").read_bytes() != first


def test_progress_reports_are_well_formed_and_monotonic(tmp_path: Path) -> None:
    """About ten progress reports per frame, rising to 1, then the render-time metric."""
    result = run(RENDERER, "--frame", "0", "--output", tmp_path, *SMALL_FRAME).ok()
    assert {verb for verb, *_ in result.reports} <= VERBS
    progress = result.progress()
    assert 8 <= len(progress) <= 11
    assert progress == sorted(progress)
    assert progress[0] > 0
    assert progress[-1] == 1.0
    name, value = result.of("metric")[0].split()
    assert name == "render_seconds"
    assert float(value) > 0
    assert [verb for verb, *_ in result.reports][-2:] == ["metric", "checkpoint"]


def test_preview_comes_before_the_final_progress(tmp_path: Path) -> None:
    """With --preview, a quarter-size preview PNG is reported before the frame is done."""
    result = run(RENDERER, "--frame", "7", "--output", tmp_path, "--preview", *SMALL_FRAME).ok()
    verbs = [verb for verb, *_ in result.reports]
    assert verbs.index("preview") < verbs.index("progress")
    (preview,) = result.of("preview")
    assert Path(preview) == tmp_path / "previews" / "orbit_0007.png"
    assert png_info(Path(preview)) == (8, 4)


def test_chunk_renders_each_frame(tmp_path: Path) -> None:
    """--frames START-END renders every frame, with progress over the whole chunk."""
    result = run(RENDERER, "--frames", "2-4", "--output", tmp_path, *SMALL_FRAME).ok()
    for frame in (2, 3, 4):
        assert png_info(tmp_path / f"orbit_{frame:04d}.png") == (32, 18)
    progress = result.progress()
    assert progress == sorted(progress)
    assert progress.count(1.0) == 1
    assert result.of("checkpoint") == ["frame:2", "frame:3", "frame:4"]


def test_resumed_chunk_keeps_finished_frames_and_redoes_damaged_ones(tmp_path: Path) -> None:
    """A chunk resumed from frame:N keeps intact frames up to N and re-renders the rest."""
    run(RENDERER, "--frames", "0-2", "--output", tmp_path, *SMALL_FRAME).ok()
    originals = {n: (tmp_path / f"orbit_{n:04d}.png").read_bytes() for n in range(3)}
    damaged = tmp_path / "orbit_0001.png"
    damaged.write_bytes(originals[1][:-20])
    (tmp_path / "orbit_0002.png").unlink()

    result = run(
        RENDERER, "--frames", "0-2", "--output", tmp_path, *SMALL_FRAME,
        env={"TASKFARM_RESUME_FROM": "frame:1"},
    ).ok()  # fmt: skip
    assert "frame 0 already rendered" in result.stderr
    assert result.of("checkpoint") == ["frame:1", "frame:2"]
    for n, data in originals.items():
        assert (tmp_path / f"orbit_{n:04d}.png").read_bytes() == data


@pytest.mark.parametrize(
    "args",
    [
        ["--frames", "5-2"],
        ["--frame", "x"],
        ["--frame", "1-3"],
        ["--scene", "nope", "--frame", "1"],
    ],
)
def test_renderer_rejects_bad_arguments(tmp_path: Path, args: list[str]) -> None:
    """Bad arguments exit with status 2 and write nothing."""
    assert run(RENDERER, *args, "--output", tmp_path).returncode == 2
    assert not list(tmp_path.iterdir())


# -- the heat simulation -----------------------------------------------------------------------


def simulate(output: Path, *args: str | Path, stage: str = "main", **env: str) -> Result:
    return run(
        SIMULATION, "--stage", stage, "--output", output, "--size", "16", *args, env=env
    ).ok()


def resume_point(report: str) -> Path:
    """Return the checkpoint a ``checkpoint --manifest FILE`` report names, as an agent would
    read it from the manifest (``TASKFARM_RESUME_FROM``)."""
    option, path = report.split(maxsplit=1)
    assert option == "--manifest"
    return Path(read_manifest(path)[0])


def resume_points(result: Result, last: int) -> list[Path]:
    """Return the checkpoints of the ``last`` checkpoint reports (older ones are deleted)."""
    return [resume_point(report) for report in result.of("checkpoint")[-last:]]


def test_checkpoints_are_reported_and_validate(tmp_path: Path) -> None:
    """Every K steps a checkpoint is written and reported with a manifest that the agent's
    verification accepts, naming the checkpoint file; run alone, the two newest stay."""
    checkpoints = tmp_path / "ckpt"
    result = simulate(
        tmp_path, "--steps", "100", "--checkpoint-every", "25",
        TASKFARM_CHECKPOINT_DIR=str(checkpoints),
    )  # fmt: skip
    manifests = [Path(r.removeprefix("--manifest ")) for r in result.of("checkpoint")]
    assert [p.name for p in manifests] == [f"main-{s:08d}.manifest.json" for s in (25, 50, 75)]
    reported = [resume_point(f"--manifest {m}") for m in manifests[-2:]]
    assert [p.name for p in reported] == [f"main-{s:08d}.ckpt" for s in (50, 75)]
    assert sorted(checkpoints.iterdir()) == sorted([*reported, *manifests[-2:]])
    for manifest, path, step in zip(manifests[-2:], reported, (50, 75), strict=True):
        _, read = read_manifest(str(manifest))
        assert [(f.path, f.size) for f in read.files] == [(path.name, path.stat().st_size)]
        verify_manifest(read)
        checkpoint = load_checkpoint(path)
        assert (checkpoint.stage, checkpoint.step, len(checkpoint.grid)) == ("main", step, 16)
    metrics = [m.split()[0] for m in result.of("metric")]
    assert "residual" in metrics
    assert metrics[-1] == "total_heat"
    progress = result.progress()
    assert progress == sorted(progress)
    assert progress[0] == 0.0
    assert progress[-1] == 1.0
    assert 20 <= len(progress) <= 22
    assert png_info(tmp_path / "main.png") == (256, 256)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """Killed right after a checkpoint and resumed from it, a run ends bit-identical."""
    steps = ["--steps", "20000", "--checkpoint-every", "1000"]
    with start(SIMULATION, "--stage", "main", "--output", tmp_path / "killed", "--size", "16",
               *steps) as process:  # fmt: skip
        fields = read_until(process, lambda fields: fields[0] == "checkpoint")
        process.kill()
        assert process.wait() == -signal.SIGKILL
    checkpoint = str(resume_point(" ".join(fields[1:])))
    step = load_checkpoint(Path(checkpoint)).step
    assert not (tmp_path / "killed" / "main.json").exists()

    resumed = simulate(tmp_path / "killed", *steps, TASKFARM_RESUME_FROM=checkpoint)
    assert f"resuming from step {step} " in resumed.stderr
    assert resumed.progress()[0] > 0.0
    simulate(tmp_path / "whole", *steps)
    assert final_grid(tmp_path / "killed", "main") == final_grid(tmp_path / "whole", "main")
    png = "main.png"
    assert (tmp_path / "killed" / png).read_bytes() == (tmp_path / "whole" / png).read_bytes()


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _garble_header(path: Path) -> None:
    path.write_bytes(b"garbage\n" + path.read_bytes().partition(b"\n")[2])


def _remove(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_flip_a_byte, "SHA-256 mismatch"),
        (_truncate, "SHA-256 mismatch"),
        (_garble_header, "bad header"),
        (_remove, "cannot read it"),
    ],
    ids=["flipped-byte", "truncated", "bad-header", "missing"],
)
def test_damaged_checkpoint_is_detected_and_the_run_starts_over(
    tmp_path: Path, damage: Callable[[Path], None], reason: str
) -> None:
    """A damaged checkpoint (with no older one kept beside it) is reported on stderr and the
    run starts from step 0, still right."""
    steps = ["--steps", "200", "--checkpoint-every", "50"]
    first = simulate(tmp_path / "first", *steps)
    checkpoint = resume_points(first, 1)[0]
    for older in checkpoint.parent.glob("main-*.ckpt"):
        if older != checkpoint:
            older.unlink()
    damage(checkpoint)
    with pytest.raises(CheckpointError):
        load_checkpoint(checkpoint)

    again = simulate(tmp_path / "again", *steps, TASKFARM_RESUME_FROM=str(checkpoint))
    assert f"invalid checkpoint {checkpoint}: " in again.stderr
    assert reason in again.stderr
    assert "starting over from step 0" in again.stderr
    assert again.of("progress")[0] == "0.0000 step 0/200"
    assert final_grid(tmp_path / "again", "main") == final_grid(tmp_path / "first", "main")


def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path: Path) -> None:
    """A flipped byte in the newest checkpoint is caught, the run resumes from the older one
    kept beside it (one interval lost, not the run), and its result is still exact."""
    steps = ["--steps", "200", "--checkpoint-every", "50"]
    first = simulate(tmp_path / "first", *steps)
    previous, newest = resume_points(first, 2)
    assert previous.exists()
    _flip_a_byte(newest)
    again = simulate(tmp_path / "again", *steps, TASKFARM_RESUME_FROM=str(newest))
    assert f"invalid checkpoint {newest}: SHA-256 mismatch" in again.stderr
    step = load_checkpoint(previous).step
    assert f"resuming from step {step} ({previous})" in again.stderr
    assert again.of("progress")[0] == f"{step / 200:.4f} step {step}/200"
    assert final_grid(tmp_path / "again", "main") == final_grid(tmp_path / "first", "main")


def test_checkpoint_of_another_stage_is_not_resumed(tmp_path: Path) -> None:
    """A valid checkpoint from a different stage is refused rather than resumed."""
    other = simulate(tmp_path, "--steps", "40", "--checkpoint-every", "20", stage="spinup")
    spinup = str(resume_point(other.of("checkpoint")[0]))
    again = simulate(tmp_path, "--steps", "40", TASKFARM_RESUME_FROM=spinup)
    assert "belongs to stage 'spinup'" in again.stderr
    assert again.of("progress")[0] == "0.0000 step 0/40"


def test_sigusr1_produces_a_checkpoint(tmp_path: Path) -> None:
    """SIGUSR1 makes the run write and report a valid checkpoint, and it carries on."""
    args: list[str | Path] = ["--stage", "main", "--output", tmp_path, "--size", "16"]
    args += ["--steps", "100000"]  # seconds of work: it is killed long before the end
    with start(SIMULATION, *args, "--checkpoint-every", "0") as process:
        read_until(process, lambda fields: fields[0] == "progress")  # the handler is installed
        process.send_signal(signal.SIGUSR1)
        fields = read_until(process, lambda fields: fields[0] == "checkpoint")
        read_until(process, lambda fields: fields[0] == "progress")  # still running
        assert process.poll() is None
    checkpoint = load_checkpoint(resume_point(" ".join(fields[1:])))
    assert checkpoint.stage == "main"
    assert checkpoint.step >= 1


def test_stages_chain_through_input(tmp_path: Path) -> None:
    """Stage outputs feed the next stage; two chained stages equal one run of both lengths."""
    simulate(tmp_path, "--steps", "60", stage="spinup")
    simulate(tmp_path, "--steps", "90", "--input", tmp_path / "spinup.json", stage="main")
    simulate(tmp_path, "--steps", "0", "--input", tmp_path / "main.json", stage="analysis")
    simulate(tmp_path, "--steps", "150", stage="whole")
    assert final_grid(tmp_path, "analysis") == final_grid(tmp_path, "whole")
    assert final_grid(tmp_path, "main") == final_grid(tmp_path, "whole")
    assert final_grid(tmp_path, "spinup") != final_grid(tmp_path, "whole")
    for stage in ("spinup", "main", "analysis"):
        assert png_info(tmp_path / f"{stage}.png") == (256, 256)


def test_bad_input_is_refused(tmp_path: Path) -> None:
    """An input that is not a square grid exits with status 1 and a clear message."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"grid": [[1.0, 2.0], [3.0]]}))
    args: list[str | Path] = ["--stage", "main", "--output", tmp_path, "--steps", "5"]
    args += ["--input", bad]
    result = run(SIMULATION, *args)
    assert result.returncode == 1
    assert f"cannot use {bad} as input" in result.stderr


@pytest.mark.slow
def test_default_size_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """At the default size, a run killed after its third checkpoint resumes bit-identical."""
    steps = ["--steps", "3000"]
    with start(SIMULATION, "--stage", "main", "--output", tmp_path / "killed", *steps) as process:
        for _ in range(3):
            fields = read_until(process, lambda fields: fields[0] == "checkpoint")
        process.kill()
        process.wait()
    run(SIMULATION, "--stage", "main", "--output", tmp_path / "killed", *steps,
        env={"TASKFARM_RESUME_FROM": str(resume_point(" ".join(fields[1:])))}).ok()  # fmt: skip
    run(SIMULATION, "--stage", "main", "--output", tmp_path / "whole", *steps).ok()
    assert final_grid(tmp_path / "killed", "main") == final_grid(tmp_path / "whole", "main")
