"""Simulated cameras for the demo: stations that stream synthetic inspection images at a frame rate.

Each frame carries its synthetic ground truth in `meta.truth` (what the simulated reviewer and
the accuracy figures read) and its capture condition in `meta.condition`. `switch` changes what
a camera films — the demo's drift.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis

from producer.api import BacklogFull, Producer

IMAGE_EXTS = {".jpg", ".jpeg", ".png"}


def labelled_images(root: Path) -> list[tuple[Path, str]]:
    """(path, class) for every image of an ImageFolder tree, interleaved across classes."""
    by_class = {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS)
                for d in sorted(root.iterdir()) if d.is_dir()}
    out: list[tuple[Path, str]] = []
    for i in range(max((len(v) for v in by_class.values()), default=0)):
        out += [(files[i], name) for name, files in by_class.items() if i < len(files)]
    return out


@dataclass
class Sent:
    truth: str
    condition: str
    sent_at: float


@dataclass
class SimulatedCamera:
    connection: Redis
    station: str
    fps: float
    images: list[tuple[Path, str]]
    condition: str
    ledger: dict[str, Sent] = field(default_factory=dict)
    skipped: int = 0

    def __post_init__(self) -> None:
        self._producer = Producer(self.connection, station=self.station, deadline_s=10.0, max_pending=256)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.station}", daemon=True)
        self._offset = hash(self.station) % 997

    def start(self) -> SimulatedCamera:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def switch(self, images: list[tuple[Path, str]], condition: str, fps: float | None = None) -> None:
        """Film `images` under `condition` from the next frame on (at `fps` when given)."""
        with self._lock:
            self.images, self.condition = images, condition
            self.fps = fps or self.fps

    def _run(self) -> None:
        i = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                path, truth = self.images[(i + self._offset) % len(self.images)]
                condition, fps = self.condition, self.fps
            try:
                job_id = self._producer.submit_bytes(path.read_bytes(), seq=i,
                                                     meta={"truth": truth, "condition": condition})
                self.ledger[job_id] = Sent(truth, condition, time.time())
            except BacklogFull:
                self.skipped += 1
            i += 1
            next_at += 1.0 / fps
            self._stop.wait(max(0.0, next_at - time.monotonic()))
