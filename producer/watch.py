"""`python -m producer watch`: send image files dropped into a folder, then move them aside.

A file is sent once its size and mtime are the same on two polls in a row (a copy or upload
still in progress keeps changing), and moved to the done folder only after Redis accepted its
job. While Redis is unreachable the files stay where they are and the watcher retries with a
capped backoff: nothing is lost. Files that are not JPEG/PNG images a worker would take are
moved to the rejected folder, with a log line saying why.

Each file's frame id is derived from its name, mtime and content, and the watcher skips ids
Redis already has: a file whose enqueue succeeded but whose move failed (or whose reply was
lost, or a watcher that crashed in between) is moved on the next pass, not sent twice.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import structlog

from worker.frames import FrameError
from worker.jobs import FrameJob

from .api import Producer
from .backoff import Backoff
from .connection import REDIS_DOWN
from .images import read_image_file

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
        self.backoff = Backoff(backoff_initial, backoff_max)
        self.stop = stop or threading.Event()
        self.counters = {"enqueued": 0, "rejected": 0, "redis_errors": 0}
        self._last_seen: dict[Path, tuple[int, int]] = {}
        self._log = log.bind(station=producer.station, directory=str(self.directory))

    def run(self) -> int:
        if not self.directory.is_dir():
            self._log.error("watch.no_directory")
            return 2
        self._log.info("watch.started", done_dir=str(self.done_dir), rejected_dir=str(self.rejected_dir))
        while not self.stop.is_set():
            if self.poll_once():
                self.backoff.reset()
                delay = self.poll
            else:
                delay = self.backoff.next()
                self._log.info("watch.retrying", delay_s=round(delay, 3))
            self.stop.wait(delay)
        self._log.info("watch.stopped", **self.counters)
        return 0

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
        self._last_seen = seen
        return sorted(ready, key=lambda p: (seen[p][1], p.name))

    def poll_once(self) -> bool:
        """Send what is ready; False when Redis was unreachable (the files stay for a retry)."""
        ready = self.ready_files()
        for start in range(0, len(ready), self.batch):
            frames = self._frames(ready[start : start + self.batch])
            if not frames:
                continue
            try:
                self._enqueue([frame for frame, _ in frames])
            except REDIS_DOWN as exc:
                self.counters["redis_errors"] += 1
                self._log.warning("watch.redis_unreachable", error=str(exc), waiting_files=len(ready) - start)
                return False
            for frame, path in frames:
                target = self._move(path, self.done_dir)
                if target is not None:
                    self.counters["enqueued"] += 1
                    self._log.info("watch.enqueued", file=path.name, frame_id=frame["id"], moved_to=str(target))
        return True

    def _frames(self, paths: list[Path]) -> list[tuple[dict[str, Any], Path]]:
        frames = []
        for path in paths:
            try:
                data = read_image_file(path)
                frame_id = self._frame_id(path, data)
                frames.append((self.producer.make_frame(data, frame_id=frame_id, meta={"filename": path.name}), path))
            except FileNotFoundError:  # taken away by someone else: not ours to report
                self._last_seen.pop(path, None)
            except FrameError as exc:
                self.counters["rejected"] += 1
                target = self._move(path, self.rejected_dir)
                self._log.warning("watch.rejected", file=path.name, reason=str(exc), moved_to=str(target))
            except OSError as exc:  # unreadable for now (permissions, a lock): try again next poll
                self._log.warning("watch.unreadable", file=path.name, error=str(exc))
        return frames

    def _frame_id(self, path: Path, data: bytes) -> str:
        h = hashlib.blake2b(digest_size=16)
        mtime_ns = self._last_seen.get(path, (0, 0))[1]  # as seen by the stability check
        h.update(f"{self.producer.station}\0{path.name}\0{mtime_ns}\0".encode())
        h.update(data)
        return h.hexdigest()

    def _enqueue(self, frames: list[dict[str, Any]]) -> None:
        """Enqueue the frames Redis does not have yet (two round trips)."""
        with self.producer.connection.pipeline(transaction=False) as pipe:
            for frame in frames:
                pipe.exists(FrameJob.key_for(frame["id"]))
            known = pipe.execute()
        self.producer.submit_frames([frame for frame, exists in zip(frames, known, strict=True) if not exists])

    def _move(self, path: Path, folder: Path) -> Path | None:
        """Move `path` into `folder` without overwriting an earlier file of the same name."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / path.name
            if target.exists():
                target = folder / f"{path.stem}.{uuid.uuid4().hex[:8]}{path.suffix}"
            shutil.move(path, target)
        except OSError as exc:
            self._log.error("watch.move_failed", file=path.name, folder=str(folder), error=str(exc))
            return None
        self._last_seen.pop(path, None)
        return target
