"""Move captured samples from the Redis stream `continual:samples` into the store.

A consumer group reads the stream; an entry is acknowledged (and deleted from the stream, which
holds image bytes) only after its file is fsynced and its row committed. The caller holds the
update lock, so any pending entry belongs to a dead ingester: it is claimed at once. A crash at any
point loses nothing (unacknowledged entries stay pending) and a rerun duplicates nothing (rows are
keyed by frame id, files by content hash).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import ResponseError

from worker.frames import FrameError, image_format
from worker.sample_feed import SAMPLES_STREAM

from .store import SampleStore

log = structlog.get_logger("visionqueue.ingest")

GROUP = "continual"


def ensure_group(conn: Redis, stream: str = SAMPLES_STREAM, group: str = GROUP) -> None:
    try:
        conn.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _row(fields: dict[bytes, bytes], store: SampleStore) -> dict[str, Any]:
    f = {k.decode(): v for k, v in fields.items()}
    image = f["image"]
    ext = "jpg" if image_format(image) == "jpeg" else "png"
    sha = store.put_image(image, ext)

    def text(key: str) -> str | None:
        return f[key].decode() if key in f else None

    def num(key: str) -> float | None:
        return float(f[key]) if key in f else None

    return {
        "frame_id": text("frame_id"), "sha256": sha, "ext": ext, "station": text("station") or "",
        "ts": num("ts") or 0.0, "captured_at": num("captured_at"), "predicted": text("label"),
        "confidence": num("confidence"), "probs": text("probs"), "classes": text("classes"),
        "model_version": text("model_version"), "strategy": text("strategy"), "score": num("score"),
        "meta": text("meta") or json.dumps({}),
    }


def ingest(conn: Redis, store: SampleStore, batch: int = 256, stop_after: int | None = None) -> dict[str, int]:
    """Drain the stream into the store; counts of rows added, entries acknowledged and bad entries."""
    ensure_group(conn)
    consumer = f"{socket.gethostname()}-{os.getpid()}"
    counts = {"added": 0, "acked": 0, "bad": 0}
    # Pending entries of earlier (dead) ingesters first, then new ones.
    start = "0-0"
    while True:
        start, claimed, *_ = conn.xautoclaim(SAMPLES_STREAM, GROUP, consumer, min_idle_time=0, start_id=start,
                                             count=batch)
        if claimed:
            _store_entries(conn, store, claimed, counts)
        if start in (b"0-0", "0-0"):
            break
    while stop_after is None or counts["acked"] < stop_after:
        response = conn.xreadgroup(GROUP, consumer, {SAMPLES_STREAM: ">"}, count=batch)
        if not response:
            break
        _store_entries(conn, store, response[0][1], counts)
    log.info("ingested samples", **counts)
    return counts


def _store_entries(conn: Redis, store: SampleStore, entries: list, counts: dict[str, int]) -> None:
    rows, ids = [], []
    for entry_id, fields in entries:
        ids.append(entry_id)
        if not fields:  # deleted under us
            continue
        try:
            rows.append(_row(fields, store))
        except (KeyError, ValueError, FrameError) as exc:
            counts["bad"] += 1
            log.warning("bad sample entry skipped", entry=entry_id, error=str(exc))
    counts["added"] += store.add(rows)
    # Only now, with files fsynced and rows committed, is the entry safe to forget.
    with conn.pipeline(transaction=True) as pipe:
        pipe.xack(SAMPLES_STREAM, GROUP, *ids)
        pipe.xdel(SAMPLES_STREAM, *ids)
        pipe.execute()
    counts["acked"] += len(ids)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m continual.ingest",
                                description="Drain continual:samples into the sample store.")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
    p.add_argument("--store", help="sample store (default: $CONTINUAL_STORE or var/continual)")
    a = p.parse_args(argv)
    from worker.logs import configure_logging

    configure_logging()
    with SampleStore(a.store) as store:
        print(json.dumps(ingest(Redis.from_url(a.redis_url), store)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
