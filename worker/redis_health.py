"""Riding through Redis faults: which errors are transient, and how long a process waits for Redis.

A worker, a producer, the gateway and the updater all meet the same faults: a restart (refused
connections, then LOADING while the AOF replays), a failover (READONLY), a full server (OOM under
`maxmemory`), a pause. None of them is a reason to exit. `RedisHealth` is the one place that
decides: it backs off with jitter, logs once per change of state, reports up/down to whoever
wants to know (a metric), and gives up only after `max_outage_s` of continuous failure.

Light: no torch; producers import it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import structlog
from redis import Redis
from redis import exceptions as rex

log = structlog.get_logger("visionqueue.redis")

T = TypeVar("T")

# Server replies that mean "not now" rather than "never": the same command succeeds later. Matched on
# the reply's first word (BUSYGROUP, say, is a permanent "group exists", not BUSY).
_TRANSIENT_CODES = frozenset({"OOM", "READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN", "NOREPLICAS", "BUSY",
                              "CLUSTERDOWN"})


class RedisOutageError(RuntimeError):
    """Redis stayed unreachable longer than the process is allowed to wait."""


def is_transient(exc: BaseException) -> bool:
    """True for a Redis error that a retry later can cure (down, restarting, read-only, full, paused)."""
    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError):
        return False  # a wrong credential does not heal by waiting
    if isinstance(exc, rex.ConnectionError | rex.TimeoutError):
        return True  # includes BusyLoadingError (LOADING) and socket timeouts during CLIENT PAUSE
    # redis-py maps these replies to their own classes and strips the prefix from the message
    # ("READONLY You can't write…" becomes ReadOnlyError("You can't write…")): check the class first.
    if isinstance(exc, rex.ReadOnlyError | rex.OutOfMemoryError | rex.MasterDownError | rex.TryAgainError
                  | rex.ClusterDownError):
        return True
    if isinstance(exc, rex.ResponseError):
        text = str(exc)
        # A pipeline's error is annotated "Command # 3 (…) of pipeline caused error: OOM …".
        text = text.rsplit("caused error: ", 1)[-1]
        return text.split(" ", 1)[0] in _TRANSIENT_CODES
    return False


class RedisHealth:
    """Shared by every thread of one process: Redis is up until a call fails, down until one succeeds.

    `max_outage_s` counts from the first failure after the last success, whichever thread saw them.
    """

    def __init__(self, max_outage_s: float, *, on_change: Callable[[bool], None] | None = None,
                 base_delay: float = 0.05, max_delay: float = 2.0, what: str = "redis") -> None:
        self.max_outage_s = max_outage_s
        self.on_change = on_change
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.what = what
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._failures = 0
        self.outages = 0

    @property
    def up(self) -> bool:
        return self._down_since is None

    def down_for(self) -> float:
        since = self._down_since
        return 0.0 if since is None else time.monotonic() - since

    def succeeded(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is None:
                return
            down_for = time.monotonic() - self._down_since
            self._down_since, self._failures = None, 0
        log.warning(f"{self.what} is back", down_s=round(down_for, 2))
        if self.on_change:
            self.on_change(True)

    def failed(self, exc: BaseException) -> float:
        """Record a transient failure; the seconds to wait before trying again.

        Raises RedisOutageError once Redis has been away longer than `max_outage_s`.
        """
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
                self.outages += 1
            self._failures += 1
            failures = self._failures
            down_for = time.monotonic() - self._down_since
        if first:
            log.warning(f"{self.what} is unavailable; waiting for it", error=_short(exc),
                        max_outage_s=self.max_outage_s)
            if self.on_change:
                self.on_change(False)
        if down_for > self.max_outage_s:
            raise RedisOutageError(
                f"{self.what} has been unavailable for {down_for:.0f}s, past the limit of {self.max_outage_s:.0f}s "
                f"(VQ_REDIS_OUTAGE_S); last error: {_short(exc)}"
            ) from exc
        # Exponential backoff with full jitter: a fleet coming back does not stampede the server.
        cap = min(self.max_delay, self.base_delay * 2 ** min(failures, 16))
        return random.uniform(cap / 2, cap)

    def call(self, fn: Callable[[], T], *, stop: threading.Event | None = None) -> T:
        """`fn()` until it succeeds, waiting out transient Redis errors; others propagate at once.

        With `stop` set while waiting, the last error is raised instead of waiting further.
        """
        while True:
            try:
                value = fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                delay = self.failed(exc)
                if stop is not None:
                    if stop.wait(delay):
                        raise
                else:
                    time.sleep(delay)
                continue
            self.succeeded()
            return value


def connect(url: str, *, socket_timeout: float = 10.0, **kwargs: object) -> Redis:
    """A client whose calls cannot hang forever on a server that went silent (a partition, a pause).

    Blocking commands must block for less than `socket_timeout`.
    """
    kwargs.setdefault("socket_connect_timeout", 5.0)
    kwargs.setdefault("health_check_interval", 15)
    return Redis.from_url(url, socket_timeout=socket_timeout, **kwargs)


def with_timeouts(conn: Redis, socket_timeout: float = 10.0) -> Redis:
    """The same server and credentials as `conn` (built by someone else, e.g. `rq worker -u`), with timeouts."""
    kwargs = dict(conn.connection_pool.connection_kwargs)
    kwargs.setdefault("socket_connect_timeout", 5.0)
    kwargs["socket_timeout"] = socket_timeout
    kwargs.setdefault("health_check_interval", 15)
    pool = conn.connection_pool.__class__(connection_class=conn.connection_pool.connection_class, **kwargs)
    return Redis(connection_pool=pool)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"
