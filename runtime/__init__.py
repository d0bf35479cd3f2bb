"""The actor kernel: actors, mailboxes, supervision, clocks, timers, logging and errors."""

from ._clock import ActivityTracker, Clock, SystemClock, VirtualClock
from ._errors import (
    ActorError,
    ActorStartError,
    ActorStoppedError,
    AskTimeoutError,
    ConfigurationError,
    EscalatedFailure,
    MailboxFullError,
    MessageFailedError,
    SelfAskError,
    TaskfarmError,
)
from ._logging import bind_context, configure_logging, get_logger
from ._message import Message

__all__ = [
    "ActivityTracker",
    "ActorError",
    "ActorStartError",
    "ActorStoppedError",
    "AskTimeoutError",
    "Clock",
    "ConfigurationError",
    "EscalatedFailure",
    "MailboxFullError",
    "Message",
    "MessageFailedError",
    "SelfAskError",
    "SystemClock",
    "TaskfarmError",
    "VirtualClock",
    "bind_context",
    "configure_logging",
    "get_logger",
]
