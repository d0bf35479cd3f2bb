"""The render farm's models: the validated ``render`` table of a job, and typed constructors
that produce engine specs (``RenderJob``) and node descriptions (``RenderNode``).

A render job is an engine job whose ``metadata`` holds a ``render`` table::

    [jobs.metadata.render]
    client = "acme"
    type = "vfx"                        # animation, vfx, lighting, compositing, simulation, ...
    deadline = 2026-03-02T18:00:00Z     # with a UTC offset
    frame_estimate = "12m"              # prior per frame; measured frame times replace it
    complexity = 7                      # 1-10
    energy_intensive = true             # night-savings may defer it to off-peak
    preview = { stride = 8, passes = [0.25, 0.5], command = ["render", "--quality", "{quality}",
                "--frames", "{start}-{end}", "--step", "{stride}"] }

``taskfarm amend JOB --set deadline=...`` sets a top-level ``deadline``, which overrides the
table's (the policy sees it within one cycle).  The policy's ``prepare`` adds the ``plan``: how
many of the job's first tasks are preview passes (and their qualities) and stride frames.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

import msgspec

from actors import Priority, Resources, RetryPolicy, SubmitJob, TaskSpec, Timeouts

__all__ = [
    "PreviewPlan",
    "PreviewSettings",
    "RenderJob",
    "RenderMetadata",
    "RenderNode",
    "RenderSettings",
    "node_class_of",
    "node_watts",
]

_Aware = Annotated[datetime, msgspec.Meta(tz=True)]
_Text = Annotated[str, msgspec.Meta(max_length=200)]
_Quality = Annotated[float, msgspec.Meta(gt=0, lt=1)]


class PreviewSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A job's preview settings; what it leaves out comes from ``farm.toml``'s ``[previews]``.

    ``stride`` renders every stride-th frame first (0 turns previews off); ``passes`` are the
    qualities of low-quality passes over those frames, run with ``command`` (whose
    ``{quality}``, ``{start}``, ``{end}`` and ``{stride}`` are filled in)."""

    stride: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] | None = None
    passes: Annotated[list[_Quality], msgspec.Meta(max_length=8)] | None = None
    command: (
        Annotated[list[Annotated[str, msgspec.Meta(max_length=4096)]], msgspec.Meta(max_length=256)]
        | None
    ) = None
    max_passes: Annotated[int, msgspec.Meta(ge=0, le=8)] | None = None
    overhead: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None


