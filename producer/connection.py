"""Where the producer finds Redis and how long it waits for it.

The URL and its credential are resolved by `worker.redis_health.resolve_url`, the one resolver every
component uses: `--redis-url`, else REDIS_URL_FILE, else REDIS_URL, else localhost; the password
from REDIS_PASSWORD_FILE when set. `mask_url` is re-exported for the CLI's messages.

Past one Redis (`worker.shards`): with a shard map (`--redis-urls`, REDIS_URLS_FILE or REDIS_URLS) and
no explicit URL, a producer sends to its station's shard, picked by a stable hash of the station.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import redis_health
from worker.redis_health import DEFAULT_REDIS_URL, mask_url, resolve_url
from worker.settings import ROWS, redis_outage_s
from worker.shards import ShardMap, station_url

OUTAGE_VARIABLE = "VQ_REDIS_OUTAGE_S"
DEFAULT_OUTAGE_S: float = ROWS[OUTAGE_VARIABLE].default
# A producer's commands are small; a server that has not answered in this long is paused or gone,
# and the caller is better off backing off (and a camera off dropping) than hanging on a socket.
SOCKET_TIMEOUT_S = 10.0

# Kept for code that catches "unreachable" only; what is worth retrying is `redis_health.is_transient`,
# which also covers READONLY, OOM, LOADING and a paused server.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


__all__ = ["DEFAULT_REDIS_URL", "REDIS_DOWN", "connect", "mask_url", "outage_limit", "redis_url"]

# What a producer may be given as its Redis: a URL, a client, a shard map (or its URLs), or None.
Target = str | Redis | ShardMap | Sequence[str] | None


def redis_url(url: str | None = None, station: str | None = None, urls: Sequence[str] | str | None = None) -> str:
    """The URL to connect to, password included; show it only through `mask_url`, and give `connect`
    the URL as written (it adds the password itself).

    `url` wins; else, with a `station` and a shard map (`urls`, REDIS_URLS_FILE or REDIS_URLS), the
    station's shard; else REDIS_URL_FILE / REDIS_URL.
    """
    return resolve_url(url if station is None else station_url(station, url, urls))


def outage_limit(env: Mapping[str, str] | None = None) -> float:
    """Seconds a producer waits out a Redis outage before giving up: VQ_REDIS_OUTAGE_S (default 120).

    A bad value raises SettingsError (a ValueError) naming the variable.
    """
    return redis_outage_s(env)


def connect(target: Target = None, *, socket_timeout: float = SOCKET_TIMEOUT_S, station: str | None = None) -> Redis:
    """A Redis client for `target` (a URL, an existing client, a shard map, or None for the default).

    With a `station`, a shard map (given, or configured when `target` is None) picks the station's
    shard. Timeouts are finite so that a station behind a dead network link or a paused server
    notices and backs off instead of hanging on a half-open socket.
    """
    if isinstance(target, Redis):
        return target
    if station is not None and not isinstance(target, str):
        return redis_health.connect(station_url(station, None, target), socket_timeout=socket_timeout)
    if target is not None and not isinstance(target, str):
        raise ValueError("a shard map needs a station to pick a shard by")
    return redis_health.connect(target, socket_timeout=socket_timeout)
