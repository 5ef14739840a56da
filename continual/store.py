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

# Schema 1 adds tables only (CREATE TABLE IF NOT EXISTS), so a store written by an older version
# opens as it is and an older reader still sees its `samples` table unchanged.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS label_history (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    frame_id  TEXT NOT NULL,
    label     TEXT NOT NULL,
    previous  TEXT,
    source    TEXT,
    at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS label_history_frame ON label_history(frame_id);
CREATE TABLE IF NOT EXISTS label_doubt (
    frame_id   TEXT PRIMARY KEY,
    label      TEXT NOT NULL,
    suggested  TEXT,
    quality    REAL,
    flagged_at REAL NOT NULL,
    run        TEXT,
    status     TEXT NOT NULL
);
"""
SCHEMA_VERSION = 1

# The row filters of the named queries. Fixed text only: values are always bound parameters.
_NEW = "label IS NOT NULL AND used_in IS NULL"
_NOT_DOUBTED = "frame_id NOT IN (SELECT frame_id FROM label_doubt WHERE status = 'open')"


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
    used_in: str | None = None


@dataclass(frozen=True)
class LabelChange:
    """One label assignment: what it became, what it was, who or what set it, and when (unix s)."""

    label: str
    previous: str | None
    source: str | None
    at: float


@dataclass(frozen=True)
class Doubt:
    """A label that confident learning doubts (`continual.doubt`): held out of training until reviewed."""

    frame_id: str
    label: str
    suggested: str | None
    quality: float | None
    run: str | None


class SampleStore:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = store_root(root)
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / "index.sqlite", timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring an older store up to SCHEMA_VERSION in place (idempotent, one transaction)."""
        if self.db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if self.db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
                return  # another process migrated it while we waited for the lock
            # Statement by statement: executescript() would commit the open transaction first.
            for statement in SCHEMA_V1.split(";"):
                if statement.strip():
                    self.db.execute(statement)
            # Labels set before the history existed get one entry each, so every label has a source.
            self.db.execute("INSERT INTO label_history (frame_id, label, previous, source, at) "
                            "SELECT frame_id, label, NULL, label_source, COALESCE(labelled_at, ingested_at) "
                            "FROM samples WHERE label IS NOT NULL")
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")

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
        """frame_id -> class name, each assignment recorded in the label history with `source` (who or
        what set it: a reviewer's name, "review import PATH", "simulated-reviewer", "fewshot"); rows updated.

        An open doubt on a frame is settled by it: the same label again means a person confirmed it
        (the updater does not doubt it again), another label replaces the doubted one."""
        now = time.time()
        updated = 0
        with self.db:
            # IMMEDIATE: the previous label is read and replaced under one write lock, so two
            # concurrent imports cannot both record the same "previous".
            self.db.execute("BEGIN IMMEDIATE")
            for frame_id, label in labels.items():
                row = self.db.execute("SELECT label FROM samples WHERE frame_id = ?", (frame_id,)).fetchone()
                if row is None:
                    continue
                self.db.execute("UPDATE samples SET label = ?, label_source = ?, labelled_at = ? WHERE frame_id = ?",
                                (label, source, now, frame_id))
                self.db.execute("INSERT INTO label_history (frame_id, label, previous, source, at) "
                                "VALUES (?, ?, ?, ?, ?)", (frame_id, label, row["label"], source, now))
                self.db.execute("UPDATE label_doubt SET status = 'confirmed' WHERE frame_id = ? AND label = ?",
                                (frame_id, label))
                self.db.execute("DELETE FROM label_doubt WHERE frame_id = ? AND label != ?", (frame_id, label))
                updated += 1
        return updated

    def label_history(self, frame_id: str) -> list[LabelChange]:
        """Every label assignment of a frame, oldest first."""
        rows = self.db.execute("SELECT label, previous, source, at FROM label_history WHERE frame_id = ? "
                               "ORDER BY at, id", (frame_id,))
        return [LabelChange(r["label"], r["previous"], r["source"], r["at"]) for r in rows]

    def mark_used(self, frame_ids: Iterable[str], version: str) -> None:
        with self.db:
            self.db.execute("BEGIN")
            for frame_id in frame_ids:
                self.db.execute("UPDATE samples SET used_in = ? WHERE frame_id = ?", (version, frame_id))

    # -- label doubt ------------------------------------------------------------------------------
    def mark_doubtful(self, doubts: Iterable[Doubt]) -> int:
        """Hold these labels out of training until a person re-labels or confirms them; rows marked."""
        now = time.time()
        n = 0
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for d in doubts:
                self.db.execute("INSERT OR REPLACE INTO label_doubt (frame_id, label, suggested, quality, flagged_at, "
                                "run, status) VALUES (?, ?, ?, ?, ?, ?, 'open')",
                                (d.frame_id, d.label, d.suggested, d.quality, now, d.run))
                n += 1
        return n

    def doubts(self) -> list[Doubt]:
        """Open doubts, oldest first."""
        rows = self.db.execute("SELECT * FROM label_doubt WHERE status = 'open' ORDER BY flagged_at, frame_id")
        return [Doubt(r["frame_id"], r["label"], r["suggested"], r["quality"], r["run"]) for r in rows]

    def doubtful(self) -> list[StoredSample]:
        """The samples whose label is doubted and not yet reviewed again."""
        return list(self._select("frame_id IN (SELECT frame_id FROM label_doubt WHERE status = 'open')"))

    def confirmed_after_doubt(self) -> set[str]:
        """Frames whose doubted label a person kept: not doubted again."""
        return {r[0] for r in self.db.execute("SELECT frame_id FROM label_doubt WHERE status = 'confirmed'")}

    # -- named queries -----------------------------------------------------------------------------
    def _select(self, where: str, params: tuple[Any, ...] = ()) -> Iterator[StoredSample]:
        # `where` is always one of this module's fixed filters; values travel as bound parameters.
        for r in self.db.execute(f"SELECT * FROM samples WHERE {where} ORDER BY ts, frame_id", params):
            yield StoredSample(
                frame_id=r["frame_id"], sha256=r["sha256"], path=self.image_path(r["sha256"], r["ext"]),
                station=r["station"], predicted=r["predicted"], confidence=r["confidence"],
                model_version=r["model_version"], strategy=r["strategy"], split=r["split"], label=r["label"],
                label_source=r["label_source"], meta=json.loads(r["meta"] or "{}"), used_in=r["used_in"],
            )

    def _count(self, where: str, params: tuple[Any, ...] = ()) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM samples WHERE {where}", params).fetchone()[0]

    def samples(self) -> Iterator[StoredSample]:
        """Every sample, in capture order."""
        return self._select("1")

    def unlabeled(self, limit: int | None = None) -> list[StoredSample]:
        rows = list(self._select("label IS NULL"))
        return rows[:limit] if limit else rows

    def labelled(self) -> list[StoredSample]:
        return list(self._select("label IS NOT NULL"))

    def new_labels(self) -> list[StoredSample]:
        """Labelled, not used by any published version yet, and not held back by an open doubt."""
        return list(self._select(f"{_NEW} AND {_NOT_DOUBTED}"))

    def used_labels(self, split: str) -> list[StoredSample]:
        """Labelled samples that earlier published versions trained on (`train`) or were judged on (`holdout`)."""
        return list(self._select("label IS NOT NULL AND used_in IS NOT NULL AND split = ?", (split,)))

    def holdout(self) -> list[StoredSample]:
        """Every labelled sample of the holdout share (by content hash)."""
        return list(self._select("label IS NOT NULL AND split = 'holdout'"))

    def used_in(self, version: str) -> list[StoredSample]:
        """The samples a published version was trained and judged on."""
        return list(self._select("used_in = ?", (version,)))

    def count(self) -> int:
        return self._count("1")

    def count_labelled(self) -> int:
        return self._count("label IS NOT NULL")

    def count_new_labels(self, label: str | None = None) -> int:
        """As `new_labels()`, counted; only those of class `label` when given."""
        if label is None:
            return self._count(f"{_NEW} AND {_NOT_DOUBTED}")
        return self._count(f"{_NEW} AND {_NOT_DOUBTED} AND label = ?", (label,))

    def latest_classes(self) -> list[str]:
        """The class names of the model that captured the most recently ingested sample."""
        row = self.db.execute("SELECT classes FROM samples WHERE classes IS NOT NULL ORDER BY ingested_at DESC "
                              "LIMIT 1").fetchone()
        return json.loads(row[0]) if row else []

    def get(self, frame_id: str) -> StoredSample | None:
        return next(self._select("frame_id = ?", (frame_id,)), None)

    def by_sha(self, sha256: str) -> list[StoredSample]:
        return list(self._select("sha256 = ?", (sha256,)))
