"""The actor kernel: actors, mailboxes, supervision, clocks, timers, logging and errors."""

from ._actor import Actor, ActorContext, ActorRef, Terminated
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
from ._supervision import Supervision
from ._system import ActorSystem, DeadLetter, SystemStatistics, open_system

__all__ = [
    "ActivityTracker",
    "Actor",
    "ActorContext",
    "ActorError",
    "ActorRef",
    "ActorStartError",
    "ActorStoppedError",
    "ActorSystem",
    "AskTimeoutError",
    "Clock",
    "ConfigurationError",
    "DeadLetter",
    "EscalatedFailure",
    "MailboxFullError",
    "Message",
    "MessageFailedError",
    "SelfAskError",
    "Supervision",
    "SystemClock",
    "SystemStatistics",
    "TaskfarmError",
    "Terminated",
    "VirtualClock",
    "bind_context",
    "configure_logging",
    "get_logger",
    "open_system",
]
