"""Logging setup for the producer commands: structlog, JSON for machines, colours for people.

Only the CLI calls `configure`; the library modules just call `structlog.get_logger()`, so an
application that embeds `producer.api` keeps its own logging setup.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog


def configure(level: str = "info", stream: TextIO | None = None, fmt: str | None = None) -> None:
    """Send structlog events to `stream` (stderr by default, so stdout stays machine-readable).

    `fmt` is "json" or "console"; by default JSON when the stream is not a terminal (systemd,
    Kubernetes, log shippers) and the console renderer when a person is watching.
    VQ_LOG_FORMAT overrides the guess.
    """
    stream = stream or sys.stderr
    fmt = fmt or os.environ.get("VQ_LOG_FORMAT") or ("console" if _isatty(stream) else "json")
    shared: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors = [*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or file-like without a terminal
        return False