class PreviewPlan(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What ``prepare`` made of a job (written by the policy, refused from a user): its first
    ``len(passes)`` tasks are preview passes at those qualities, the next ``strides`` tasks the
    stride frames at full quality, the rest the remaining frames in chunks."""

    passes: tuple[float, ...] = ()
    strides: int = 0
    stride: int = 0


class RenderSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``render`` table of a job's metadata."""

    client: _Text
    job_type: _Text = msgspec.field(default="animation", name="type")
    deadline: _Aware | None = None
    frame_estimate: float | _Text | None = None
    complexity: Annotated[int, msgspec.Meta(ge=1, le=10)] = 5
    energy_intensive: bool = False
    preview: PreviewSettings | None = None
    max_errors: Annotated[int, msgspec.Meta(ge=1, le=1000)] | None = None
    plan: PreviewPlan | None = None


class RenderMetadata(msgspec.Struct, frozen=True, kw_only=True):
    """A render job's metadata (the policy's ``metadata_type``): the ``render`` table, and a
    top-level ``deadline`` that an amendment may set (it wins over the table's)."""

    render: RenderSettings
    deadline: _Aware | None = None

    @property
    def effective_deadline(self) -> datetime | None:
        """Return the deadline in force (an amended one first)."""
        return self.deadline if self.deadline is not None else self.render.deadline


@dataclass(frozen=True, kw_only=True)
class RenderJob:
    """A render job in code: frames cut into chunks, with its ``render`` table.

    ``to_spec()`` returns the engine's ``SubmitJob`` (``Engine.submit`` runs the policy's
    ``validate`` and ``prepare`` on it, as for a spec file).
    """

    name: str
    client: str
    command: Sequence[str]
    frames: tuple[int, int]
    chunk: int = 1
    job_type: str = "animation"
    deadline: datetime | None = None
    frame_estimate: float | None = None
    complexity: int = 5
    energy_intensive: bool = False
    preview: PreviewSettings | None = None
    priority: Priority | str = Priority.MEDIUM
    resources: Resources = field(default_factory=lambda: Resources.of(cores=1, memory="1GiB"))
    requires: Sequence[str] = ()
    labels: Sequence[str] = ()
    preemptible: bool = True
    checkpointable: bool = True
    retries: RetryPolicy = field(default_factory=lambda: RetryPolicy(max_attempts=5, backoff=30))
    max_errors: int | None = None
    max_runtime: float | None = None
    output: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    extra_metadata: Mapping[str, Any] = field(default_factory=dict)

    def settings(self) -> RenderSettings:
        """Return the job's ``render`` table."""
        return RenderSettings(
            client=self.client,
            job_type=self.job_type,
            deadline=self.deadline,
            frame_estimate=self.frame_estimate,
            complexity=self.complexity,
            energy_intensive=self.energy_intensive,
            preview=self.preview,
            max_errors=self.max_errors,
        )

    def to_spec(self, *, job_id: str | None = None, source: str = "") -> SubmitJob:
        """Return the engine spec of this job (its id is its name unless given)."""
        first, last = self.frames
        if last < first:
            raise ValueError(f"frames: {first}-{last} is empty")
        if self.chunk < 1:
            raise ValueError("chunk: at least 1")
        starts = range(first, last + 1, self.chunk)
        tasks = tuple(
            TaskSpec(
                index=k,
                name=f"{s}-{min(s + self.chunk - 1, last)}" if self.chunk > 1 else str(s),
                start=s,
                end=min(s + self.chunk - 1, last),
            )
            for k, s in enumerate(starts)
        )
        metadata = {
            **self.extra_metadata,
            "render": msgspec.to_builtins(self.settings()),
        }
        priority = self.priority if isinstance(self.priority, Priority) else Priority(self.priority)
        return SubmitJob(
            job_id=job_id or self.name,
            name=self.name,
            priority=priority,
            command=tuple(self.command),
            env=tuple(sorted(self.env.items())),
            output=self.output,
            resources=self.resources,
            tasks=tasks,
            retries=self.retries,
            timeouts=Timeouts(max_runtime=self.max_runtime),
            checkpointable=self.checkpointable,
            preemptible=self.preemptible,
            labels=tuple(sorted(set(self.labels))),
            requires=tuple(sorted(set(self.requires))),
            metadata=msgspec.json.encode(metadata, order="sorted"),
            source=source,
        )


@dataclass(frozen=True, kw_only=True)
class RenderNode:
    """A render node: its capacity and the labels that tell the policy its class, its power
    draw when it differs from its class's, and its MAC address (to wake it)."""

    name: str
    node_class: str = "default"
    cores: float = 8
    memory: int | str = "32GiB"
    gpus: int = 0
    gpu_memory: int | str = 0
    labels: Sequence[str] = ()
    watts: tuple[float, float, float] | None = None  # idle, busy, sleep
    mac: str | None = None

    @property
    def capacity(self) -> Resources:
        """Return what the node offers."""
        return Resources.of(
            cores=self.cores, memory=self.memory, gpus=self.gpus, gpu_memory=self.gpu_memory
        )

    @property
    def all_labels(self) -> tuple[str, ...]:
        """Return its labels: its own, ``class=``, and ``watts.*=`` / ``mac=`` when set."""
        labels = [*self.labels, f"class={self.node_class}"]
        if self.gpus:
            labels.append("gpu")
        if self.watts is not None:
            idle, busy, sleep = self.watts
            labels += [f"watts.idle={idle:g}", f"watts.busy={busy:g}", f"watts.sleep={sleep:g}"]
        if self.mac:
            labels.append(f"mac={self.mac}")
        return tuple(sorted(set(labels)))

    def agent_arguments(self) -> list[str]:
        """Return the ``taskfarm agent`` flags that describe this node."""
        args = ["--name", self.name, "--cores", f"{self.cores:g}", "--memory", str(self.memory)]
        if self.gpus:
            args += ["--gpus", str(self.gpus)]
        for label in self.all_labels:
            args += ["--label", label]
        return args


def node_class_of(labels: Mapping[str, str]) -> str | None:
    """Return the class a node's labels name (``class=gpu``), or None."""
    return labels.get("class") or None


def node_watts(labels: Mapping[str, str]) -> tuple[float | None, float | None, float | None]:
    """Return the idle, busy and sleep watts a node's labels override (None: its class's)."""

    def number(key: str) -> float | None:
        text = labels.get(key)
        if text is None:
            return None
        try:
            value = float(text)
        except ValueError:
            return None
        return value if value >= 0 else None

    return number("watts.idle"), number("watts.busy"), number("watts.sleep")
