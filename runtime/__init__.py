"""The actor kernel: actors, mailboxes, supervision, clocks, timers, logging and errors."""

from ._actor import Actor, ActorContext, ActorRef, Terminated
from ._bench import BenchContext, Figure, Suite, format_table, percentile
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
from ._gc import tune_gc_for_many_objects
from ._logging import bind_context, configure_logging, get_logger
from ._message import Message
from ._supervision import Supervision
from ._system import ActorSystem, DeadLetter, SystemStatistics, open_system
from ._wire import Connection, ConnectionStatistics, FrameCodec
from ._wire_auth import create_token_file, load_token
from ._wire_errors import (
    AuthenticationError,
    ConnectError,
    ConnectionClosedError,
    FrameDecodeError,
    FrameTooLargeError,
    FrameValidationError,
    ProtocolError,
    TruncatedFrameError,
    WireError,
)
from ._wire_net import ServerStatistics, TLSConfig, WireServer, open_connection, open_server, serve

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
    "AuthenticationError",
    "BenchContext",
    "Clock",
    "ConfigurationError",
    "ConnectError",
    "Connection",
    "ConnectionClosedError",
    "ConnectionStatistics",
    "DeadLetter",
    "EscalatedFailure",
    "Figure",
    "FrameCodec",
    "FrameDecodeError",
    "FrameTooLargeError",
    "FrameValidationError",
    "MailboxFullError",
    "Message",
    "MessageFailedError",
    "ProtocolError",
    "SelfAskError",
    "ServerStatistics",
    "Suite",
    "Supervision",
    "SystemClock",
    "SystemStatistics",
    "TLSConfig",
    "TaskfarmError",
    "Terminated",
    "TruncatedFrameError",
    "VirtualClock",
    "WireError",
    "WireServer",
    "bind_context",
    "configure_logging",
    "create_token_file",
    "format_table",
    "get_logger",
    "load_token",
    "open_connection",
    "open_server",
    "open_system",
    "percentile",
    "serve",
    "tune_gc_for_many_objects",
]
