"""Move captured samples from the Redis stream `continual:samples` into the store.

A consumer group reads the stream; an entry is acknowledged (and deleted from the stream, which
holds image bytes) only after its file is fsynced and its row committed. A crash at any point
loses nothing (unacknowledged entries stay pending) and a rerun duplicates nothing (rows are keyed
by frame id, files by content hash).

Two ways to run it:

* `ingest(conn, store)` drains the stream once; `continual.update` calls it first, under its lock,
  and claims every pending entry at once (a live `--follow` service that had read one stores it
  too: harmless, see the counting below).
* `python -m continual.ingest --follow` is a long-running service (compose, Kubernetes, systemd):
  it block-reads the group, stores and acknowledges, claims entries a dead consumer left pending
  for longer than `--claim-idle`, rides through Redis outages of up to VQ_REDIS_OUTAGE_S (backoff,
  one log line per change) and stops cleanly on SIGTERM/SIGINT after the batch in hand.

Past one Redis (`worker.shards`): every shard has its own `continual:samples` stream (a sample
stays on its station's shard, next to its frame). With a shard map (REDIS_URLS_FILE / REDIS_URLS,
or `--redis-urls`), `ingest(conn, store)` drains `conn` and then every other shard (one that stays
away past VQ_REDIS_OUTAGE_S is skipped with a warning: its samples wait in its stream), and
`--follow` reads all shards round-robin in one thread (one store writer; a shard that is down is
skipped while it backs off, so the others keep flowing; the service gives up only when every shard
has been away past the limit). Counts are per shard, in each shard's `vq:samples:counts`.

Accounting, in the fleet-wide hash `vq:samples:counts` next to the feed's `added`: each entry is
counted exactly once, by whoever's XACK removed it from the group's pending list, as `ingested`,
`bad` (unparseable, not stored) or `deleted` (gone from the stream while pending: XAUTOCLAIM's
deleted ids, or an entry read back without fields). So `added == ingested + deleted + bad + XLEN`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import ResponseError

from worker.frames import FrameError, check_frame_id, image_format
from worker.redis_health import RedisHealth, RedisOutageError, connect, is_transient
from worker.sample_feed import SAMPLES_COUNTS, SAMPLES_STREAM
from worker.shards import ShardMap, shard_map

from .store import SampleStore

log = structlog.get_logger("visionqueue.ingest")

GROUP = "continual"
BLOCK_MS = 2_000  # one blocking read; well under the connection's socket timeout
CLAIM_IDLE_MS = 60_000  # --follow claims another consumer's pending entry after this long

# Acknowledge and delete one batch, counting each entry only if this XACK is the one that removed it
# from the pending list (a concurrent ingester may have stored and acked it first). KEYS: stream,
# counts hash. ARGV: group, then "i"/"b"/"d" (ingested, bad, deleted) and the id, per entry.
_ACK_AND_COUNT = """
local counts = {i = 0, b = 0, d = 0}
for k = 2, #ARGV, 2 do
    local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[k + 1])
    counts[ARGV[k]] = counts[ARGV[k]] + n
    redis.call('XDEL', KEYS[1], ARGV[k + 1])
