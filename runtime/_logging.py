"""structlog, configured in one place: JSON for production, console for development.

Event names are constant snake_case strings (``job_submitted``); values go in keys from a fixed
vocabulary (``actor``, ``job_id``, ``node_id``, ``attempt``, ``stream_id``, ``position``,
``elapsed_ms``).  Per-actor context travels in contextvars, so a handler's log lines carry
``actor=...`` without passing a logger around.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog

__all__ = ["bind_context", "configure_logging", "get_logger"]


def configure_logging(
    *, renderer: Literal["json", "console"] = "console", level: str = "info"
) -> None:
    """Configure structlog for the whole process (call once, at program start)."""
    numeric_level = logging.getLevelNamesMapping().get(level.upper())
    if numeric_level is None:
        from ._errors import ConfigurationError

        raise ConfigurationError(f"unknown log level {level!r}", where="--log-level")
    final: Any = (
        structlog.processors.JSONRenderer()
        if renderer == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            final,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=_StderrLoggerFactory(),
        cache_logger_on_first_use=True,
    )


class _StderrLogger:
    """Writes each line to whatever ``sys.stderr`` is *now* (tests swap it; daemons redirect)."""

    def msg(self, message: str) -> None:
        stream = sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


class _StderrLoggerFactory:
    def __call__(self, *args: object) -> _StderrLogger:
        return _StderrLogger()


def get_logger(name: str) -> Any:
    """Return a structlog logger tagged with the component ``name``."""
    return structlog.get_logger(component=name)


def bind_context(**values: object) -> None:
    """Bind values into the current task's log context (e.g. ``actor=...``)."""
    structlog.contextvars.bind_contextvars(**values)
