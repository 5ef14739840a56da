"""Where the producer finds Redis: `--redis-url`, else REDIS_URL, else localhost."""

from __future__ import annotations

import os

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

DEFAULT_REDIS_URL = "redis://localhost:6379/0"

# The errors that mean "Redis is unreachable right now", worth retrying; anything else is a bug
# or a misconfiguration and should surface.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


def redis_url(url: str | None = None) -> str:
    return url or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL


def connect(target: str | Redis | None = None) -> Redis:
    """A Redis client for `target` (a URL, an existing client, or None for the default URL).

    Timeouts are finite so that a station behind a dead network link notices and backs off
    instead of hanging on a half-open socket.
    """
    if isinstance(target, Redis):
        return target
    return Redis.from_url(redis_url(target), socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)
