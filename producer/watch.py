"""`python -m producer watch`: send image files dropped into a folder, then move them aside.

A file is sent once its size and mtime are the same on two polls in a row (a copy or upload
still in progress keeps changing), and moved to the done folder only after Redis confirmed its
job (the EXEC reply). While Redis is unavailable (down, restarting, READONLY, OOM, LOADING,
paused) the files stay where they are and the watcher retries with jittered backoff through the
producer's `RedisHealth`, logging once when Redis goes away and once when it is back: nothing is
lost. Past VQ_REDIS_OUTAGE_S it stops with status 3 (the files are still there for the next run).
Files that are not JPEG/PNG images a worker would take are moved to the rejected folder, with a
log line saying why.

Each file's frame id is derived from its name, mtime and content, and the producer's enqueue
skips ids Redis already has, atomically: a file whose enqueue succeeded but whose move failed (or
whose reply was lost, or a watcher that crashed in between) is moved on the next pass, not sent twice.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import structlog

from worker.frames import FrameError
from worker.redis_health import RedisOutageError, is_transient

from .api import Producer
from .images import read_image_file
from .paths import shown

log = structlog.get_logger("producer.watch")

# Names that writers use while a file is incomplete (or editors' backups): never sent.
_TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", "~")


class Watcher:
    """Polls `directory` (not its subfolders) every `poll` seconds; `run()` until `stop` is set."""

    def __init__(
        self,
        producer: Producer,
        directory: str | os.PathLike[str],
        *,
        done_dir: str | os.PathLike[str] | None = None,
        rejected_dir: str | os.PathLike[str] | None = None,
        poll: float = 1.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        batch: int = 64,
        stop: threading.Event | None = None,
    ) -> None:
        self.producer = producer
        self.directory = Path(directory)
        self.done_dir = Path(done_dir) if done_dir else self.directory / ".done"
        self.rejected_dir = Path(rejected_dir) if rejected_dir else self.directory / ".rejected"
        self.poll = poll
        self.batch = batch
        # The producer's health decides the waits (jittered backoff between these bounds) and the limit.
        producer.health.base_delay = backoff_initial
        producer.health.max_delay = backoff_max
        self.stop = stop or threading.Event()
        self.counters = {"enqueued": 0, "rejected": 0, "redis_errors": 0}
        self._last_seen: dict[Path, tuple[int, int]] = {}
        self._empty_noted: set[Path] = set()
        self._log = log.bind(station=producer.station, directory=str(self.directory))

    def run(self) -> int:
        """0 when stopped; 2 without the folder; 3 when Redis stayed away past the outage limit."""
        if not self.directory.is_dir():
            self._log.error("watch.no_directory")
            return 2
        for role, folder in (("done", self.done_dir), ("rejected", self.rejected_dir)):
            if folder.resolve() == self.directory.resolve():  # each sent file would come back as a new one
                self._log.error("watch.folder_is_the_watched_one", role=role, folder=shown(folder))
                return 2
        self._log.info("watch.started", done_dir=str(self.done_dir), rejected_dir=str(self.rejected_dir))
        status = 0
        while not self.stop.is_set():
            try:
                self.poll_once()
            except RedisOutageError as exc:
                self._log.error("watch.redis_outage", error=str(exc), waiting_files=len(self._last_seen))
                status = 3
                break
            self.stop.wait(self.poll)
        self._log.info("watch.stopped", **self.counters)
        return status

    def ready_files(self) -> list[Path]:
        """Files whose size and mtime did not change since the previous call, oldest first."""
        seen: dict[Path, tuple[int, int]] = {}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name.endswith(_TEMP_SUFFIXES):
                    continue
                try:
                    if not entry.is_file():
                        continue
                    st = entry.stat()
                except FileNotFoundError:  # removed between listing and stat
                    continue
                seen[Path(entry.path)] = (st.st_size, st.st_mtime_ns)
        # Empty files count as still being written: writers often create first, fill later.
        ready = [p for p, sig in seen.items() if sig[0] > 0 and self._last_seen.get(p) == sig]
        for path in seen.keys() - self._empty_noted:
            if seen[path][0] == 0 and self._last_seen.get(path) == seen[path]:
                self._empty_noted.add(path)  # once per file: it stays until it has bytes
                self._log.info("watch.empty_file_waits", file=shown(path.name))
        self._empty_noted &= seen.keys()
        self._last_seen = seen
        return sorted(ready, key=lambda p: (seen[p][1], p.name))

    def poll_once(self) -> bool:
        """Send what is ready, waiting out Redis faults; False when stopped while Redis was unavailable.

        Raises RedisOutageError once Redis has been unavailable longer than the producer's limit.
        """
        ready = self.ready_files()
        for start in range(0, len(ready), self.batch):
            frames = self._frames(ready[start : start + self.batch])
            if not frames:
                continue
            try:
                self.producer.health.call(functools.partial(self._enqueue, [f for f, _ in frames]), stop=self.stop)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                return False  # stopped while waiting: the files stay for the next run
            for frame, path in frames:
                target = self._move(path, self.done_dir)
                if target is not None:
                    self.counters["enqueued"] += 1
                    self._log.info("watch.enqueued", file=shown(path.name), frame_id=frame["id"],
                                   moved_to=shown(target))
        return True

    def _frames(self, paths: list[Path]) -> list[tuple[dict[str, Any], Path]]:
        frames = []
        for path in paths:
            try:
                data = read_image_file(path)
                frame_id = self._frame_id(path, data)
                meta = {"filename": shown(path.name)}
                frames.append((self.producer.make_frame(data, frame_id=frame_id, meta=meta), path))
            except FileNotFoundError:  # taken away by someone else: not ours to report
                self._last_seen.pop(path, None)
            except FrameError as exc:
                self.counters["rejected"] += 1
                target = self._move(path, self.rejected_dir)
                self._log.warning("watch.rejected", file=shown(path.name), reason=str(exc), moved_to=shown(target))
            except OSError as exc:  # unreadable for now (permissions, a lock): try again next poll
                self._log.warning("watch.unreadable", file=shown(path.name), error=str(exc))
        return frames

    def _frame_id(self, path: Path, data: bytes) -> str:
        h = hashlib.blake2b(digest_size=16)
        mtime_ns = self._last_seen.get(path, (0, 0))[1]  # as seen by the stability check
        h.update(f"{self.producer.station}\0".encode() + os.fsencode(path.name) + f"\0{mtime_ns}\0".encode())
        h.update(data)
        return h.hexdigest()

    def _enqueue(self, frames: list[dict[str, Any]]) -> None:
        """One attempt: enqueue the frames Redis does not have yet (the producer checks, atomically)."""
        try:
            self.producer.submit_frames(frames, wait_for_redis=False)
        except Exception as exc:
            if is_transient(exc):
                self.counters["redis_errors"] += 1
            raise

    def _move(self, path: Path, folder: Path) -> Path | None:
        """Move `path` into `folder` without overwriting an earlier file of the same name."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / path.name
            if target.exists():
                target = folder / f"{path.stem}.{uuid.uuid4().hex[:8]}{path.suffix}"
            shutil.move(path, target)
        except OSError as exc:
            self._log.error("watch.move_failed", file=shown(path.name), folder=str(folder), error=str(exc))
            return None
        self._last_seen.pop(path, None)
        return target
