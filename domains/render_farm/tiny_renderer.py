"""Render animation frames with a tiny deterministic ray tracer, as a taskfarm task would.

Usage::

    python -m domains.render_farm.tiny_renderer --scene orbit --frame 12 --output out/
    python -m domains.render_farm.tiny_renderer --scene bounce --frames 0-23 --output out/ \\
        [--width 240] [--height 135] [--samples 4] [--preview] [--step 4] [--quality 0.25]

A few spheres (one of them a mirror) stand on a checkered plane under one point light; the
camera (scene ``orbit``) or a ball (scene ``bounce``) moves with the frame number, so the frames
form a loop.  Each frame is written to ``OUTPUT/<scene>_<frame:04d>.png`` by a hand-written PNG
encoder (RGB, 8 bits), atomically, so a frame file is either complete or absent.  Pure Python
and the standard library only: it runs wherever taskfarm runs.  The same frame always gives a
byte-identical file.

It speaks the attempt protocol of the subprocess executor on stdout:

- ``@taskfarm progress F frame N row R/H`` about ten times per frame, over the whole chunk;
- with ``--preview``, before each frame, a quarter-size one-sample render is written to
  ``OUTPUT/previews/<scene>_<frame:04d>.png`` and reported with ``@taskfarm preview PATH``;
- ``@taskfarm metric render_seconds S`` after each frame;
- with ``--quality Q`` (a preview pass), each frame rendered at Q of the size with one ray
  per pixel into ``OUTPUT/previews/qQ/`` and reported as a preview (no checkpoints: a pass is
  short);
- ``@taskfarm checkpoint frame:N`` after each frame: frames up to N of the chunk are done.  A
  later attempt started with ``TASKFARM_RESUME_FROM=frame:N`` skips those whose file is still a
  valid PNG of the right size, and renders the rest.
"""

from __future__ import annotations

import argparse
import math
import os
import struct
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

Color = tuple[float, float, float]
Vector = tuple[float, float, float]
Tracer = Callable[[float, float, float, float, float, float, int], Color]

PERIOD = 48  # frames per loop of the animation
MAX_DEPTH = 2  # reflection bounces
PROGRESS_BANDS = 10
EPSILON = 1e-4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- PNG ---------------------------------------------------------------------------------------


def _chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def encode_png(width: int, height: int, rows: Sequence[bytes]) -> bytes:
    """Encode ``height`` rows of ``3 * width`` RGB bytes as a PNG file."""
    if len(rows) != height or any(len(row) != 3 * width for row in rows):
        raise ValueError(f"expected {height} rows of {3 * width} bytes")
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    raw = b"".join(b"\x00" + row for row in rows)  # filter type 0 on every row
    return b"".join(
        [
            PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(raw, 9)),
            _chunk(b"IEND", b""),
        ]
    )


