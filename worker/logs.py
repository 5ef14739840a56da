"""The one logging setup of every visionqueue entry point: structlog, JSON when not on a terminal.

Workers, producers (`producer.logs` re-exports this), the gateway, the trainer and the learning loop
all call `configure_logging`; what they leave unsaid comes from VQ_LOG_FORMAT / VQ_LOG_LEVEL
(worker.settings, scope "logging"). Library code only calls `structlog.get_logger()`, so an
application that embeds `producer.api` keeps its own setup.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from .settings import log_settings


class _CurrentStderr:
    """Whatever sys.stderr is when a line is written (test runners swap it; a bound stream goes stale)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return _isatty(sys.stderr)


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):  # closed, or file-like without a terminal
        return False


def configure_logging(fmt: str | None = None, level: str | None = None, stream: TextIO | None = None) -> None:
    """Route structlog to `stream` (stderr by default, so stdout stays machine-readable).

    `fmt` is "json", "console" or "auto" (JSON unless the stream is a terminal: systemd, Kubernetes
    and log shippers get JSON, a person watching gets colours); `level` "debug" … "error". Either
    left None comes from VQ_LOG_FORMAT / VQ_LOG_LEVEL; a bad value there raises SettingsError.
    """
    if fmt is None or level is None:
        env = log_settings()
        fmt, level = fmt or env.log_format, level or env.log_level
    out = stream if stream is not None else _CurrentStderr()
    json_out = fmt == "json" or (fmt == "auto" and not _isatty(out))
    renderer = structlog.processors.JSONRenderer() if json_out else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        # Not cached: tests (structlog.testing.capture_logs) and late reconfiguration must take effect.
        cache_logger_on_first_use=False,
    )
