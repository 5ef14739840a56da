"""What the data plane costs per frame, apart from the model: `python -m deploy.bench --plumbing`.

In one run, on the same tiny frames (16x16 JPEG) and one redis-server:
  1. plain RQ     one `rq worker -w rq.worker.SimpleWorker` running `builtins.len` on each frame:
                  the cheapest job RQ can run, one job at a time
  2. BatchWorker  one `rq worker -w worker.BatchWorker` with a near-free model (resnet18 int8 at
                  16 px), sampling off, VQ_MAX_BATCH frames a batch

Both drain a queue filled before they start (so no producer shares the cores while they are
timed). Figures are taken between the 10 % and the 90 % marks of finished jobs: frames/s, the
worker process's CPU time per frame and redis-server's (work moved into server-side scripts is
counted, not hidden), and for the BatchWorker its CPU split by stage (`vq_stage_cpu_seconds_total`).
Afterwards every job's RQ-visible state is checked: finished registry, started registry and
intermediate list empty, each job finished with a readable result, one stream entry per frame.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from redis import Redis
from rq import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from worker.frames import make_frame
from worker.jobs import QUEUE_NAME, RESULTS_STREAM, FrameQueue, enqueue_frames
from worker.redis_server import RedisServer, free_port
from worker.serializer import MsgpackSerializer

from .workers import BATCH_WORKER, pythonpath, start_worker, stop_worker, wait_registered

STAGES = ("dequeue", "claim", "infer", "record", "stream")
PLAIN_QUEUE = "plain"


def tiny_jpegs(n: int = 8, size: int = 16) -> list[bytes]:
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    return [cv2.imencode(".jpg", rng.integers(0, 255, (size, size, 3), dtype=np.uint8))[1].tobytes()
            for _ in range(n)]


def fill_frames(conn: Redis, images: list[bytes], n: int, chunk: int = 500) -> None:
    queue = FrameQueue(connection=conn)
    for start in range(0, n, chunk):
        frames = [make_frame(images[i % len(images)], station="plumbing", seq=i)
                  for i in range(start, min(n, start + chunk))]
        enqueue_frames(queue, frames, result_ttl=600, failure_ttl=600)


def fill_plain(conn: Redis, images: list[bytes], n: int, chunk: int = 500) -> None:
    queue = Queue(PLAIN_QUEUE, connection=conn, serializer=MsgpackSerializer)
    for start in range(0, n, chunk):
        queue.enqueue_many([Queue.prepare_data("builtins.len", args=(images[i % len(images)],), result_ttl=600)
                            for i in range(start, min(n, start + chunk))])


class Drain:
    """Frames/s while `n` frames end, finished or failed (the middle 80 %), and the CPU per frame of each
    named group of processes over the same span (deploy.bench reads the cores' idle share from it too).
    A process in `watch` that exits stops the drain at once with its exit code, not at the timeout."""

    def __init__(self, conn: Redis, queue: str, n: int, procs: dict[str, list[psutil.Process]], base: int = 0,
                 watch: list[subprocess.Popen] | tuple = ()) -> None:
        self.finished = FinishedJobRegistry(queue, connection=conn)
        self.failed = FailedJobRegistry(queue, connection=conn)
        self.n, self.procs, self.base = n, procs, base  # base: frames already ended before these
        self.watch = watch
        self._last: dict[int, float] = {}

    def ended(self) -> int:
        """Frames in the finished and failed registries."""
        return self.finished.count + self.failed.count

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        t = proc.cpu_times()
        return t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)

    def _snapshot(self) -> dict[str, float]:
        cpu = {}
        for name, procs in self.procs.items():
            total = 0.0
            for proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess):  # reaped: no more than when last seen
                    self._last[proc.pid] = self._cpu(proc)
                total += self._last.get(proc.pid, 0.0)
            cpu[name] = total
        times = psutil.cpu_times()
        cpu["idle"], cpu["all"] = times.idle + getattr(times, "iowait", 0.0), sum(times)
        return cpu

    def run(self, timeout: float) -> dict[str, float]:
        marks: dict[int, tuple[float, int, dict[str, float]]] = {}
        failed_before = self.failed.count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.ended() - self.base
            for pct in (10, 90):
                if pct not in marks and done >= self.n * pct / 100:
                    marks[pct] = (time.perf_counter(), done, self._snapshot())
            if done >= self.n:
                break
            if dead := [p.returncode for p in self.watch if p.poll() is not None]:
                raise RuntimeError(f"a worker exited (code {dead[0]}) with {done} of {self.n} frames ended")
            # Each look costs the cores under measurement, so between the marks it looks seldom: a mark's
            # count and time are read together, so the rate stays exact. Before the first mark it looks
            # often, so that a fast drain does not pass both marks in one look.
            time.sleep(0.05 if 10 in marks else 0.01)
        else:
            raise RuntimeError(f"{self.ended() - self.base} of {self.n} frames ended within {timeout:.0f}s")
        (t0, d0, c0), (t1, d1, c1) = marks[10], marks[90]
        frames = d1 - d0
        if t1 == t0:  # frames end a batch at a time: a few large batches can pass both marks at once
            raise RuntimeError(f"the middle 80 % of {self.n} frames ended between two looks: too few frames "
                               "to time; send more")
        out = {"frames_per_s": frames / (t1 - t0), "idle_share": (c1["idle"] - c0["idle"]) / (c1["all"] - c0["all"]),
               "failed": float(self.failed.count - failed_before)}
        out.update({f"{name}_cpu_ms_per_frame": 1000 * (c1[name] - c0[name]) / frames for name in self.procs})
        return out


def stage_cpu(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("vq_stage_cpu_seconds_total{"):
            stage = line.split('stage="', 1)[1].split('"', 1)[0]
            out[stage] = float(line.split()[-1])
    return out


def check_states(conn: Redis, n: int) -> list[str]:
    """What is not as RQ would have it after `n` frames finished; empty when all is well."""
    problems = []
    queue = FrameQueue(connection=conn)
    finished = FinishedJobRegistry(QUEUE_NAME, connection=conn)
    if finished.count != n:
        problems.append(f"finished registry holds {finished.count}, not {n}")
    if (started := StartedJobRegistry(QUEUE_NAME, connection=conn).count) != 0:
        problems.append(f"started registry still holds {started}")
    if (held := conn.llen(queue.intermediate_queue_key)) != 0:
        problems.append(f"intermediate list still holds {held}")
    if (streamed := conn.xlen(RESULTS_STREAM)) != n:
        problems.append(f"results stream holds {streamed} entries, not {n}")
    ids = [i.decode() if isinstance(i, bytes) else i for i in finished.get_job_ids()[: min(n, 200)]]
    for job in queue.job_class.fetch_many(ids, connection=conn, serializer=MsgpackSerializer):
        if job is None or job.get_status() != "finished" or not (job.return_value() or {}).get("label"):
            problems.append(f"job {getattr(job, 'id', '?')} is not finished with a readable result")
            break
    return problems


def run(a: argparse.Namespace) -> dict[str, Any]:
    from .bench import build_artifact

    images = tiny_jpegs(size=a.size)
    tmp = Path(tempfile.mkdtemp(prefix="vq-plumbing-"))
    artifact = build_artifact(tmp / "model", "resnet18", a.size, images)
    env = dict(os.environ, PYTHONPATH=pythonpath(), VQ_MODEL_PATH=str(artifact), VQ_MAX_BATCH=str(a.batch),
               VQ_SAMPLE_STRATEGY="none", VQ_SAMPLE_AUDIT_RATE="0", VQ_LOG_LEVEL="warning", VQ_TORCH_THREADS="1",
               VQ_DECODE_THREADS="1", OMP_NUM_THREADS="1", VQ_RESULTS_MAXLEN=str(max(a.n, a.naive_n) * 2))
    report: dict[str, Any] = {"frames": f"{a.size}x{a.size} JPEG", "batch": a.batch, "n": a.n, "naive_n": a.naive_n}
    with RedisServer() as server:
        conn = Redis.from_url(server.url)
        redis_proc = psutil.Process(server.proc.pid)

        fill_plain(conn, images, a.naive_n)
        proc = start_worker(server.url, "plumbing-plain", env, ["--worker-class", "rq.worker.SimpleWorker", "-S",
                                                                "worker.serializer.MsgpackSerializer"],
                            output=subprocess.DEVNULL, queue=PLAIN_QUEUE)
        report["plain_rq"] = Drain(conn, PLAIN_QUEUE, a.naive_n,
                                    {"worker": [psutil.Process(proc.pid)], "redis": [redis_proc]}).run(600)
        stop_worker(proc)
        conn.flushdb()

        fill_frames(conn, images, a.n)
        port = free_port()
        proc = start_worker(server.url, "plumbing-batch", dict(env, VQ_METRICS_PORT=str(port)), BATCH_WORKER,
                            output=subprocess.DEVNULL)
        report["batch_worker"] = Drain(conn, QUEUE_NAME, a.n,
                                        {"worker": [psutil.Process(proc.pid)], "redis": [redis_proc]}).run(600)
        wait_registered(conn, proc, "plumbing-batch")
        stages = stage_cpu(port)
        report["stage_cpu_ms_per_frame"] = {s: 1000 * stages.get(s, 0.0) / a.n for s in STAGES}
        stop_worker(proc)
        report["state_problems"] = check_states(conn, a.n)
    report["ratio_vs_plain_rq"] = report["batch_worker"]["frames_per_s"] / report["plain_rq"]["frames_per_s"]
    return report


def print_report(r: dict[str, Any]) -> None:
    print(f"plumbing: {r['frames']} frames, VQ_MAX_BATCH={r['batch']}, {os.cpu_count()} cores")
    print(f"  {'':28s} {'frames/s':>10s} {'worker CPU ms/frame':>20s} {'redis CPU ms/frame':>19s}")
    for name, key in (("plain RQ (SimpleWorker, len)", "plain_rq"), ("BatchWorker", "batch_worker")):
        row = r[key]
        print(f"  {name:28s} {row['frames_per_s']:10.0f} {row['worker_cpu_ms_per_frame']:20.3f} "
              f"{row['redis_cpu_ms_per_frame']:19.3f}")
    print(f"  BatchWorker / plain RQ: {r['ratio_vs_plain_rq']:.1f}x")
    print("  BatchWorker CPU by stage (ms/frame, all threads): "
          + ", ".join(f"{s} {v:.3f}" for s, v in r["stage_cpu_ms_per_frame"].items()))
    print("  RQ-visible state after the run: " + ("all true" if not r["state_problems"]
                                                  else "; ".join(r["state_problems"])))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.bench --plumbing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000, help="frames the BatchWorker drains")
    p.add_argument("--naive-n", type=int, default=3000, help="jobs plain RQ drains")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=16, help="frame and model input size (px)")
    p.add_argument("--out", default="bench-out")
    a = p.parse_args(argv)
    from worker.logs import configure_logging

    configure_logging("console", "warning")
    report = run(a)
    print_report(report)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plumbing.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'plumbing.json'}")
    return 1 if report["state_problems"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
