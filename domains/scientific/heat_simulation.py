"""Solve the 2-D heat equation on a small plate, one stage of a chained, checkpointed study.

Usage::

    python -m domains.scientific.heat_simulation --stage spinup --steps 1500 --output out/
    python -m domains.scientific.heat_simulation --stage main --steps 3000 --output out/ \\
        --input out/spinup.json [--size 64] [--checkpoint-every 300] [--checkpoint-dir DIR]

An explicit finite-difference scheme (five-point Laplacian, ``r = alpha*dt/dx^2 = 0.2``, below
the stability limit of 0.25) on an ``N x N`` grid whose edges are held fixed: the top edge hot,
the others cold, and a small heater inside the plate.  The initial condition is built in (a hot
disc) or, with ``--input``, the grid a previous stage wrote, so stages chain (spinup -> main ->
analysis).  Pure Python lists and the standard library only.  The result is written atomically
to ``OUTPUT/<stage>.json`` (the grid and a few statistics) and ``OUTPUT/<stage>.png`` (a
heat map).

It speaks the attempt protocol of the subprocess executor on stdout:

- ``@taskfarm progress F step S/N`` at the start and every ~5 % of the steps, each followed
  by ``@taskfarm metric residual X``, the largest change of any cell in the last step;
- ``@taskfarm checkpoint --manifest PATH.manifest.json`` after each checkpoint, every
  ``--checkpoint-every`` steps and at the first step boundary after a **SIGUSR1** (checkpoint
  now);
- ``@taskfarm metric total_heat X`` at the end.

Checkpoints go to ``--checkpoint-dir``, else ``$TASKFARM_CHECKPOINT_DIR``, else
``OUTPUT/checkpoints``.  A checkpoint is written to a temporary file, fsynced and renamed into
place; its first line holds a SHA-256 of the rest, and it records the stage, the step and a
fingerprint of the initial condition.  Then, beside it, its manifest (``<name>.manifest.json``
in the format of ``actors.executors.write_manifest``: the file's size and SHA-256, and the
checkpoint file as what to resume from), written the same way, is reported: the agent verifies
the checkpoint before it counts, keeps the job's ``checkpoint_retention`` newest (deleting the
older ones) and, when the one to resume from fails verification, falls back to the one before.
Run by an agent (``$TASKFARM_EXECUTOR_ID`` set) the program leaves deleting to it; run alone it
keeps the two newest of the stage itself.  When ``$TASKFARM_RESUME_FROM`` names a checkpoint,
the run still checks it (defence in depth: the agent checked the bytes, the program also checks
the stage, the initial condition and the grid) and resumes from it only if all of that checks
out; otherwise it says why on stderr and tries the older checkpoints of the stage kept beside
it, newest first, and only when none is valid starts over from step 0.  Each step depends only
on the grid before it and JSON keeps floats exactly, so a run interrupted after a checkpoint and
resumed from it ends with a grid bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import signal
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

Grid = list[list[float]]

R = 0.2  # alpha * dt / dx^2: the explicit scheme is stable for r <= 0.25
HOT_EDGE = 100.0
HEATER_POWER = 1.5  # degrees added to each heater cell per step
CHECKPOINT_MAGIC = "taskfarm-heat-checkpoint"
CHECKPOINT_VERSION = 1
KEEP_CHECKPOINTS = 2  # when run alone; under an agent, the job's checkpoint_retention
MANIFEST_SUFFIX = ".manifest.json"
PROGRESS_REPORTS = 20


class CheckpointError(Exception):
    """Raised when a checkpoint is unreadable, corrupted or belongs to another run."""


class InputError(Exception):
    """Raised when the ``--input`` grid cannot be read or is not a square grid of numbers."""


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """A saved state: ``grid`` after ``step`` steps of ``stage`` from the initial ``origin``."""

    stage: str
    step: int
    origin: str
    grid: Grid


# -- the numerics ------------------------------------------------------------------------------


def initial_grid(size: int) -> Grid:
    """Return the built-in initial condition: a hot top edge and a hot disc in a cold plate."""
    cy, cx, radius = 0.6 * size, 0.35 * size, 0.15 * size
    grid = [
        [80.0 if (i - cy) ** 2 + (j - cx) ** 2 <= radius * radius else 0.0 for j in range(size)]
        for i in range(size)
    ]
    grid[0] = [HOT_EDGE] * size
    for i in range(1, size):
        grid[i][0] = grid[i][-1] = 0.0
    grid[-1] = [0.0] * size
    return grid


def heater_cells(size: int) -> dict[int, range]:
    """Return the heater's columns by row: a small block in the lower right of the plate."""
    rows = range(max(1, int(0.7 * size)), min(size - 1, int(0.8 * size) + 1))
    columns = range(max(1, int(0.65 * size)), min(size - 1, int(0.75 * size) + 1))
    return dict.fromkeys(rows, columns)


