"""`producer camera`: a video file as the source, backlog skipping, pacing, reconnect with backoff."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog.testing
from conftest import ROOT
from redis import Redis

from producer.api import Producer
from producer.backoff import Backoff
from producer.camera import CameraOptions, CameraStreamer, is_live, parse_source
from worker.frames import validate_frame
from worker.jobs import JOB_FUNC, FrameQueue

FRAMES = 40


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-frame 64×48 MJPG .avi whose frames differ, so a resent frame would show."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (64, 48))
    assert writer.isOpened()
    for i in range(FRAMES):
        frame = np.full((48, 64, 3), (i * 6) % 256, dtype=np.uint8)
        cv2.putText(frame, str(i), (5, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
        writer.write(frame)
    writer.release()
    return path


def log_events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def run_camera(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer", "camera", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_source_kinds() -> None:
    assert parse_source("0") == 0 and is_live(0)
    assert parse_source("rtsp://cam/1") == "rtsp://cam/1" and is_live("rtsp://cam/1")
    assert is_live("http://cam/mjpg") and is_live("/dev/video2")
    assert not is_live(parse_source("clip.avi"))


def test_camera_skips_frames_over_max_pending(
    video: Path, redis_url: str, redis_conn: Redis, subprocess_env: dict[str, str]
) -> None:
    # No worker runs: the first 5 frames stay pending, every later one is skipped and counted.
    done = run_camera(["--source", str(video), "--station", "cam-1", "--max-frames", "30", "--max-pending", "5",
                       "--deadline", "30", "--redis-url", redis_url], subprocess_env)
    assert done.returncode == 0, done.stderr
    [final] = [e for e in log_events(done.stderr) if e["event"] == "camera.done"]
    assert final["reason"] == "max_frames"
    assert (final["captured"], final["sent"], final["skipped_backlog"], final["reconnects"]) == (30, 5, 25, 0)
    assert final["station"] == "cam-1"
    queue = FrameQueue(connection=redis_conn)
    assert queue.count == 5
    for seq, job in enumerate(queue.get_jobs()):
        assert job.func_name == JOB_FUNC
        frame = validate_frame(job.args[0])
        assert (frame["station"], frame["seq"]) == ("cam-1", seq)
        assert frame["meta"]["deadline_s"] == 30.0
        assert job.ttl == 30
        image = cv2.imdecode(np.frombuffer(frame["image"], np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (48, 64, 3)


def test_camera_file_stops_at_end_or_loops(video: Path, redis_url: str, redis_conn: Redis) -> None:
    with Producer(redis_url, station="cam-2") as producer:
        streamer = CameraStreamer(producer, CameraOptions(source=str(video), jpeg_quality=50))
        assert streamer.run() == 0
        assert (streamer.counters["captured"], streamer.counters["sent"]) == (FRAMES, FRAMES)
        looping = CameraStreamer(producer, CameraOptions(source=str(video), loop=True, max_frames=FRAMES + 10))
        assert looping.run() == 0
        assert looping.counters["loops"] == 1 and looping.counters["sent"] == FRAMES + 10
    assert FrameQueue(connection=redis_conn).count == 2 * FRAMES + 10


def test_camera_paces_a_file_to_fps(video: Path, redis_url: str) -> None:
    with Producer(redis_url, station="cam-3") as producer:
        streamer = CameraStreamer(producer, CameraOptions(source=str(video), fps=100, max_frames=11))
        started = time.monotonic()
        assert streamer.run() == 0
    # 11 frames at 100 fps span at least 10 intervals (only the lower bound: machines are noisy).
    assert time.monotonic() - started >= 0.095
    assert streamer.counters["sent"] == 11


def test_camera_counts_frames_it_could_not_send_while_redis_is_down(video: Path) -> None:
    # Nothing listens on port 1: the first frame's enqueue fails, and the backoff skips the rest
    # without trying Redis for each frame. The capture itself goes on.
    with Producer("redis://127.0.0.1:1/0", station="cam-7") as producer:
        streamer = CameraStreamer(producer, CameraOptions(source=str(video), max_frames=5, backoff_initial=30.0))
        assert streamer.run() == 0
    assert (streamer.counters["captured"], streamer.counters["sent"], streamer.counters["skipped_redis"]) == (5, 0, 5)


def test_camera_gives_up_after_max_reconnects(tmp_path: Path, redis_url: str, subprocess_env: dict[str, str]) -> None:
    # A device that is not there is a live source (it may be plugged in): retried, up to the limit.
    done = run_camera(["--source", "/dev/video-vq-missing", "--station", "cam-4", "--max-reconnects", "3",
                       "--backoff-initial", "0.01", "--backoff-max", "0.04", "--redis-url", redis_url],
                      subprocess_env)
    assert done.returncode == 1, done.stderr
    events = log_events(done.stderr)
    retries = [e for e in events if e["event"] == "camera.reconnecting"]
    assert [e["attempt"] for e in retries] == [1, 2, 3]
    assert all(e["delay_s"] <= 0.04 * 1.1 for e in retries)
    assert [e["event"] for e in events][-2:] == ["camera.gave_up", "camera.done"]
    assert events[-1]["reason"] == "gave_up" and events[-1]["reconnects"] == 3 and events[-1]["sent"] == 0


def test_a_video_file_that_cannot_be_opened_is_refused_at_once(tmp_path: Path, redis_url: str,
                                                                  subprocess_env: dict[str, str]) -> None:
    # A file does not come back by waiting: a typo in its path, or bytes OpenCV cannot read as video.
    junk = tmp_path / "notes.mp4"
    junk.write_text("not a video")
    for source, why in ((tmp_path / "missing.avi", "no such file"), (junk, "OpenCV cannot read it")):
        done = run_camera(["--source", str(source), "--station", "cam-5", "--redis-url", redis_url], subprocess_env)
        assert done.returncode == 2, done.stderr
        events = log_events(done.stderr)
        assert not [e for e in events if e["event"] == "camera.reconnecting"]
        refused = [e for e in events if e["event"] == "camera.cannot_open"]
        assert refused and refused[0]["reason"] == why, done.stderr
        assert events[-1]["reason"] == "cannot_open"


class FakeStream:
    """Stands in for a live cv2.VideoCapture (grab/retrieve/release) that delivers `n` frames, then drops."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.released = False

    def grab(self) -> bool:
        self.left -= 1
        return self.left >= 0

    def retrieve(self) -> tuple[bool, np.ndarray]:
        return True, np.zeros((48, 64, 3), dtype=np.uint8)

    def release(self) -> None:
        self.released = True


