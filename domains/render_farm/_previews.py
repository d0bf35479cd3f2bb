"""Previews first: how a render job's tasks are reordered at submission -- pure.

With ``stride = 8`` every 8th frame (the first, the 9th, ...) becomes a single-frame task at the
front of the job, and the other frames follow in chunks of the job's size; the engine places a
job's tasks in order, so the wrangler sees the whole shot early.  With ``passes`` (qualities
such as 0.25 and 0.5) and a preview ``command``, low-quality passes over those frames come first
of all: a pass at quality q costs q ** cost_exponent of a full frame, passes are kept while their
summed cost stays within ``overhead`` of the job's (at most ``max_passes``), and the first pass
is cut into tasks short enough to finish within ``first_within`` of the job's shortest possible
duration (its longest chunk) -- so the first preview arrives within 10 % of the job's duration
however wide the farm runs it.

A pass command fills in ``{quality}`` and ``{stride}`` here and leaves ``{start}`` and ``{end}``
(the pass's first and last frame) to the engine; it may not use ``{frame}``.  A job whose tasks
have their own commands, resources or task-level dependencies is left as it is.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from actors import SubmitJob, TaskSpec

from ._config import PreviewDefaults
from ._models import PreviewPlan, PreviewSettings

__all__ = ["PreviewChoice", "check_command", "plan_previews", "preview_choice", "substitute"]

_QUALITY = re.compile(r"\{quality(?::([^{}]*))?\}")
_STRIDE = re.compile(r"\{stride(?::([^{}]*))?\}")


@dataclass(frozen=True, slots=True)
class PreviewChoice:
    """A job's preview settings with ``farm.toml``'s defaults filled in."""

    stride: int
    passes: tuple[float, ...]
    command: tuple[str, ...]
    max_passes: int
    overhead: float
    first_within: float
    cost_exponent: float


def preview_choice(settings: PreviewSettings | None, defaults: PreviewDefaults) -> PreviewChoice:
    """Return the preview settings in force for a job."""
    own = settings or PreviewSettings()
    return PreviewChoice(
        stride=own.stride if own.stride is not None else defaults.stride,
        passes=tuple(sorted(set(own.passes))) if own.passes is not None else defaults.passes,
        command=tuple(own.command or ()),
        max_passes=own.max_passes if own.max_passes is not None else defaults.max_passes,
        overhead=own.overhead if own.overhead is not None else defaults.overhead,
        first_within=defaults.first_within,
        cost_exponent=defaults.cost_exponent,
    )


def substitute(template: str, *, quality: float, stride: int) -> str:
    """Fill ``{quality}`` and ``{stride}`` (format specs allowed) into one argument."""
    text = _QUALITY.sub(lambda m: format(quality, m.group(1) or "g"), template)
    return _STRIDE.sub(lambda m: format(stride, m.group(1) or "d"), text)


def _frames(spec: SubmitJob) -> list[int] | None:
    frames: set[int] = set()
    for task in spec.tasks:
        if task.start is None or task.end is None:
            return None
        frames.update(range(task.start, task.end + 1))
    return sorted(frames)


def _runs(frames: list[int], chunk: int) -> list[tuple[int, int]]:
    """Cut frames into runs of consecutive frames, each at most ``chunk`` long."""
    runs: list[tuple[int, int]] = []
    start = prev = None
    for frame in frames:
        if start is not None and prev is not None and frame == prev + 1 and frame - start < chunk:
            prev = frame
            continue
        if start is not None and prev is not None:
            runs.append((start, prev))
        start = prev = frame
    if start is not None and prev is not None:
        runs.append((start, prev))
    return runs


def plan_previews(
    spec: SubmitJob, choice: PreviewChoice
) -> tuple[tuple[TaskSpec, ...], PreviewPlan] | None:
    """Return the job's tasks in preview-first order and the plan, or None to leave it as is."""
    if choice.stride < 2 or any(d.child_task is not None for d in spec.dependencies):
        return None
    if any(t.command or t.env or t.resources is not None or t.requires for t in spec.tasks):
        return None
    frames = _frames(spec)
    if not frames or len(frames) < 2:
        return None
    chunk = max(
        t.end - t.start + 1 for t in spec.tasks if t.start is not None and t.end is not None
    )
    picked = frames[:: choice.stride]
    passes: list[float] = []
    if choice.command:
        budget = choice.overhead * len(frames)
        spent = 0.0
        for quality in choice.passes[: choice.max_passes]:
            cost = quality**choice.cost_exponent * len(picked)
            if spent + cost > budget + 1e-9:
                break
            spent += cost
            passes.append(quality)
    tasks: list[TaskSpec] = []
    qualities: list[float] = []  # of each pass task
    for number, quality in enumerate(passes):
        per_frame = quality**choice.cost_exponent
        if number == 0:
            size = max(1, math.floor(choice.first_within * chunk / per_frame + 1e-9))
        else:
            size = max(1, math.floor(chunk / per_frame + 1e-9))
        command = tuple(
            substitute(arg, quality=quality, stride=choice.stride) for arg in choice.command
        )
        for at in range(0, len(picked), size):
            group = picked[at : at + size]
            tasks.append(
                TaskSpec(
                    index=len(tasks),
                    name=f"preview-q{quality:g}-{group[0]}-{group[-1]}",
                    start=group[0],
                    end=group[-1],
                    command=command,
                )
            )
            qualities.append(quality)
    tasks.extend(
        TaskSpec(index=len(tasks) + k, name=str(frame), start=frame, end=frame)
        for k, frame in enumerate(picked)
    )
    chosen = set(picked)
    rest = [frame for frame in frames if frame not in chosen]
    tasks.extend(
        TaskSpec(index=len(tasks) + k, name=f"{a}-{b}" if b > a else str(a), start=a, end=b)
        for k, (a, b) in enumerate(_runs(rest, chunk))
    )
    plan = PreviewPlan(passes=tuple(qualities), strides=len(picked), stride=choice.stride)
    return tuple(tasks), plan


def check_command(command: tuple[str, ...]) -> str | None:
    """Return what is wrong with a preview command, or None."""
    if not any(_QUALITY.search(arg) for arg in command):
        return "the preview command needs a {quality} placeholder"
    if any("{frame" in arg for arg in command):
        return "a preview pass covers several frames: use {start}, {end} and {stride}, not {frame}"
    return None
