"""``taskfarm bench checkpoints``: how fast an agent verifies a checkpoint before it counts.

- **verification**: a checkpoint of 8 files of 64 MiB (quick: 4 of 4 MiB), written by a seeded
  generator and described by :func:`write_manifest`, verified the way an agent verifies a
  reported manifest (:func:`verify_manifest` in a worker thread: sizes first, then each file
  streamed through SHA-256 in 1 MiB reads); baseline: ``sha256sum`` of the same files in the
  same run.  Both read from the page cache (the files were just written, and every round reads
  them again), so the figure is the hashing path, not the disk: on shared storage the disk or
  the network is the bound, for both alike.

The machine is shared: each rate is the best of several rounds, alternating which goes first.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from pathlib import Path

import anyio
import anyio.to_thread

from actors.executors import read_manifest, verify_manifest, write_manifest
from runtime import BenchContext, Figure, Suite

__all__ = ["CHECKPOINTS_SUITE"]

_MB = 1_000_000


def _write_checkpoint(folder: Path, files: int, size: int) -> Path:
    """Write ``files`` files of ``size`` seeded random bytes and their manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = random.Random(20261203)
    for index in range(files):
        (folder / f"part-{index:02d}.bin").write_bytes(generator.randbytes(size))
    return write_manifest(folder)


def _sha256sum(paths: list[str]) -> float:
    """Return how long ``sha256sum`` takes over ``paths`` (seconds, wall clock)."""
    program = shutil.which("sha256sum")
    if program is None:
        raise RuntimeError("sha256sum is not installed (GNU coreutils)")
    started = time.perf_counter()
    subprocess.run([program, *paths], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


async def _figure_verification(ctx: BenchContext, rounds: int) -> Figure:
    files, size = (4, 4 * 1024 * 1024) if ctx.quick else (8, 64 * 1024 * 1024)
    manifest_path = await anyio.to_thread.run_sync(
        _write_checkpoint, ctx.workdir / "checkpoint", files, size
    )
    _, manifest = await anyio.to_thread.run_sync(read_manifest, str(manifest_path))
    paths = [str(manifest_path.parent / f.path) for f in manifest.files]
    total = manifest.size
    ours: list[float] = []
    theirs: list[float] = []
    for round_ in range(rounds):
        ctx.progress(f"checkpoint verification: round {round_ + 1} of {rounds}")
        for which in ("ours", "theirs") if round_ % 2 == 0 else ("theirs", "ours"):
            if which == "ours":
                started = time.perf_counter()
                await anyio.to_thread.run_sync(verify_manifest, manifest)
                ours.append(time.perf_counter() - started)
            else:
                theirs.append(await anyio.to_thread.run_sync(_sha256sum, paths))
    return Figure(
        name="checkpoint verification (SHA-256)",
        value=total / _MB / min(ours),
        unit="MB/s",
        baseline_name="sha256sum of the same files",
        baseline_value=total / _MB / min(theirs),
        ratio_target=0.8,
        note=f"{files} files x {size // (1024 * 1024)} MiB, page cache, best of {rounds}",
    )


async def run_suite(ctx: BenchContext) -> list[Figure]:
    """Measure checkpoint verification (smaller sizes with ``ctx.quick``)."""
    rounds = 3 if ctx.quick else 5
    return [await _figure_verification(ctx, rounds)]


CHECKPOINTS_SUITE: Suite = run_suite
