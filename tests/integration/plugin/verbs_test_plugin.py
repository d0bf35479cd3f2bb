"""A domain policy plugin for the tests, registered by the ``.dist-info`` beside it (found
when this folder is on the path): the policy ``test-deadline`` (``taskfarm.policies``) and its
event ``verbstest.bumped`` (``taskfarm.events``).

It shows a job's ``deadline`` metadata as a column, and has three commands: ``bump`` (role
submit; journals ``Bumped``), ``count`` (role read) and ``reset`` (role admin).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from actors.engine import CommandResult, FarmView, FifoPolicy, JobView
from persistence import Event, EventCodec
from runtime import ConfigurationError

EVENTS = EventCodec()


@EVENTS.register
class Bumped(Event, frozen=True, kw_only=True, tag="verbstest.bumped"):
    """The ``bump`` command raised the counter by ``by``."""

    by: int


class DeadlinePolicy(FifoPolicy):
    """FIFO, with a deadline column and a journaled counter."""

    name = "test-deadline"
    command_roles = {"bump": "submit", "count": "read", "reset": "admin"}

    def __init__(self, label: str = "day") -> None:
        self.label = label
        self.bumps = 0

    def describe(self, job: JobView, now: datetime) -> Mapping[str, str]:
        metadata = msgspec.json.decode(job.spec.metadata)
        return {"deadline": str(metadata.get("deadline", "none")), "shift": self.label}

    def command(
        self,
        name: str,
        arguments: Mapping[str, Any],
        farm: FarmView,
        now: datetime,
        *,
        by: str | None = None,
    ) -> CommandResult:
        if name == "bump":
            step = arguments.get("by", 1)
            if not isinstance(step, int) or isinstance(step, bool) or step < 1:
                raise ConfigurationError(f"expected a whole number >= 1, got {step!r}", where="by")
            return CommandResult(reply={"bumps": self.bumps + step}, events=[Bumped(by=step)])
        if name == "count":
            return CommandResult(reply={"bumps": self.bumps, "shift": self.label})
        if name == "reset":
            return CommandResult(reply={"bumps": 0}, events=[Bumped(by=-self.bumps)])
        return super().command(name, arguments, farm, now, by=by)

    def apply(self, event: Event) -> None:
        if isinstance(event, Bumped):
            self.bumps += event.by


def factory(config: Path | None) -> DeadlinePolicy:
    """Build the policy from its TOML file (``label = "night"``)."""
    if config is None:
        return DeadlinePolicy()
    data = tomllib.loads(config.read_text())
    label = data.get("label", "day")
    if not isinstance(label, str):
        raise ConfigurationError(f"label: expected a string, got {label!r}", where=str(config))
    return DeadlinePolicy(label)
