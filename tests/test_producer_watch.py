"""`producer watch`: files are sent once complete, moved aside only once Redis accepted them."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT, wait_for
from redis import Redis

from producer.api import Producer
from producer.watch import Watcher
from worker.frames import validate_frame
from worker.jobs import JOB_FUNC, FrameQueue
from worker.redis_server import RedisServer, free_port


def jpeg(seed: int = 0) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def png() -> bytes:
    return cv2.imencode(".png", np.full((30, 40, 3), 127, dtype=np.uint8))[1].tobytes()


class Running:
    """A Watcher on its own thread, stopped (and joined) at the end of the test."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.thread = threading.Thread(target=watcher.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.watcher.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture
def watching(tmp_path: Path) -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for running in started:
        running.stop()


def test_watch_sends_images_and_moves_them_to_done(
    tmp_path: Path, redis_url: str, redis_conn: Redis, watching: list[Running]
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    producer = Producer(redis_url, station="dock")
    watcher = Watcher(producer, inbox, poll=0.02)
    watching.append(Running(watcher))
    (inbox / "a.jpg").write_bytes(jpeg(1))
    (inbox / "b.png").write_bytes(png())
    (inbox / "notes.txt").write_text("not an image")
    (inbox / "c.jpg.part").write_bytes(jpeg(2))  # still being uploaded: left alone

    wait_for(lambda: (inbox / ".done" / "a.jpg").exists() and (inbox / ".done" / "b.png").exists(), timeout=20,
             what="images moved to .done")
    wait_for(lambda: (inbox / ".rejected" / "notes.txt").exists(), timeout=20, what="notes.txt rejected")
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == ["c.jpg.part"]
    queue = FrameQueue(connection=redis_conn)
    frames = [validate_frame(job.args[0]) for job in queue.get_jobs()]
    assert sorted(f["meta"]["filename"] for f in frames) == ["a.jpg", "b.png"]
    assert all(f["station"] == "dock" for f in frames)
    assert {job.func_name for job in queue.get_jobs()} == {JOB_FUNC}
    sent_a = next(f["image"] for f in frames if f["meta"]["filename"] == "a.jpg")
    assert (inbox / ".done" / "a.jpg").read_bytes() == sent_a
    assert watcher.counters["enqueued"] == 2 and watcher.counters["rejected"] == 1


def test_watch_waits_until_the_size_is_stable(tmp_path: Path, redis_url: str, redis_conn: Redis) -> None:
    done = tmp_path / "sent"
    watcher = Watcher(Producer(redis_url), tmp_path, done_dir=done)
    data = jpeg()
    growing = tmp_path / "big.jpg"
    growing.write_bytes(data[:100])
    assert watcher.ready_files() == []  # first sight
    with growing.open("ab") as f:
        f.write(data[100:])
    assert watcher.ready_files() == []  # changed since
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert watcher.poll_once()  # unchanged for two polls: sent (the empty file waits)
    assert (done / "big.jpg").read_bytes() == data
    assert (tmp_path / "empty.jpg").exists()
    assert FrameQueue(connection=redis_conn).count == 1


def test_watch_does_not_send_a_file_twice(tmp_path: Path, redis_url: str, redis_conn: Redis) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    watcher = Watcher(Producer(redis_url), inbox)
    (inbox / "a.jpg").write_bytes(jpeg())
    watcher.poll_once()
    watcher.poll_once()
    assert (inbox / ".done" / "a.jpg").exists()
    # The same file again (same name, mtime, bytes), as after a crash between enqueue and move:
    # its job is already in Redis, so it is moved on without a second job.
    shutil.copy2(inbox / ".done" / "a.jpg", inbox / "a.jpg")
    watcher.poll_once()
    watcher.poll_once()
    assert not (inbox / "a.jpg").exists()
    assert len(list((inbox / ".done").iterdir())) == 2  # kept, under a new name
    assert FrameQueue(connection=redis_conn).count == 1


def test_watch_keeps_files_while_redis_is_down_and_sends_them_after(tmp_path: Path, watching: list[Running]) -> None:
    port = free_port()
    first = RedisServer(port=port).start()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    producer = Producer(first.url, station="dock")
    watcher = Watcher(producer, inbox, poll=0.02, backoff_initial=0.02, backoff_max=0.1)
    watching.append(Running(watcher))
    first.stop()

    (inbox / "late.jpg").write_bytes(jpeg())
    wait_for(lambda: watcher.counters["redis_errors"] >= 2, timeout=20, what="enqueue attempts while Redis is down")
    assert (inbox / "late.jpg").exists()
    assert not (inbox / ".done" / "late.jpg").exists()

    with RedisServer(port=port) as second:
        wait_for(lambda: (inbox / ".done" / "late.jpg").exists(), timeout=20, what="late.jpg sent after Redis is back")
        conn = Redis.from_url(second.url)
        [job] = FrameQueue(connection=conn).get_jobs()
        assert job.args[0]["image"] == (inbox / ".done" / "late.jpg").read_bytes()
        conn.close()
        watching.pop().stop()


def test_watch_command_runs_until_sigterm(
    tmp_path: Path, redis_url: str, redis_conn: Redis, subprocess_env: dict[str, str]
) -> None:
    done = tmp_path / "done"
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer", "watch", str(tmp_path), "--station", "cli", "--done-dir", str(done),
         "--poll", "0.05", "--redis-url", redis_url],
        env=subprocess_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        (tmp_path / "x.jpg").write_bytes(jpeg())
        (tmp_path / "y.bin").write_bytes(b"\x00\x01binary")
        wait_for(lambda: (done / "x.jpg").exists() and (tmp_path / ".rejected" / "y.bin").exists(), timeout=30,
                 what="x.jpg sent and y.bin rejected")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    [rejected] = [e for e in events if e["event"] == "watch.rejected"]
    assert rejected["file"] == "y.bin" and "neither JPEG nor PNG" in rejected["reason"]
    assert events[-1]["event"] == "watch.stopped" and events[-1]["enqueued"] == 1
    assert FrameQueue(connection=redis_conn).get_jobs()[0].args[0]["station"] == "cli"


def test_watch_sends_a_file_whose_name_is_not_utf8_and_refuses_its_own_folder_as_done(
    tmp_path: Path, redis_url: str, redis_conn: Redis
) -> None:
    import os

    (tmp_path / os.fsdecode(b"caf\xe9.jpg")).write_bytes(jpeg())
    watcher = Watcher(Producer(redis_url), tmp_path)
    watcher.poll_once()
    assert watcher.poll_once()
    assert os.listdir(tmp_path / ".done") == [os.fsdecode(b"caf\xe9.jpg")]
    [job_id] = FrameQueue(connection=redis_conn).job_ids
    assert validate_frame(FrameQueue(connection=redis_conn).fetch_job(job_id).args[0])["meta"]["filename"] == \
        "caf\\xe9.jpg"
    assert Watcher(Producer(redis_url), tmp_path, done_dir=tmp_path).run() == 2