def advance(grid: Grid, heater: dict[int, range]) -> Grid:
    """Return the grid one time step later; the edges stay fixed."""
    new = [grid[0]]  # rows are never mutated once built, so the edges can be shared
    for i in range(1, len(grid) - 1):
        up, row, down = grid[i - 1], grid[i], grid[i + 1]
        inner = [
            c + R * (n + s + w + e - 4.0 * c)
            for n, s, w, c, e in zip(
                up[1:-1], down[1:-1], row[:-2], row[1:-1], row[2:], strict=True
            )
        ]
        next_row = [row[0], *inner, row[-1]]
        for j in heater.get(i, ()):
            next_row[j] += HEATER_POWER
        new.append(next_row)
    new.append(grid[-1])
    return new


def max_change(before: Grid, after: Grid) -> float:
    """Return the largest absolute change of any cell between two grids."""
    return max(
        max(abs(a - b) for a, b in zip(old, new, strict=True))
        for old, new in zip(before, after, strict=True)
    )


def fingerprint(grid: Grid) -> str:
    """Return a SHA-256 of the grid's exact values (a resumed run must start from the same)."""
    return hashlib.sha256(json.dumps(grid).encode()).hexdigest()


def _validate_grid(value: object) -> Grid:
    if not isinstance(value, list) or len(value) < 3:
        raise ValueError("expected a list of at least 3 rows")
    grid: Grid = []
    for row in value:
        if not isinstance(row, list) or len(row) != len(value):
            raise ValueError(f"expected a square grid of {len(value)} x {len(value)} numbers")
        if not all(type(x) in (int, float) and math.isfinite(x) for x in row):
            raise ValueError("expected finite numbers in every cell")
        grid.append([float(x) for x in row])
    return grid


def load_input(path: Path) -> Grid:
    """Return the grid stored in ``path``: a previous stage's output, or a bare grid.

    Raises:
        InputError: the file cannot be read or does not hold a square grid of numbers.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return _validate_grid(document["grid"] if isinstance(document, dict) else document)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot use {path} as input: {e}") from e


# -- checkpoints and files ---------------------------------------------------------------------


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temp.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    """Return the file contents for ``checkpoint``: a header with a SHA-256, then the state."""
    body = json.dumps(
        {
            "stage": checkpoint.stage,
            "step": checkpoint.step,
            "origin": checkpoint.origin,
            "grid": checkpoint.grid,
        },
        separators=(",", ":"),
    ).encode()
    digest = hashlib.sha256(body).hexdigest()
    return f"{CHECKPOINT_MAGIC} {CHECKPOINT_VERSION} sha256={digest}\n".encode() + body


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify the checkpoint in ``path``.

    Raises:
        CheckpointError: the file is missing, truncated, corrupted or malformed.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read it: {e.strerror or e}") from e
    header, newline, body = data.partition(b"\n")
    fields = header.decode("ascii", errors="replace").split(" ")
    expected = [CHECKPOINT_MAGIC, str(CHECKPOINT_VERSION)]
    if not newline or len(fields) != 3 or fields[:2] != expected or "=" not in fields[2]:
        raise CheckpointError("not a heat-simulation checkpoint (bad header)")
    if fields[2] != f"sha256={hashlib.sha256(body).hexdigest()}":
        raise CheckpointError("SHA-256 mismatch: the file is corrupted or truncated")
    try:
        state = json.loads(body)
        stage, step, origin = state["stage"], state["step"], state["origin"]
        if not isinstance(stage, str) or not isinstance(origin, str):
            raise ValueError("stage and origin must be strings")
        if type(step) is not int or step < 0:
            raise ValueError("step must be a non-negative integer")
        grid = _validate_grid(state["grid"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"malformed state: {e}") from e
    return Checkpoint(stage=stage, step=step, origin=origin, grid=grid)


def manifest_path(path: Path) -> Path:
    """Return where the manifest of the checkpoint file ``path`` goes (beside it)."""
    return path.with_name(f"{path.stem}{MANIFEST_SUFFIX}")


def encode_manifest(path: Path, data: bytes) -> bytes:
    """Return a manifest of the checkpoint file ``path`` holding ``data``, in the format of
    ``actors.executors.write_manifest``: its one file's size and SHA-256, and the file itself
    as the checkpoint to resume from (``TASKFARM_RESUME_FROM``)."""
    entry = {"path": path.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return json.dumps({"checkpoint": str(path.absolute()), "files": [entry]}).encode()


def save_checkpoint(directory: Path, checkpoint: Checkpoint, *, keep: int | None) -> Path:
    """Write ``checkpoint`` durably into ``directory``, then its manifest beside it (after the
    file it vouches for, so a reader never sees a manifest of a half-written checkpoint), keep
    the ``keep`` newest of the stage (``None``: delete none) and return the manifest's path."""
    path = directory / f"{checkpoint.stage}-{checkpoint.step:08d}.ckpt"
    data = encode_checkpoint(checkpoint)
    write_atomically(path, data)
    manifest = manifest_path(path)
    write_atomically(manifest, encode_manifest(path, data))
    found = sorted(directory.glob(f"{checkpoint.stage}-*.ckpt"))
    older = found[:-keep] if keep is not None else []
    left_by_kills = directory.glob(f".{checkpoint.stage}-*.*.tmp")
    for old in [*older, *map(manifest_path, older), *left_by_kills]:
        old.unlink(missing_ok=True)
    return manifest


