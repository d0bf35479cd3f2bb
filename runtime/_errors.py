"""The error hierarchy: one root, a few precise leaves with structured fields."""

from __future__ import annotations

__all__ = [
    "ActorError",
    "ActorStartError",
    "ActorStoppedError",
    "AskTimeoutError",
    "ConfigurationError",
    "EscalatedFailure",
    "MailboxFullError",
    "MessageFailedError",
    "SelfAskError",
    "TaskfarmError",
]


class TaskfarmError(Exception):
    """Raised for every failure that taskfarm raises on purpose (the root of the hierarchy).

    ``exit_status`` is what the ``taskfarm`` command exits with when the error ends it: 2 (the
    default) for input at fault, which the user can correct (a flag, a file, a spec, a name);
    leaves that report a failure of the farm rather than of the input set 1.
    """

    exit_status: int = 2


class ConfigurationError(TaskfarmError):
    """Raised when an option, argument or setting is invalid; ``where`` names it."""

    def __init__(self, message: str, *, where: str = "") -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class ActorError(TaskfarmError):
    """Raised for actor runtime failures; ``actor`` names the actor involved."""

    def __init__(self, message: str, *, actor: str) -> None:
        self.actor = actor
        super().__init__(f"{actor}: {message}")


class ActorStartError(ActorError):
    """Raised by ``spawn()`` when the new actor's ``on_start`` fails; the cause is chained."""


class ActorStoppedError(ActorError):
    """Raised when a message is sent to (or awaited from) an actor that has stopped."""


class MailboxFullError(ActorError):
    """Raised by ``tell_nowait()`` when the actor's bounded mailbox is full."""

    def __init__(self, message: str, *, actor: str, capacity: int) -> None:
        self.capacity = capacity
        super().__init__(message, actor=actor)


class AskTimeoutError(ActorError, TimeoutError):
    """Raised when ``ask()`` gets no reply within its timeout."""

    def __init__(self, message: str, *, actor: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(message, actor=actor)


class SelfAskError(ActorError):
    """Raised when an actor asks itself from inside its own handler (it would deadlock)."""


class MessageFailedError(ActorError):
    """Raised to an asker when its message crashed the actor and was sent to dead letters."""

    def __init__(self, message: str, *, actor: str, message_type: str) -> None:
        self.message_type = message_type
        super().__init__(message, actor=actor)


class EscalatedFailure(ActorError):
    """Raised when a child exhausts its restart budget and its supervisor escalates the failure."""