end
if counts.i > 0 then redis.call('HINCRBY', KEYS[2], 'ingested', counts.i) end
if counts.b > 0 then redis.call('HINCRBY', KEYS[2], 'bad', counts.b) end
if counts.d > 0 then redis.call('HINCRBY', KEYS[2], 'deleted', counts.d) end
return {counts.i, counts.b, counts.d}
"""


def outage_limit() -> float:
    """VQ_REDIS_OUTAGE_S (default 120): how long ingest waits for Redis; SettingsError names a bad value."""
    from worker.settings import redis_outage_s

    return redis_outage_s()


def ensure_group(conn: Redis, stream: str = SAMPLES_STREAM, group: str = GROUP) -> None:
    try:
        conn.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _row(fields: dict[bytes, bytes], store: SampleStore) -> dict[str, Any]:
    """A store row from one stream entry, checked as untrusted (anyone with the worker's ACL can XADD):
    a missing or invalid frame id (it becomes a file name in review exports) or a number that is not
    finite raises, and the entry counts as bad. The image is stored only once the rest has passed."""
    f = {k.decode(): v for k, v in fields.items()}
    image = f["image"]
    ext = "jpg" if image_format(image) == "jpeg" else "png"

    def text(key: str) -> str | None:
        return f[key].decode() if key in f else None

    def num(key: str) -> float | None:
        if key not in f:
            return None
        value = float(f[key])
        if not math.isfinite(value):  # NaN would reach SQLite as NULL, and INSERT OR IGNORE drop the row
            raise ValueError(f"{key}={value} is not a finite number")
        return value

    row = {
        "frame_id": check_frame_id(text("frame_id")), "ext": ext, "station": text("station") or "",
        "ts": num("ts") or 0.0, "captured_at": num("captured_at"), "predicted": text("label"),
        "confidence": num("confidence"), "probs": text("probs"), "classes": text("classes"),
        "model_version": text("model_version"), "strategy": text("strategy"), "score": num("score"),
        "meta": text("meta") or json.dumps({}),
    }
    row["sha256"] = store.put_image(image, ext)
    return row


def ingest(conn: Redis, store: SampleStore, batch: int = 256, stop_after: int | None = None,
           health: RedisHealth | None = None, shards: ShardMap | None = None,
           other_shards: bool = True) -> dict[str, int]:
    """Drain the stream into the store; counts of rows added, entries acknowledged, bad and deleted entries.

    With `health`, transient Redis errors are waited out (RedisOutageError past its limit). With a
    shard map (`shards`, else the configured one) and `other_shards`, every other shard is drained too,
    after `conn`.
    """
    counts = _drain(conn, store, health or RedisHealth(outage_limit(), what="redis (ingest)"), batch, stop_after)
    if stop_after is None and other_shards:
        # The updater calls this with its one connection: the other shards' samples come along.
        for index, other in _other_shards(conn, shards):
            try:
                more = _drain(other, store, RedisHealth(outage_limit(), what=f"redis shard {index} (ingest)"),
                              batch, None)
            except RedisOutageError as exc:
                log.warning("shard skipped: its samples stay in its stream until the next ingest", shard=index,
                            error=str(exc))
                continue
            finally:
                other.close()
            counts = {k: counts[k] + more[k] for k in counts}
    log.info("ingested samples", **counts)
    return counts


def _drain(conn: Redis, store: SampleStore, health: RedisHealth, batch: int, stop_after: int | None) -> dict[str, int]:
    ingester = _Ingester(conn, store, health, batch)
    ingester.ensure_group()
    # Pending entries of earlier (dead) ingesters first, then new ones.
    ingester.claim(min_idle_ms=0)
    while stop_after is None or ingester.counts["acked"] < stop_after:
        if not ingester.read_new(block_ms=None):
            break
    return dict(ingester.counts)


def _where(conn: Redis) -> tuple[object, ...]:
    kwargs = conn.connection_pool.connection_kwargs
    return kwargs.get("path") or kwargs.get("host", "localhost"), kwargs.get("port", 6379), kwargs.get("db", 0)


def _other_shards(conn: Redis, shards: ShardMap | None = None) -> Iterator[tuple[int, Redis]]:
    """(index, client) of every shard of `shards` (default: the configured map) that is not `conn`'s server."""
    shards = shards or shard_map()
    if shards is None or len(shards) < 2:
        return
    here = _where(conn)
    for index in range(len(shards)):
        other = connect(shards.url(index))
        if _where(other) == here:
            other.close()
            continue
        yield index, other


class _Skip(Exception):
    """This shard failed transiently; it is tried again after its backoff, the others meanwhile."""


class _ShardIngester:
    """One shard's ingester in the round-robin of `follow_shards`: a Redis call never waits, it fails over
    to the next shard; the shard's own health times its next try and says when it has been away too long."""

    def __init__(self, index: int, conn: Redis, store: SampleStore, max_outage_s: float, batch: int) -> None:
        self.index = index
        self.health = RedisHealth(max_outage_s, what=f"redis shard {index} (ingest)")
        self.ingester = _Ingester(conn, store, self.health, batch)
        self.ingester._redis = self._once  # type: ignore[method-assign]
        self.next_try = 0.0
        self.gone = False  # away longer than the limit; still retried, at the longest backoff
        self.grouped = False
        self.last_claim = 0.0

    def _once(self, fn: Any) -> Any:
        try:
            value = fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            try:
                delay = self.health.failed(exc)
            except RedisOutageError as outage:
                if not self.gone:
                    log.error("shard away past the limit; still retrying it", shard=self.index, error=str(outage))
                self.gone = True
                delay = self.health.max_delay
            self.next_try = time.monotonic() + delay
            raise _Skip from exc
        self.health.succeeded()
        self.gone = False
        return value

    def step(self, block_ms: int | None, claim_idle_ms: int, claim_every_s: float) -> bool:
        """One read (claiming abandoned entries now and then); True when it stored something."""
        if time.monotonic() < self.next_try:
            return False
        try:
            if not self.grouped:
                self.ingester.ensure_group()
                self.grouped = True
            if time.monotonic() - self.last_claim > claim_every_s:
                self.ingester.claim(min_idle_ms=claim_idle_ms)
                self.last_claim = time.monotonic()
            return self.ingester.read_new(block_ms=block_ms)
        except _Skip:
            return False


def follow_shards(conns: Sequence[Redis], store: SampleStore, stop: threading.Event, max_outage_s: float,
                  batch: int = 256, claim_idle_ms: int = CLAIM_IDLE_MS, block_ms: int = BLOCK_MS) -> dict[str, int]:
    """`follow` over several shards in one thread, round-robin; per-shard counts summed.

    Raises RedisOutageError only when every shard has been away longer than `max_outage_s`.
    """
    shards = [_ShardIngester(i, c, store, max_outage_s, batch) for i, c in enumerate(conns)]
    log.info("ingest following shards", shards=len(shards), stream=SAMPLES_STREAM, group=GROUP)
    busy = True
    while not stop.is_set():
        # Block only when the last round found nothing, and split the block over the shards.
        block = None if busy else max(50, block_ms // len(shards))
        busy = any([s.step(block, claim_idle_ms, 60.0) for s in shards])
        if all(s.gone for s in shards):
            raise RedisOutageError(f"every shard has been unavailable for more than {max_outage_s:.0f}s "
                                   "(VQ_REDIS_OUTAGE_S)")
        if not busy and all(time.monotonic() < s.next_try for s in shards):
            stop.wait(min(s.next_try for s in shards) - time.monotonic())
    counts = {k: sum(s.ingester.counts[k] for s in shards) for k in ("added", "acked", "bad", "deleted")}
    log.info("ingest stopped", **counts)
    return counts


def follow(conn: Redis, store: SampleStore, health: RedisHealth, stop: threading.Event, batch: int = 256,
           claim_idle_ms: int = CLAIM_IDLE_MS, block_ms: int = BLOCK_MS) -> dict[str, int]:
    """Ingest until `stop` is set: block-read new entries, and now and then claim abandoned ones.

    Raises RedisOutageError when Redis stays away past `health`'s limit.
    """
    ingester = _Ingester(conn, store, health, batch, stop=stop)
    log.info("ingest following", stream=SAMPLES_STREAM, group=GROUP, consumer=ingester.consumer,
             max_outage_s=health.max_outage_s)
    try:
        ingester.ensure_group()
        ingester.claim(min_idle_ms=claim_idle_ms)
        reads = 0
        while not stop.is_set():
            ingester.read_new(block_ms=block_ms)
            reads += 1
            if reads % 30 == 0:  # about once a minute when idle: entries a dead consumer left pending
                ingester.claim(min_idle_ms=claim_idle_ms)
    except _Stopped:
        pass
    log.info("ingest stopped", **ingester.counts)
    return dict(ingester.counts)


class _Stopped(Exception):
    """Stop was requested while waiting for Redis."""


class _Ingester:
    def __init__(self, conn: Redis, store: SampleStore, health: RedisHealth, batch: int,
                 stop: threading.Event | None = None) -> None:
        self.conn = conn
        self.store = store
        self.health = health
        self.batch = batch
        self.stop = stop
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self.counts = {"added": 0, "acked": 0, "bad": 0, "deleted": 0}
        self._ack = conn.register_script(_ACK_AND_COUNT)

    def _redis(self, fn: Any) -> Any:
        try:
            return self.health.call(fn, stop=self.stop)
        except Exception as exc:
            if self.stop is not None and self.stop.is_set() and is_transient(exc):
                raise _Stopped from exc
            raise

    def ensure_group(self) -> None:
        self._redis(lambda: ensure_group(self.conn))

    def claim(self, min_idle_ms: int) -> None:
        start = "0-0"
        while True:
            reply = self._redis(lambda s=start: self.conn.xautoclaim(
                SAMPLES_STREAM, GROUP, self.consumer, min_idle_time=min_idle_ms, start_id=s, count=self.batch))
            cursor, claimed = reply[0], reply[1]
            # Redis 7 lists the ids of entries deleted while pending (already dropped from the PEL).
            gone = reply[2] if len(reply) > 2 else []
            if gone:
                n_gone = len(gone)
                self._redis(lambda n=n_gone: self.conn.hincrby(SAMPLES_COUNTS, "deleted", n))
                self.counts["deleted"] += len(gone)
                log.warning("pending samples were deleted from the stream before ingest", n=len(gone))
            entries = [(i, f) for i, f in claimed if i is not None]
            deleted: list[bytes] = []
            if len(entries) < len(claimed):
                # Redis 6.2 returns such an entry as (nil, nil) and keeps it pending: find its id.
                deleted = self._deleted_pending(start, cursor)
            if entries or deleted:
                self._store_entries(entries, deleted)
            start = cursor
            if start in (b"0-0", "0-0"):
                return

    def _deleted_pending(self, lo: str | bytes, cursor: str | bytes) -> list[bytes]:
        """Our pending ids in [lo, cursor) whose entry no longer exists in the stream."""
        hi = "+" if cursor in (b"0-0", "0-0") else "(" + (cursor.decode() if isinstance(cursor, bytes) else cursor)
        lo = lo.decode() if isinstance(lo, bytes) else lo
        pending = self._redis(lambda: self.conn.xpending_range(SAMPLES_STREAM, GROUP, lo, hi, 10 * self.batch,
                                                               consumername=self.consumer))
        ids = [p["message_id"] for p in pending]
        if not ids:
            return []

        def probe() -> list[Any]:
            with self.conn.pipeline(transaction=False) as pipe:
                for entry_id in ids:
                    pipe.xrange(SAMPLES_STREAM, entry_id, entry_id, count=1)
                return pipe.execute()

        # Only an id whose entry is really gone: a pending entry of ours that merely was not
        # claimed this time (younger than min_idle) must not be taken for deleted.
        return [i for i, found in zip(ids, self._redis(probe), strict=True) if not found]

    def read_new(self, block_ms: int | None) -> bool:
        """One read of new entries (blocking up to `block_ms`); False when there were none."""
        response = self._redis(lambda: self.conn.xreadgroup(GROUP, self.consumer, {SAMPLES_STREAM: ">"},
                                                            count=self.batch, block=block_ms))
        if not response:
            return False
        self._store_entries(response[0][1])
        return True

    def _store_entries(self, entries: list, deleted: list[bytes] | None = None) -> None:
        rows, args = [], [GROUP]
        for entry_id in deleted or []:
            args += ["d", entry_id]
        for entry_id, fields in entries:
            if not fields:  # deleted from the stream while pending (read back without fields)
                args += ["d", entry_id]
                continue
            try:
                rows.append(_row(fields, self.store))
            except (KeyError, ValueError, FrameError) as exc:
                args += ["b", entry_id]
                log.warning("bad sample entry skipped", entry=entry_id, error=str(exc))
                continue
            args += ["i", entry_id]
        self.counts["added"] += self.store.add(rows)
        # Only now, with files fsynced and rows committed, is the entry safe to forget. Retrying the
        # script after an ambiguous failure is safe: an entry already acked is not counted again.
        _, bad, n_deleted = self._redis(lambda: self._ack(keys=[SAMPLES_STREAM, SAMPLES_COUNTS], args=args))
        self.counts["acked"] += len(entries) + len(deleted or [])
        self.counts["bad"] += bad
        self.counts["deleted"] += n_deleted
        if n_deleted:
            log.warning("pending samples were deleted from the stream before ingest", n=n_deleted)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m continual.ingest",
                                description="Move continual:samples into the sample store: once (default), or as a "
                                            "service with --follow.")
    p.add_argument("--redis-url", help="default: REDIS_URL_FILE, else REDIS_URL, else redis://localhost:6379/0; "
                                       "the password from REDIS_PASSWORD_FILE when set")
    p.add_argument("--redis-urls", metavar="URL,URL,…",
                   help="shard map: read every shard's samples (default: $REDIS_URLS_FILE, else $REDIS_URLS; "
                        "--redis-url reads one Redis only)")
    p.add_argument("--store", help="sample store (default: $CONTINUAL_STORE or var/continual)")
    p.add_argument("--follow", action="store_true",
                   help="keep running: block-read new samples, ride through Redis outages (VQ_REDIS_OUTAGE_S), "
                        "stop on SIGTERM")
    p.add_argument("--claim-idle", type=float, default=CLAIM_IDLE_MS / 1000, metavar="SEC",
                   help="with --follow: take over entries another consumer left pending this long (default 60)")
    a = p.parse_args(argv)
    from worker.logs import configure_logging
    from worker.settings import SettingsError

    try:
        configure_logging()
        max_outage_s = outage_limit()
        shards = None if a.redis_url else shard_map(a.redis_urls)
        # REDIS_URL(S)_FILE / REDIS_PASSWORD_FILE: a SettingsError names the variable
        conns = [connect(u) for u in shards.urls] if shards is not None else [connect(a.redis_url)]
        conn = conns[0]
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    health = RedisHealth(max_outage_s, what="redis (ingest)")
    try:
        with SampleStore(a.store) as store:
            if not a.follow:
                # Shard 0 first (waited for, as with one Redis), then the others (skipped if away too long).
                print(json.dumps(ingest(conn, store, health=health, shards=shards, other_shards=not a.redis_url)))
                return 0
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            if len(conns) > 1:
                follow_shards(conns, store, stop, max_outage_s, claim_idle_ms=int(a.claim_idle * 1000))
            else:
                follow(conn, store, health, stop, claim_idle_ms=int(a.claim_idle * 1000))
            return 0
    except RedisOutageError as exc:
        log.error("ingest gave up: Redis stayed unavailable", error=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        for c in conns:
            c.close()


if __name__ == "__main__":
    raise SystemExit(main())
