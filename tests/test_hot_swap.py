"""Workers follow the registry: hot swap under load, refusal of a bad version, rollback."""

from __future__ import annotations

import os
import threading
import time

from conftest import wait_for
from helpers import jpeg, start_worker, stop_worker, tiny_artifact
from rq.job import JobStatus

from worker.frames import make_frame
from worker.jobs import FrameQueue, enqueue_frames
from worker.registry import ModelRegistry


class Stream:
    """Frames enqueued every 20 ms from a thread until stopped: the traffic a swap must not disturb."""

    def __init__(self, conn):
        self.queue = FrameQueue(connection=conn)
        self.jobs = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        seq = 0
        while not self._stop.wait(0.02):
            self.jobs += enqueue_frames(self.queue, [make_frame(jpeg(seed=seq % 7), station="cam", seq=seq)])
            seq += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def latest_version(self):
        for job in reversed(self.jobs[-20:]):
            if job.get_status() == JobStatus.FINISHED:
                return job.return_value()["model_version"]
        return None


def test_swap_under_load_refuse_bad_version_and_roll_back(tmp_path, redis_url, redis_conn, subprocess_env):
    reg = ModelRegistry(redis_conn)
    v1 = reg.publish(tiny_artifact(tmp_path / "v1", int8=True))
    proc = start_worker(redis_url, subprocess_env, "w-swap", VQ_MODEL_CACHE=str(tmp_path / "cache"),
                        VQ_SWAP_POLL_S="0.5")
    try:
        with Stream(redis_conn) as stream:
            wait_for(lambda: stream.latest_version() == v1, timeout=90, what="v1 serving")

            v2 = reg.publish(tiny_artifact(tmp_path / "v2", int8=True))
            promoted = time.monotonic()
            wait_for(lambda: stream.latest_version() == v2, timeout=30, what="v2 serving")
            swap_s = time.monotonic() - promoted

            # A version whose int8 file is corrupted in Redis: refused, v2 keeps serving.
            v3 = reg.publish(tiny_artifact(tmp_path / "v3", int8=True), promote=False)
            key = f"vq:models:v:{v3}:file:int8.safetensors"
            redis_conn.set(key, redis_conn.get(key)[:-10] + b"corrupted!")
            reg.promote(v3)
            refused_log = wait_for(lambda: b"model refused" in _log_so_far(proc), timeout=30, what="refusal")
            assert refused_log
            n = len(stream.jobs)
            wait_for(lambda: len(stream.jobs) > n + 10 and stream.latest_version() == v2, timeout=30)

            assert reg.rollback(to=v1) == v1
            wait_for(lambda: stream.latest_version() == v1, timeout=30, what="rolled back to v1")

        jobs = stream.jobs
        wait_for(lambda: all(j.get_status() in (JobStatus.FINISHED, JobStatus.FAILED) for j in jobs), timeout=60)
        assert [j.get_status() for j in jobs].count(JobStatus.FINISHED) == len(jobs), "a frame was dropped"
        served = [j.return_value()["model_version"] for j in jobs]
        assert v3 not in served
        # Versions change only at batch boundaries and in promotion order: v1 … v2 … v1.
        changes = [v for i, v in enumerate(served) if i == 0 or served[i - 1] != v]
        assert changes == [v1, v2, v1], changes
        print(f"promotion to v2 results: {swap_s:.1f}s (notice + fetch + verify + load + warm-up)")
    finally:
        stop_worker(proc)


_logs: dict[int, bytearray] = {}


def _log_so_far(proc) -> bytes:
    """Non-blocking read of what the worker has printed so far."""
    buf = _logs.setdefault(proc.pid, bytearray())
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    try:
        while chunk := os.read(fd, 65536):
            buf += chunk
    except BlockingIOError:
        pass
    return bytes(buf)
