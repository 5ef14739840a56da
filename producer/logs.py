"""Logging for the producer commands: `worker.logs.configure_logging`, the one setup of every entry point.

Only the CLI calls it; the library modules just call `structlog.get_logger()`, so an application
that embeds `producer.api` keeps its own logging setup. (`worker.logs` is torch-free, as producers need.)
"""

from __future__ import annotations

from typing import TextIO

from worker.logs import configure_logging

__all__ = ["configure", "configure_logging"]


def configure(level: str | None = None, stream: TextIO | None = None, fmt: str | None = None) -> None:
    """The producer CLI's spelling of `configure_logging` (level first); None: VQ_LOG_LEVEL / VQ_LOG_FORMAT."""
    configure_logging(fmt, level, stream)