def png_size(path: Path) -> tuple[int, int] | None:
    """Return a PNG file's ``(width, height)`` if it is complete and intact, else ``None``."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos, size, idat = len(PNG_SIGNATURE), None, b""
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            return None
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if crc != zlib.crc32(tag + body) & 0xFFFFFFFF:
            return None
        pos += 12 + length
        if tag == b"IHDR":
            width, height = struct.unpack_from(">II", body)
            size = (width, height)
        elif tag == b"IDAT":
            idat += body
        elif tag == b"IEND":
            break
    else:
        return None
    if size is None:
        return None
    try:
        raw = zlib.decompress(idat)
    except zlib.error:
        return None
    return size if len(raw) == size[1] * (1 + 3 * size[0]) else None


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temp.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


# -- the scene ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Sphere:
    """A sphere with a flat colour; ``mirror`` is the fraction of light it reflects."""

    center: Vector
    radius: float
    color: Color
    mirror: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Scene:
    """What one frame shows: the camera, the spheres on the ground plane ``y = 0``, the light."""

    eye: Vector
    target: Vector
    fov_degrees: float
    spheres: tuple[Sphere, ...]
    light: Vector


def _still_life(ball: Vector) -> tuple[Sphere, ...]:
    return (
        Sphere(center=(0.0, 1.0, 0.0), radius=1.0, color=(0.9, 0.9, 0.95), mirror=0.6),
        Sphere(center=(-2.2, 0.7, 0.8), radius=0.7, color=(0.9, 0.25, 0.2)),
        Sphere(center=(2.0, 0.6, 1.1), radius=0.6, color=(0.2, 0.45, 0.9)),
        Sphere(center=ball, radius=0.4, color=(0.95, 0.75, 0.15)),
    )


def _orbit(frame: int) -> Scene:
    angle = 2 * math.pi * (frame % PERIOD) / PERIOD
    eye = (6.0 * math.sin(angle), 2.6, -6.0 * math.cos(angle))
    return Scene(
        eye=eye,
        target=(0.0, 0.8, 0.0),
        fov_degrees=50.0,
        spheres=_still_life((0.6, 0.4, -1.9)),
        light=(-4.0, 7.0, -5.0),
    )


def _bounce(frame: int) -> Scene:
    phase = (frame % PERIOD) / PERIOD
    height = 0.4 + 2.2 * abs(math.sin(4 * math.pi * phase))  # two bounces per loop
    x = 2.4 * math.sin(2 * math.pi * phase)
    return Scene(
        eye=(0.0, 2.4, -6.5),
        target=(0.0, 0.9, 0.0),
        fov_degrees=50.0,
        spheres=_still_life((x, height, -1.6)),
        light=(-4.0, 7.0, -5.0),
    )


SCENES: dict[str, Callable[[int], Scene]] = {"bounce": _bounce, "orbit": _orbit}


def _normalize(x: float, y: float, z: float) -> Vector:
    n = math.sqrt(x * x + y * y + z * z)
    return (x / n, y / n, z / n)


def make_tracer(scene: Scene) -> Tracer:
    """Return ``trace(origin, direction, depth) -> colour`` for ``scene`` (unit directions)."""
    # Flat tuples and local names: attribute lookups dominate a pure-Python tracer.
    spheres = [
        (s.center[0], s.center[1], s.center[2], s.radius * s.radius, s.color, s.mirror)
        for s in scene.spheres
    ]
    lx, ly, lz = scene.light
    sqrt = math.sqrt

    def shadowed(px: float, py: float, pz: float) -> bool:
        dx, dy, dz = lx - px, ly - py, lz - pz
        distance = sqrt(dx * dx + dy * dy + dz * dz)
        dx, dy, dz = dx / distance, dy / distance, dz / distance
        for cx, cy, cz, r2, _, _ in spheres:
            ox, oy, oz = px - cx, py - cy, pz - cz
            b = ox * dx + oy * dy + oz * dz
            disc = b * b - (ox * ox + oy * oy + oz * oz - r2)
            if disc > 0.0:
                t = -b - sqrt(disc)
                if EPSILON < t < distance:
                    return True
        return False

    def trace(
        ox: float, oy: float, oz: float, dx: float, dy: float, dz: float, depth: int
    ) -> Color:
        nearest, hit = math.inf, -1
        for index, (cx, cy, cz, r2, _, _) in enumerate(spheres):
            px, py, pz = ox - cx, oy - cy, oz - cz
            b = px * dx + py * dy + pz * dz
            disc = b * b - (px * px + py * py + pz * pz - r2)
            if disc > 0.0:
                t = -b - sqrt(disc)
                if EPSILON < t < nearest:
                    nearest, hit = t, index
        if dy < -1e-9:
            t = -oy / dy
            if EPSILON < t < nearest:
                nearest, hit = t, len(spheres)
        if hit < 0:
            sky = 0.5 + 0.5 * dy
            return (0.55 + 0.25 * sky, 0.7 + 0.2 * sky, 0.95)
        px, py, pz = ox + nearest * dx, oy + nearest * dy, oz + nearest * dz
        if hit == len(spheres):
            nx, ny, nz, mirror = 0.0, 1.0, 0.0, 0.0
            checker = (math.floor(px) + math.floor(pz)) & 1
            fade = 1.0 / (1.0 + 0.02 * nearest * nearest)  # dim the far floor into the sky
            shade = (0.85 if checker else 0.3) * fade
            base: Color = (shade, shade, shade * 0.95)
        else:
            cx, cy, cz, r2, base, mirror = spheres[hit]
            radius = sqrt(r2)
            nx, ny, nz = (px - cx) / radius, (py - cy) / radius, (pz - cz) / radius
        qx, qy, qz = px + nx * EPSILON, py + ny * EPSILON, pz + nz * EPSILON
        tx, ty, tz = _normalize(lx - px, ly - py, lz - pz)
        diffuse = nx * tx + ny * ty + nz * tz
        specular = 0.0
        if diffuse > 0.0 and not shadowed(qx, qy, qz):
            hx, hy, hz = _normalize(tx - dx, ty - dy, tz - dz)
            specular = max(0.0, nx * hx + ny * hy + nz * hz) ** 40 * 0.6
        else:
            diffuse = 0.0
        light = 0.12 + 0.88 * diffuse
        r, g, b = base[0] * light + specular, base[1] * light + specular, base[2] * light + specular
        if mirror > 0.0 and depth < MAX_DEPTH:
            k = 2 * (dx * nx + dy * ny + dz * nz)
            rr, rg, rb = trace(qx, qy, qz, dx - k * nx, dy - k * ny, dz - k * nz, depth + 1)
            keep = 1.0 - mirror
            r, g, b = r * keep + rr * mirror, g * keep + rg * mirror, b * keep + rb * mirror
        return (r, g, b)

    return trace


def _sample_offsets(samples: int) -> list[tuple[float, float]]:
    # A fixed low-discrepancy pattern (no random numbers): renders are reproducible.
    return [((k + 0.5) / samples, (k * 0.6180339887498949 + 0.5) % 1.0) for k in range(samples)]


def render(
    scene: Scene,
    *,
    width: int,
    height: int,
    samples: int,
    on_row: Callable[[int], None] | None = None,
) -> list[bytes]:
    """Render ``scene`` and return its rows of RGB bytes; ``on_row(y)`` follows each row."""
    trace = make_tracer(scene)
    ex, ey, ez = scene.eye
    fx, fy, fz = _normalize(*(t - e for t, e in zip(scene.target, scene.eye, strict=True)))
    rx, ry, rz = _normalize(-fz, 0.0, fx)  # forward x world-up
    ux, uy, uz = ry * fz - rz * fy, rz * fx - rx * fz, rx * fy - ry * fx
    half = math.tan(math.radians(scene.fov_degrees) / 2)
    aspect = width / height
    offsets = _sample_offsets(samples)
    scale = 1.0 / samples
    gamma = 1 / 2.2
    rows: list[bytes] = []
    for y in range(height):
        row = bytearray()
        for x in range(width):
            r = g = b = 0.0
            for sx, sy in offsets:
                u = (2 * (x + sx) / width - 1) * half * aspect
                v = (1 - 2 * (y + sy) / height) * half
                dx, dy, dz = _normalize(
                    fx + u * rx + v * ux, fy + u * ry + v * uy, fz + u * rz + v * uz
                )
                cr, cg, cb = trace(ex, ey, ez, dx, dy, dz, 0)
                r, g, b = r + cr, g + cg, b + cb
            row += bytes(int(255 * min(1.0, c * scale) ** gamma + 0.5) for c in (r, g, b))
        rows.append(bytes(row))
        if on_row is not None:
            on_row(y)
    return rows


# -- the program -------------------------------------------------------------------------------


def report(line: str) -> None:
    """Write one attempt-protocol report line, flushed at once (stdout may be a pipe)."""
    print(f"@taskfarm {line}", flush=True)


def frame_path(output: Path, scene: str, frame: int) -> Path:
    """Return where frame ``frame`` of ``scene`` is written."""
    return output / f"{scene}_{frame:04d}.png"


def _frame_range(text: str) -> range:
    start, sep, end = text.partition("-")
    try:
        first, last = int(start), int(end) if sep else int(start)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START-END, got {text!r}") from None
    if first < 0 or last < first:
        raise argparse.ArgumentTypeError(f"expected 0 <= START <= END, got {text!r}")
    return range(first, last + 1)


def _frame_number(text: str) -> range:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a frame number, got {text!r}")
    return range(int(text), int(text) + 1)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m domains.render_farm.tiny_renderer",
        description="Render animation frames to PNG files with a tiny ray tracer.",
    )
    parser.add_argument("--scene", choices=sorted(SCENES), default="orbit")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--frame", type=_frame_number, help="one frame number")
    which.add_argument("--frames", type=_frame_range, help="a chunk START-END (inclusive)")
    parser.add_argument("--output", type=Path, required=True, help="directory for the frames")
    parser.add_argument("--width", type=_positive, default=240)
    parser.add_argument("--height", type=_positive, default=135)
    parser.add_argument("--samples", type=_positive, default=4, help="rays per pixel")
    parser.add_argument("--preview", action="store_true", help="write a quick preview first")
    parser.add_argument(
        "--quality",
        type=_quality,
        help="a preview pass: render at this fraction of the size (0-1], one ray per pixel, "
        "into OUTPUT/previews/q<QUALITY>/, reporting each file as a preview",
    )
    parser.add_argument(
        "--step", type=_positive, default=1, help="render every STEP-th frame of the range"
    )
    return parser


def _quality(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _resume_point(frames: range) -> int:
    """Return the last frame an earlier attempt reported done, or ``-1``."""
    token = os.environ.get("TASKFARM_RESUME_FROM", "")
    if not token:
        return -1
    kind, _, number = token.partition(":")
    if kind == "frame" and number.isdigit() and int(number) in frames:
        return int(number)
    print(f"tiny_renderer: ignoring unusable checkpoint {token!r}; rendering all", file=sys.stderr)
    return -1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the renderer with command-line arguments ``argv``; return the exit code."""
    args = _parser().parse_args(argv)
    frames: range = args.frame if args.frame is not None else args.frames
    frames = frames[:: args.step]
    output: Path = args.output
    width, height, samples = args.width, args.height, args.samples
    if args.quality is not None:
        return _preview_pass(args, frames, output)
    band = max(1, math.ceil(height / PROGRESS_BANDS))
    done_until = _resume_point(frames)

    for index, frame in enumerate(frames):
        path = frame_path(output, args.scene, frame)
        if frame <= done_until and png_size(path) == (width, height):
            print(f"tiny_renderer: frame {frame} already rendered: {path}", file=sys.stderr)
            report(f"progress {(index + 1) / len(frames):.4f} frame {frame} (kept)")
            continue
        scene = SCENES[args.scene](frame)
        started = time.perf_counter()
        if args.preview:
            small_w, small_h = max(1, width // 4), max(1, height // 4)
            small = render(scene, width=small_w, height=small_h, samples=1)
            preview = output / "previews" / path.name
            write_atomically(preview, encode_png(small_w, small_h, small))
            report(f"preview {preview}")

        def on_row(y: int, index: int = index, frame: int = frame) -> None:
            if (y + 1) % band == 0 or y + 1 == height:
                fraction = (index + (y + 1) / height) / len(frames)
                report(f"progress {fraction:.4f} frame {frame} row {y + 1}/{height}")

        rows = render(scene, width=width, height=height, samples=samples, on_row=on_row)
        write_atomically(path, encode_png(width, height, rows))
        report(f"metric render_seconds {time.perf_counter() - started:.3f}")
        report(f"checkpoint frame:{frame}")
        print(f"tiny_renderer: wrote {path}", flush=True)
    return 0


def _preview_pass(args: argparse.Namespace, frames: range, output: Path) -> int:
    """Render ``frames`` small and fast, each reported as a preview as soon as it is written."""
    quality: float = args.quality
    width = max(1, round(args.width * quality))
    height = max(1, round(args.height * quality))
    folder = output / "previews" / f"q{quality:g}"
    for index, frame in enumerate(frames):
        rows = render(SCENES[args.scene](frame), width=width, height=height, samples=1)
        path = folder / frame_path(output, args.scene, frame).name
        write_atomically(path, encode_png(width, height, rows))
        report(f"preview {path}")
        report(f"progress {(index + 1) / len(frames):.4f} preview of frame {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
