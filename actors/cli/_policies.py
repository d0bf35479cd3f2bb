"""Which policy a coordinator runs, and which domain events its journal holds: plugins.

``taskfarm serve --policy NAME [--policy-config FILE.toml]`` looks ``NAME`` up in the
``taskfarm.policies`` entry-point group; the entry names a factory, ``factory(config: Path |
None) -> Policy``, which reads its own configuration file and raises ``ConfigurationError``
naming the file and field.  The engine's two policies are registered there too (``fifo``,
``priority-preemption``); they take no configuration file.

Domain events (a policy's command events, journaled in its ``policy:<name>`` stream) come
from the ``taskfarm.events`` group, as for ``taskfarm replay``: an entry names an
:class:`EventCodec` (merged), or a module whose import registers its events into
:data:`persistence.default_codec`.  A coordinator refuses to start when one fails to load:
it could not read its own journal back.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType

from actors.engine import FifoPolicy, Policy, PriorityPreemptionPolicy
from persistence import EventCodec, default_codec
from runtime import ConfigurationError

__all__ = [
    "EVENTS_GROUP",
    "POLICIES_GROUP",
    "fifo",
    "known_policies",
    "load_event_codecs",
    "load_policy",
    "priority_preemption",
]

POLICIES_GROUP = "taskfarm.policies"
EVENTS_GROUP = "taskfarm.events"
_POLICY_MEMBERS = ("name", "rank", "admit", "node_score", "command", "command_roles")


def _no_config(name: str, config: Path | None) -> None:
    if config is not None:
        raise ConfigurationError(
            f"the {name} policy takes no configuration file (got {config})",
            where="--policy-config",
        )


def fifo(config: Path | None) -> Policy:
    """The ``fifo`` policy: first in, first out within priority.

    Raises:
        ConfigurationError: a configuration file was given.
    """
    _no_config("fifo", config)
    return FifoPolicy()


def priority_preemption(config: Path | None) -> Policy:
    """The ``priority-preemption`` policy: FIFO within priority, and critical work that fits
    nowhere preempts lower work.

    Raises:
        ConfigurationError: a configuration file was given.
    """
    _no_config("priority-preemption", config)
    return PriorityPreemptionPolicy()


def known_policies() -> dict[str, EntryPoint]:
    """Return the registered policies by name."""
    return {entry.name: entry for entry in entry_points(group=POLICIES_GROUP)}


def load_policy(name: str, config: Path | None = None) -> Policy:
    """Build the policy registered as ``name``, with its configuration file.

    Raises:
        ConfigurationError: no policy has that name (the known ones are listed), the file
            does not exist, the plugin cannot be loaded, or its factory refuses the file.
    """
    policies = known_policies()
    entry = policies.get(name)
    if entry is None:
        known = ", ".join(sorted(policies)) or "none"
        raise ConfigurationError(
            f"unknown policy {name!r}; known policies: {known}", where="--policy"
        )
    if config is not None and not config.is_file():
        raise ConfigurationError(f"no such file: {config}", where="--policy-config")
    try:
        factory = entry.load()
    except Exception as error:  # a broken plugin is named, not a traceback
        raise ConfigurationError(
            f"policy {name!r} ({entry.value}) cannot be loaded: {type(error).__name__}: {error}",
            where="--policy",
        ) from None
    try:
        policy = factory(config)
    except ConfigurationError:
        raise
    except Exception as error:
        where = f"--policy-config {config}" if config is not None else "--policy"
        raise ConfigurationError(
            f"policy {name!r} ({entry.value}) failed to start: {type(error).__name__}: {error}",
            where=where,
        ) from None
    missing = [member for member in _POLICY_MEMBERS if not hasattr(policy, member)]
    if missing:
        raise ConfigurationError(
            f"policy {name!r} ({entry.value}) returned {type(policy).__name__}, which is not a "
            f"Policy (it has no {', '.join(missing)})",
            where="--policy",
        )
    return policy  # type: ignore[no-any-return]


def load_event_codecs() -> tuple[EventCodec, ...]:
    """Return the event codecs of every ``taskfarm.events`` plugin (and the process-wide
    registry, which module plugins fill when imported).

    Raises:
        ConfigurationError: a plugin cannot be loaded, or is neither a codec nor a module.
    """
    codecs: list[EventCodec] = []
    for entry in sorted(entry_points(group=EVENTS_GROUP), key=lambda e: e.name):
        try:
            loaded = entry.load()
        except Exception as error:
            raise ConfigurationError(
                f"the events plugin {entry.name!r} ({entry.value}) cannot be loaded: "
                f"{type(error).__name__}: {error}",
                where="taskfarm.events",
            ) from None
        if isinstance(loaded, EventCodec):
            codecs.append(loaded)
        elif not isinstance(loaded, ModuleType):  # a module registers by being imported
            raise ConfigurationError(
                f"the events plugin {entry.name!r} ({entry.value}) is a "
                f"{type(loaded).__name__}, not an EventCodec or a module",
                where="taskfarm.events",
            )
    codecs.append(default_codec)
    return tuple(codecs)
