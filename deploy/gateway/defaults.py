"""The gateway's defaults, in a module light enough for `python -m deploy.gateway --help`.

The settings themselves (flag, variable, default, bounds) are the "gateway" rows of
worker.settings.TABLE; these names are the table's defaults, kept for the app's keyword arguments.
"""

from __future__ import annotations

from typing import Any

from worker.settings import ROWS


def _default(variable: str) -> Any:
    return ROWS[variable].default


DEFAULT_MAX_QUEUE: int = _default("VQ_GATEWAY_MAX_QUEUE")
DEFAULT_TIMEOUT: float = _default("VQ_GATEWAY_TIMEOUT")
DEFAULT_REQUEST_TIMEOUT: float = _default("VQ_GATEWAY_REQUEST_TIMEOUT")
MAX_TIMEOUT: float = ROWS["VQ_GATEWAY_REQUEST_TIMEOUT"].hi  # results stay readable 600 s; past this, poll /v1/jobs
DEFAULT_BODY_TIMEOUT: float = _default("VQ_GATEWAY_BODY_TIMEOUT")
DEFAULT_MAX_INFLIGHT_BYTES: int = _default("VQ_GATEWAY_MAX_INFLIGHT_BYTES")
DEFAULT_REDIS_FILL: float = _default("VQ_GATEWAY_REDIS_FILL")
DEFAULT_MAX_WAITERS: int = _default("VQ_GATEWAY_MAX_WAITERS")
DEFAULT_RATE_LIMIT: float = _default("VQ_GATEWAY_RATE_LIMIT")
DEFAULT_RATE_BURST: int = _default("VQ_GATEWAY_RATE_BURST")
DEFAULT_MAX_PIXELS: int = _default("VQ_GATEWAY_MAX_PIXELS")

# Not settings: how long a refused client is told to wait.
DEFAULT_RETRY_AFTER_S = 1  # Retry-After on a 429: the workers drain a full queue in seconds, not minutes
REDIS_RETRY_AFTER_S = 5  # Retry-After on a 503 while Redis is unavailable: a restart or failover takes seconds
