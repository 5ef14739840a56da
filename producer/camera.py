"""`python -m producer camera`: frames from OpenCV's VideoCapture to the inference queue.

Sources: a device index ("0"), a device path (/dev/video0), a stream URL (rtsp://, http://, …)
or a video file. Live sources are read continuously and, with `fps`, only the newest frame of
each interval is sent, so the station never ships stale buffered frames; a file is paced to
`fps` instead, frame by frame. When a live source cannot be opened or stops delivering, it is
reopened after a capped exponential backoff; a file ends at end of file (or restarts, with
`loop`). Frames the workers have no room for (`max_pending`) are skipped and counted, as are
frames that arrive while Redis is unavailable (down, restarting, READONLY, OOM, LOADING, paused):
the camera never waits for Redis, it drops those frames (`skipped_redis`), tries again after a
jittered backoff, and logs once when Redis goes away and once when it is back.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from worker.redis_health import RedisHealth, is_transient

from .api import BacklogFull, Producer
from .backoff import Backoff

log = structlog.get_logger("producer.camera")

Source = int | str
STREAM_TIMEOUT_MS = 10_000  # open and read timeout for network streams


@dataclass
class CameraOptions:
    source: Source
    fps: float | None = None
    max_frames: int | None = None  # frames taken from the source, sent or skipped
    jpeg_quality: int = 90
    loop: bool = False
    max_reconnects: int | None = None  # consecutive failed attempts before giving up; None: never
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    stats_every: float = 10.0


def parse_source(text: str) -> Source:
    """An int for a device index ("0"), the text otherwise (path or URL)."""
    return int(text) if text.strip().isdigit() else text


def is_live(source: Source) -> bool:
    """Devices and network streams are live; anything else is a file that has an end."""
    return isinstance(source, int) or "://" in source or source.startswith("/dev/")


def open_capture(source: Source) -> Any | None:
    """An opened cv2.VideoCapture, or None when OpenCV cannot open the source."""
    import cv2  # lazy: only the camera command needs OpenCV's video stack

    if isinstance(source, str) and "://" in source:
        # Without these FFmpeg may wait very long on a dead camera, and a stalled stream would
        # never reach the reconnect logic.
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS]
        capture = cv2.VideoCapture(source, cv2.CAP_ANY, params)
    else:
        capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        capture.release()
        return None
    return capture


class CameraStreamer:
    """The capture loop; `run()` returns the exit status (0 done, 1 gave up reconnecting, 2 a video file
    that cannot be opened: it does not come back by waiting, unlike a live source)."""

    def __init__(
        self,
        producer: Producer,
        options: CameraOptions,
        *,
        stop: threading.Event | None = None,
        opener: Callable[[Source], Any | None] = open_capture,
    ) -> None:
        self.producer = producer
        self.options = options
        self.stop = stop or threading.Event()
        self.opener = opener
        self.live = is_live(options.source)
        self.backoff = Backoff(options.backoff_initial, options.backoff_max)
        # No outage limit: dropping frames while Redis is away is the camera's policy, and giving
        # up would only restart a process that would drop them all the same.
        self.redis_health = RedisHealth(math.inf, on_change=self._redis_changed, base_delay=options.backoff_initial,
                                        max_delay=options.backoff_max, what="redis (camera)")
        self.counters = {
            "captured": 0, "sent": 0, "skipped_backlog": 0, "skipped_redis": 0,
            "skipped_invalid": 0, "reconnects": 0, "read_failures": 0, "loops": 0, "redis_outages": 0,
        }
        self._skipped_at_outage = 0
        self._failures = 0  # consecutive failed opens/reads
        self._redis_retry_at = 0.0
        self._next_due = 0.0
        self._next_stats = 0.0
        self._log = log.bind(station=producer.station, source=str(options.source))

    def run(self) -> int:
        status, reason = 0, "stopped"
        capture = None
        self._next_stats = time.monotonic() + self.options.stats_every
        try:
            while not self.stop.is_set():
                if self.options.max_frames is not None and self.counters["captured"] >= self.options.max_frames:
                    reason = "max_frames"
                    break
                if capture is None:
                    capture = self.opener(self.options.source)
                    if capture is None and not self.live:
                        # A file does not come back by waiting: a typo, or not a video OpenCV can read.
                        why = "no such file" if not os.path.exists(self.options.source) else "OpenCV cannot read it"
                        self._log.error("camera.cannot_open", reason=why)
                        status = 2 if self.counters["captured"] == 0 else 1
                        reason = "cannot_open"
                        break
                    if capture is None:
                        if not self._wait_before_retry("could not open the source"):
                            status, reason = (0, "stopped") if self.stop.is_set() else (1, "gave_up")
                            break
                        continue
                    self._log.info("camera.opened", live=self.live)
                frame, ts = self._read(capture)
                if frame is None:
                    capture.release()
                    capture = None
                    if self.stop.is_set():
                        break
                    if not self.live:
                        if self.options.loop:
                            self.counters["loops"] += 1
                            continue
                        reason = "end_of_file"
                        break
                    self.counters["read_failures"] += 1
                    if not self._wait_before_retry("the source stopped delivering frames"):
                        status, reason = (0, "stopped") if self.stop.is_set() else (1, "gave_up")
                        break
                    continue
                self._failures = 0
                self.backoff.reset()
                self.counters["captured"] += 1
                self._send(frame, ts)
                self._maybe_log_stats()
        finally:
            if capture is not None:
                capture.release()
            self._log.info("camera.done", reason=reason, **self.counters)
        return status

    def _read(self, capture: Any) -> tuple[Any | None, float]:
        """The next frame to send and its capture time; (None, _) when the source failed or ended."""
        fps = self.options.fps
        if self.live:
            # Keep grabbing (cheap, no decode) so the driver's buffer never goes stale, and only
            # decode the frame that falls due.
            while True:
                if not capture.grab():
                    return None, 0.0
                now = time.monotonic()
                if not fps or now >= self._next_due:
                    break
                if self.stop.is_set():
                    return None, 0.0
            ts = time.time()
            ok, frame = capture.retrieve()
        else:
            if fps:
                delay = self._next_due - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    return None, 0.0
            ok, frame = capture.read()
            ts = time.time()
        if fps:
            # Keep to the grid of slots so the rate holds on average despite jitter; but after a
            # stall longer than a slot start a new grid, rather than bursting to catch up.
            period = 1.0 / fps
            following = self._next_due + period
            now = time.monotonic()
            self._next_due = following if following > now else now + period
        return (frame if ok else None), ts

    def _send(self, frame: Any, ts: float) -> None:
        now = time.monotonic()
        if now < self._redis_retry_at:
            self.counters["skipped_redis"] += 1
            return
        try:
            if not self.producer.has_room():  # checked before encoding: a skipped frame costs nothing
                self.counters["skipped_backlog"] += 1
                self.redis_health.succeeded()
                return
            self.producer.submit_array(frame, ts=ts, jpeg_quality=self.options.jpeg_quality, wait_for_redis=False)
        except BacklogFull:
            self.counters["skipped_backlog"] += 1
            self.redis_health.succeeded()
            return
        except ValueError as exc:  # FrameError too: e.g. a 16-bit frame, or one over the size limit
            self.counters["skipped_invalid"] += 1
            if self.counters["skipped_invalid"] == 1:  # once: a bad source repeats the same fault
                self._log.warning("camera.frame_not_sent", error=str(exc))
            return
        except Exception as exc:
            if not is_transient(exc):
                raise
            # Dropped by policy; the health logs the outage once and sets the next attempt's time.
            self.counters["skipped_redis"] += 1
            self._redis_retry_at = now + self.redis_health.failed(exc)
            return
        self.redis_health.succeeded()
        self.counters["sent"] += 1

    def _redis_changed(self, up: bool) -> None:
        if up:
            self._log.warning("camera.redis_back", skipped_during_outage=self.counters["skipped_redis"]
                              - self._skipped_at_outage, **self.counters)
        else:
            self.counters["redis_outages"] += 1
            self._skipped_at_outage = self.counters["skipped_redis"] - 1  # the frame that just failed counts
            self._log.warning("camera.redis_unavailable", policy="dropping frames until Redis is back")

    def _wait_before_retry(self, why: str) -> bool:
        """Back off before reopening; False when the attempts are used up or we were stopped."""
        self._failures += 1
        limit = self.options.max_reconnects
        if limit is not None and self._failures > limit:
            self._log.error("camera.gave_up", why=why, attempts=self._failures, **self.counters)
            return False
        delay = self.backoff.next()
        self.counters["reconnects"] += 1
        self._log.warning("camera.reconnecting", why=why, attempt=self._failures, delay_s=round(delay, 3))
        return not self.stop.wait(delay)

    def _maybe_log_stats(self) -> None:
        now = time.monotonic()
        if now >= self._next_stats:
            self._next_stats = now + self.options.stats_every
            self._log.info("camera.stats", pending=self.producer.pending, **self.counters)
