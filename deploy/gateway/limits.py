"""What one gateway lets in: API keys, per-key token buckets, a byte budget for frames in flight,
and a bound on waiting requests.

Everything here runs on the event loop (no locks): the Guard decides from the request's headers,
before its body is read, and the endpoints settle what the body turned out to be.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

BEARER = b"bearer "
ANONYMOUS = "anonymous"


class ApiKeys:
    """The configured keys, each with a public id (a hash prefix) for logs, rate limits and job ownership."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys: list[tuple[bytes, str]] = []
        for key in keys:
            key = key.strip()
            if not key:
                continue
            raw = key.encode()
            # The id names a key without revealing it: it lands in logs and in Redis.
            self._keys.append((raw, "key-" + hashlib.sha256(raw).hexdigest()[:12]))
        if not self._keys:
            raise ValueError("no API key given (every key was empty)")

    def __len__(self) -> int:
        return len(self._keys)

    def identify(self, x_api_key: bytes | None, authorization: bytes | None) -> str | None:
        """The id of the key the request carries, or None."""
        candidates = [x_api_key]
        if authorization is not None and authorization[: len(BEARER)].lower() == BEARER:
            candidates.append(authorization[len(BEARER):].strip())
        found = None
        # Every candidate against every key, no early exit: the time taken says nothing about
        # which header was checked or how many keys there are before the matching one.
        for candidate in candidates:
            if candidate is None:
                continue
            for raw, key_id in self._keys:
                if hmac.compare_digest(candidate, raw) and found is None:
                    found = key_id
        return found

    def identify_text(self, x_api_key: str | None, authorization: str | None) -> str | None:
        """The same check for header values as Starlette decodes them (latin-1)."""
        raw = [None if v is None else v.encode("latin-1", "replace") for v in (x_api_key, authorization)]
        return self.identify(*raw)


class TokenBuckets:
    """One token bucket per client: `rate` frames a second on average, bursts of up to `burst`.

    Idle clients' buckets are dropped past `max_clients` (a full bucket is the same as none), so
    many distinct clients cannot grow this without bound.
    """

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got {rate} and {burst}")
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str, now: float | None = None) -> float:
        """0 when a token was taken; otherwise the seconds until one is available."""
        now = time.monotonic() if now is None else now
        tokens, stamp = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - stamp) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)  # the least recently seen
        return wait


@dataclass
class Refusal:
    status: int
    detail: str
    retry_after_s: int


class Reservation:
    """Bytes held in a ByteBudget for one upload: first its declared size, then its image, until done."""

    def __init__(self, budget: ByteBudget, size: int) -> None:
        self.budget = budget
        self.size = size
        self.enqueued = False
        self.released = False

    def settle(self, size: int) -> None:
        """The image's real size, once the body is parsed (the form's overhead is given back)."""
        if not self.released:
            self.budget._adjust(self, size)

    def mark_enqueued(self) -> None:
        if not self.released and not self.enqueued:
            self.enqueued = True
            self.budget._enqueued(self)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.budget._release(self)


class ByteBudget:
    """Image bytes the gateway holds: uploads being read plus frames enqueued and not yet done.

    Two bounds, both checked before a body is read, from its Content-Length:

    * `limit_bytes` (429): this gateway's own share, which also bounds the memory its uploads take;
    * Redis's real headroom (503): `used_memory` from INFO, plus what was enqueued since that
      sample and what is being read now, must stay under `redis_fill` × `maxmemory`. The rest is
      kept for results, the sample stream, the registry and other producers. A Redis with no
      maxmemory has no headroom to read, and only the first bound applies.
    """

    def __init__(self, limit_bytes: int, redis_fill: float, retry_after_s: int) -> None:
        if limit_bytes < 1 or not 0 < redis_fill <= 1:
            raise ValueError(f"limit_bytes must be >= 1 and redis_fill in (0, 1], got {limit_bytes}, {redis_fill}")
        self.limit_bytes = limit_bytes
        self.redis_fill = redis_fill
        self.retry_after_s = retry_after_s
        self.reading = 0  # reserved, not yet enqueued
        self.in_flight = 0  # enqueued, not yet done
        self.enqueued_total = 0
        self.redis_used: int | None = None
        self.redis_max = 0
        self._enqueued_at_sample = 0
        self.jobs: dict[str, Reservation] = {}

    @property
    def held(self) -> int:
        return self.reading + self.in_flight

    @property
    def redis_limit(self) -> int | None:
        return int(self.redis_max * self.redis_fill) if self.redis_max else None

    def redis_sampled(self, used: int, maxmemory: int, enqueued_before: int) -> None:
        """An INFO memory sample; `enqueued_before` is `enqueued_total` read before INFO was sent."""
        self.redis_used, self.redis_max = used, maxmemory
        self._enqueued_at_sample = enqueued_before

    def redis_projected(self, extra: int = 0) -> int | None:
        if self.redis_used is None:
            return None
        return self.redis_used + (self.enqueued_total - self._enqueued_at_sample) + self.reading + extra

    def reserve(self, size: int) -> Reservation | Refusal:
        refused = self._refusal(size)
        if refused is not None:
            return refused
        reservation = Reservation(self, size)
        self.reading += size
        return reservation

    def grow(self, reservation: Reservation, size: int) -> Refusal | None:
        """Hold `size` bytes for an upload being read (one sent without a Content-Length grows as it
        arrives); a Refusal, holding no more, when the extra bytes do not fit."""
        extra = size - reservation.size
        if extra <= 0 or reservation.released:
            return None
        refused = self._refusal(extra)
        if refused is None:
            self._adjust(reservation, size)
        return refused

    def _refusal(self, extra: int) -> Refusal | None:
        if self.held + extra > self.limit_bytes:
            return Refusal(429, f"the gateway holds {self.held} bytes of frames in flight; {extra} more would pass "
                           f"its budget of {self.limit_bytes} bytes; retry later", self.retry_after_s)
        limit = self.redis_limit
        projected = self.redis_projected(extra)
        if limit is not None and projected is not None and projected > limit:
            return Refusal(503, "the queue's memory is nearly full; retry later", self.retry_after_s)
        return None

    def track(self, job_id: str, reservation: Reservation) -> None:
        """The frame is in Redis as `job_id`: its bytes stay held until `done(job_id)`."""
        reservation.mark_enqueued()
        if not reservation.released:
            self.jobs[job_id] = reservation

    def done(self, job_id: str) -> None:
        reservation = self.jobs.pop(job_id, None)
        if reservation is not None:
            reservation.release()

    def _adjust(self, reservation: Reservation, size: int) -> None:
        delta = size - reservation.size
        reservation.size = size
        if reservation.enqueued:
            self.in_flight += delta
        else:
            self.reading += delta

    def _enqueued(self, reservation: Reservation) -> None:
        self.reading -= reservation.size
        self.in_flight += reservation.size
        self.enqueued_total += reservation.size

    def _release(self, reservation: Reservation) -> None:
        if reservation.enqueued:
            self.in_flight -= reservation.size
        else:
            self.reading -= reservation.size


class Waiters:
    """A count of /v1/classify requests in progress, refused past `limit` rather than queued."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the waiter limit must be at least 1, got {limit}")
        self.limit = limit
        self.active = 0

    def enter(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1


def retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))