def test_live_source_reconnects_with_backoff_and_resets_it(redis_url: str, redis_conn: Redis) -> None:
    # open fails, opens (3 frames, then the stream drops), fails twice, opens (for good).
    script = [None, FakeStream(3), None, None, FakeStream(100)]
    opened = []

    def opener(source: object) -> FakeStream | None:
        opened.append(source)
        return script.pop(0)

    options = CameraOptions(source="rtsp://camera/stream", max_frames=6, backoff_initial=0.01, backoff_max=0.04)
    with Producer(redis_url, station="cam-5") as producer, structlog.testing.capture_logs() as logs:
        streamer = CameraStreamer(producer, options, opener=opener)
        assert streamer.run() == 0
    assert opened == ["rtsp://camera/stream"] * 5
    assert streamer.counters["reconnects"] == 4 and streamer.counters["read_failures"] == 1
    assert streamer.counters["sent"] == 6
    # The frames in between reset the backoff: 0.01 after the first failure, then 0.01, 0.02, 0.04 (the cap).
    delays = [e["delay_s"] for e in logs if e["event"] == "camera.reconnecting"]
    assert delays == pytest.approx([0.01, 0.01, 0.02, 0.04], rel=0.15)
    assert [e["event"] for e in logs].count("camera.opened") == 2
    assert FrameQueue(connection=redis_conn).count == 6


def test_camera_stops_on_request(redis_url: str) -> None:
    stop = threading.Event()
    with Producer(redis_url, station="cam-6") as producer:
        streamer = CameraStreamer(producer, CameraOptions(source="rtsp://nowhere", backoff_initial=30.0,
                                                          backoff_max=30.0), stop=stop, opener=lambda _: None)
        thread = threading.Thread(target=streamer.run)
        thread.start()
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()  # the 30 s backoff wait was interrupted


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(0.5, 4.0, jitter=0.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.next() == 0.5
    jittered = Backoff(1.0, 10.0, jitter=0.1)
    assert all(0.9 <= jittered.next() / 2**i <= 1.1 for i in range(3))
    forever = Backoff(0.1, 60.0, jitter=0.0)
    forever.attempts = 5000  # a source down for days must not overflow
    assert forever.next() == 60.0