def _resume(path: Path, *, stage: str, origin: str, size: int, steps: int) -> Checkpoint:
    checkpoint = load_checkpoint(path)
    if checkpoint.stage != stage:
        raise CheckpointError(f"it belongs to stage {checkpoint.stage!r}, not {stage!r}")
    if checkpoint.origin != origin:
        raise CheckpointError("it started from a different initial condition")
    if len(checkpoint.grid) != size:
        raise CheckpointError(f"its grid is {len(checkpoint.grid)} wide, not {size}")
    if checkpoint.step > steps:
        raise CheckpointError(f"it is at step {checkpoint.step}, beyond the {steps} to run")
    return checkpoint


# -- the heat map ------------------------------------------------------------------------------

_STOPS = [  # an "inferno"-like colour map: black, purple, red, orange, pale yellow
    (0.0, (0, 0, 4)),
    (0.25, (87, 16, 110)),
    (0.5, (188, 55, 84)),
    (0.75, (249, 142, 9)),
    (1.0, (252, 255, 164)),
]


def _palette() -> list[bytes]:
    colours = []
    for k in range(256):
        t = k / 255
        for (t0, c0), (t1, c1) in itertools.pairwise(_STOPS):
            if t <= t1:
                f = (t - t0) / (t1 - t0)
                colours.append(bytes(round(a + (b - a) * f) for a, b in zip(c0, c1, strict=True)))
                break
    return colours


def _chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def heat_map_png(grid: Grid, *, pixels: int = 256) -> bytes:
    """Return a PNG heat map of ``grid``, about ``pixels`` wide, colours scaled to its range."""
    scale = max(1, pixels // len(grid))
    low = min(min(row) for row in grid)
    span = max(max(row) for row in grid) - low or 1.0
    palette = _palette()
    raw = bytearray()
    for row in grid:
        line = b"\x00" + b"".join(palette[int(255 * (x - low) / span)] * scale for x in row)
        raw += line * scale
    size = len(grid) * scale
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(bytes(raw), 9)),
            _chunk(b"IEND", b""),
        ]
    )


# -- the program -------------------------------------------------------------------------------


def report(line: str) -> None:
    """Write one attempt-protocol report line, flushed at once (stdout may be a pipe)."""
    print(f"@taskfarm {line}", flush=True)


def warn(message: str) -> None:
    """Write a diagnostic line on stderr."""
    print(f"heat_simulation: {message}", file=sys.stderr, flush=True)


