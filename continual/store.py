"""The sample store: content-addressed images on disk plus a SQLite index (WAL).

    $CONTINUAL_STORE/images/ab/abcdef….jpg     one file per distinct image (sha256 of its bytes)
    $CONTINUAL_STORE/index.sqlite              one row per captured frame

A row is keyed by frame id, so ingesting the same sample twice is a no-op. The split is a
stable function of the content hash: the same image is always holdout or always train, on any
machine, whatever order it arrived in.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.settings import ROWS, setting

DEFAULT_STORE: str = ROWS["CONTINUAL_STORE"].default
HOLDOUT_PCT: int = ROWS["CONTINUAL_HOLDOUT_PCT"].default  # the table's default; CONTINUAL_HOLDOUT_PCT overrides it

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    frame_id      TEXT PRIMARY KEY,
    sha256        TEXT NOT NULL,
    ext           TEXT NOT NULL,
    station       TEXT NOT NULL,
    ts            REAL NOT NULL,
    captured_at   REAL,
    ingested_at   REAL NOT NULL,
    predicted     TEXT,
    confidence    REAL,
    probs         TEXT,
    classes       TEXT,
    model_version TEXT,
    strategy      TEXT,
    score         REAL,
    meta          TEXT,
    split         TEXT NOT NULL,
    label         TEXT,
    label_source  TEXT,
    labelled_at   REAL,
    used_in       TEXT
);
CREATE INDEX IF NOT EXISTS samples_label ON samples(label);
CREATE INDEX IF NOT EXISTS samples_sha ON samples(sha256);
CREATE INDEX IF NOT EXISTS samples_station ON samples(station);
"""


def store_root(path: str | Path | None = None) -> Path:
    """`path`, else CONTINUAL_STORE, else var/continual."""
    return Path(path) if path else setting("CONTINUAL_STORE")


def split_for(sha256: str, holdout_pct: int | None = None) -> str:
    """Holdout or train, by content hash; `holdout_pct` None: CONTINUAL_HOLDOUT_PCT (checked, 0–100)."""
    pct = setting("CONTINUAL_HOLDOUT_PCT") if holdout_pct is None else holdout_pct
    return "holdout" if int(sha256[:8], 16) % 100 < pct else "train"


@dataclass(frozen=True)
class StoredSample:
    frame_id: str
    sha256: str
    path: Path
    station: str
    predicted: str | None
    confidence: float | None
    model_version: str | None
    strategy: str | None
    split: str
    label: str | None
    label_source: str | None
    meta: dict[str, Any]


class SampleStore:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = store_root(root)
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / "index.sqlite", timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- images ---------------------------------------------------------------------------------
    def image_path(self, sha256: str, ext: str) -> Path:
        return self.root / "images" / sha256[:2] / f"{sha256}.{ext}"

    def put_image(self, data: bytes, ext: str) -> str:
        """Write the image once, durably (tmp file, fsync, rename); its sha256."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.image_path(digest, ext)
        if path.exists():
            return digest
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return digest

    # -- rows ------------------------------------------------------------------------------------
    def add(self, rows: Iterable[dict[str, Any]]) -> int:
        """Insert sample rows in one transaction (existing frame ids are left as they are); rows added."""
        cols = ("frame_id", "sha256", "ext", "station", "ts", "captured_at", "ingested_at", "predicted",
                "confidence", "probs", "classes", "model_version", "strategy", "score", "meta", "split")
        sql = f"INSERT OR IGNORE INTO samples ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        now = time.time()
        before = self.db.total_changes
        with self.db:
            self.db.execute("BEGIN")
            for row in rows:
                row = {**row, "ingested_at": now, "split": row.get("split") or split_for(row["sha256"])}
                self.db.execute(sql, [row.get(c) for c in cols])
        return self.db.total_changes - before

    def set_labels(self, labels: dict[str, str], source: str) -> int:
        """frame_id -> class name; rows updated."""
        now = time.time()
        before = self.db.total_changes
        with self.db:
            self.db.execute("BEGIN")
            for frame_id, label in labels.items():
                self.db.execute("UPDATE samples SET label = ?, label_source = ?, labelled_at = ? WHERE frame_id = ?",
                                (label, source, now, frame_id))
        return self.db.total_changes - before

    def mark_used(self, frame_ids: Iterable[str], version: str) -> None:
        with self.db:
            self.db.execute("BEGIN")
            for frame_id in frame_ids:
                self.db.execute("UPDATE samples SET used_in = ? WHERE frame_id = ?", (version, frame_id))

    def samples(self, where: str = "1", params: tuple = ()) -> Iterator[StoredSample]:
        for r in self.db.execute(f"SELECT * FROM samples WHERE {where} ORDER BY ts, frame_id", params):
            yield StoredSample(
                frame_id=r["frame_id"], sha256=r["sha256"], path=self.image_path(r["sha256"], r["ext"]),
                station=r["station"], predicted=r["predicted"], confidence=r["confidence"],
                model_version=r["model_version"], strategy=r["strategy"], split=r["split"], label=r["label"],
                label_source=r["label_source"], meta=json.loads(r["meta"] or "{}"),
            )

    def unlabeled(self, limit: int | None = None) -> list[StoredSample]:
        rows = list(self.samples("label IS NULL"))
        return rows[:limit] if limit else rows

    def labelled(self) -> list[StoredSample]:
        return list(self.samples("label IS NOT NULL"))

    def count(self, where: str = "1", params: tuple = ()) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM samples WHERE {where}", params).fetchone()[0]

    def get(self, frame_id: str) -> StoredSample | None:
        return next(self.samples("frame_id = ?", (frame_id,)), None)

    def by_sha(self, sha256: str) -> list[StoredSample]:
        return list(self.samples("sha256 = ?", (sha256,)))