class _CheckpointRequest:
    """Set by the SIGUSR1 handler, acted on by the main loop at the next step boundary."""

    def __init__(self) -> None:
        self.pending = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m domains.scientific.heat_simulation",
        description="Run one stage of a checkpointed 2-D heat-equation simulation.",
    )
    parser.add_argument("--stage", required=True, help="the stage name (names the outputs)")
    parser.add_argument("--steps", type=_non_negative, required=True, help="time steps to run")
    parser.add_argument("--output", type=Path, required=True, help="directory for the results")
    parser.add_argument("--size", type=_non_negative, help="grid points per side (default 64)")
    parser.add_argument("--input", type=Path, help="start from this stage output (or grid)")
    parser.add_argument(
        "--checkpoint-every", type=_non_negative, help="steps between checkpoints (0: never)"
    )
    parser.add_argument("--checkpoint-dir", type=Path, help="where checkpoints go")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage with command-line arguments ``argv``; return the exit code."""
    request = _CheckpointRequest()
    signal.signal(signal.SIGUSR1, request)  # first: SIGUSR1's default action kills
    parser = _parser()
    args = parser.parse_args(argv)
    stage: str = args.stage
    steps: int = args.steps
    output: Path = args.output
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", stage):  # it names files and globs
        parser.error(f"--stage must be a plain name (letters, digits, _ . -), got {stage!r}")
    if args.input is not None:
        try:
            start = load_input(args.input)
        except InputError as e:
            warn(str(e))
            return 1
        if args.size is not None and args.size != len(start):
            parser.error(f"--size {args.size} but the input grid is {len(start)} wide")
    else:
        size = 64 if args.size is None else args.size
        if size < 3:
            parser.error("--size must be at least 3")
        start = initial_grid(size)
    size = len(start)
    origin = fingerprint(start)
    every: int = max(1, steps // 10) if args.checkpoint_every is None else args.checkpoint_every
    env_dir = os.environ.get("TASKFARM_CHECKPOINT_DIR")
    checkpoint_dir: Path = args.checkpoint_dir or (
        Path(env_dir) if env_dir else output / "checkpoints"
    )

    # An agent deletes the checkpoints its job no longer keeps; deleting them here as well
    # would take away the older ones it falls back to.
    keep = None if os.environ.get("TASKFARM_EXECUTOR_ID") else KEEP_CHECKPOINTS

    grid, step = start, 0
    resume_from = os.environ.get("TASKFARM_RESUME_FROM")
    if resume_from:
        # The checkpoint named, else the older ones of this stage kept beside it, newest first:
        # a damaged newest checkpoint costs one interval of work, not the whole run.
        named = Path(resume_from)
        older = sorted(named.parent.glob(f"{stage}-*.ckpt"), reverse=True)
        for candidate in [named, *(p for p in older if p.name < named.name)]:
            try:
                checkpoint = _resume(candidate, stage=stage, origin=origin, size=size, steps=steps)
            except CheckpointError as e:
                warn(f"invalid checkpoint {candidate}: {e}")
                continue
            grid, step = checkpoint.grid, checkpoint.step
            warn(f"resuming from step {step} ({candidate})")
            break
        else:
            warn("no valid checkpoint to resume from; starting over from step 0")

    heater = heater_cells(size)
    report_every = max(1, steps // PROGRESS_REPORTS)
    residual = 0.0
    report(f"progress {step / steps if steps else 1.0:.4f} step {step}/{steps}")
    while step < steps:
        previous = grid
        grid = advance(grid, heater)
        step += 1
        if step % report_every == 0 or step == steps:
            residual = max_change(previous, grid)
            report(f"progress {step / steps:.4f} step {step}/{steps}")
            report(f"metric residual {residual!r}")
        if request.pending or (every and step % every == 0 and step < steps):
            request.pending = False
            saved = Checkpoint(stage=stage, step=step, origin=origin, grid=grid)
            manifest = save_checkpoint(checkpoint_dir, saved, keep=keep)
            report(f"checkpoint --manifest {manifest}")

    total_heat = math.fsum(math.fsum(row) for row in grid)
    result = {
        "stage": stage,
        "size": size,
        "steps": steps,
        "residual": residual,
        "total_heat": total_heat,
        "min": min(min(row) for row in grid),
        "max": max(max(row) for row in grid),
        "grid": grid,
    }
    write_atomically(output / f"{stage}.json", json.dumps(result).encode())
    write_atomically(output / f"{stage}.png", heat_map_png(grid))
    report(f"metric total_heat {total_heat!r}")
    print(f"heat_simulation: wrote {output / stage}.json and {stage}.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
