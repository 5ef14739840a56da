"""Past one Redis, proven on one machine: `python -m deploy.shards`.

    python -m deploy.shards --shards 3 --stations 3 --workers-per-shard 2      # the proof (~3 min)
    python -m deploy.shards --measure-redis                                    # one Redis's cost per frame

The proof starts N private redis-servers (`worker.redis_server.RedisServer`), a shard map of
them, and `--workers-per-shard` real `rq worker` BatchWorkers per shard, each started as a
deployment starts it (REDIS_URLS + VQ_SHARD through `python -m worker.shards exec`,
`deploy.workers.start_shard_worker`). Stations are named so that each shard gets its share (the
hash decides, as in production: `worker.shards.shard_index`). Then, in one run:

  1. capacity, one shard alone: shard 0's stations send `--burst` frames each as fast as the queue
     bound allows (`deploy.loadgen.run`, 640x480 JPEGs of ~40 KB); frames/s.
  2. capacity, every shard at once: the same per station, all stations; frames/s per shard and in
     total. Every frame's result is checked to be on its station's shard, and on no other.
  3. steady: every station paced at `--load` of the measured total capacity; p50/p99
     capture→result per shard over `--steady` seconds.
  4. kill: SIGKILL shard `--kill`'s redis-server; for `--outage` seconds the other shards' p99 is
     measured while that shard's station drops its frames (its producer cannot reach Redis).

On a machine with C cores every worker competes for the same C cores, so the total of phase 2
cannot exceed phase 1's: what it shows is that per-shard figures add up to the total and that
sharding costs nothing; on separate hosts each shard carries phase 1's rate. Writes
shards-out/shards.json and shards-out/shards.md.

`--measure-redis` is the sizing figure: one redis-server's own CPU (INFO cpu), memory (INFO
memory) and network bytes (INFO stats) per frame, through the real path: enqueue (the documented
enqueue, `enqueue_frames`) with no worker running, then BatchWorkers with a near-free model
(resnet18 int8 at 32 px) claiming and recording them. One core / CPU per frame is the frames/s
one Redis can carry before its core is the wall.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from redis import Redis
from redis.exceptions import RedisError

from worker.jobs import RESULTS_STREAM, FrameQueue, enqueue_frames
from worker.redis_server import RedisServer
from worker.shards import ShardMap, shard_index

from . import loadgen
from .frames import camera_frames
from .workers import start_shard_worker, stop_worker, wait_registered

log = structlog.get_logger("visionqueue.shards")

WORKER_ENV = {"VQ_LOG_FORMAT": "json", "VQ_LOG_LEVEL": "warning", "VQ_TORCH_THREADS": "1",
              "VQ_DECODE_THREADS": "1", "VQ_MAX_BATCH": "16", "VQ_SAMPLE_STRATEGY": "none",
              "VQ_SAMPLE_AUDIT_RATE": "0", "OMP_NUM_THREADS": "1"}


def stations_per_shard(n_shards: int, n_stations: int, prefix: str = "cam") -> list[str]:
    """`n_stations` names spread evenly over the shards by their hash: the first `prefix-k` names that
    fill each shard's share (a real site's many stations spread by the hash alone)."""
    share = [n_stations // n_shards + (1 if i < n_stations % n_shards else 0) for i in range(n_shards)]
    names: list[str] = []
    k = 0
    while len(names) < n_stations:
        name = f"{prefix}-{k}"
        shard = shard_index(name, n_shards)
        if share[shard] > 0:
            share[shard] -= 1
            names.append(name)
        k += 1
    return names


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


@dataclass
class Fleet:
    """N redis-servers, the shard map over them, and workers per shard."""

    servers: list[RedisServer]
    procs: list[tuple[int, Any]] = field(default_factory=list)
    _conns: dict[int, Redis] = field(default_factory=dict)

    @property
    def shards(self) -> ShardMap:
        return ShardMap(tuple(s.url for s in self.servers))

    def conn(self, index: int) -> Redis:
        if index not in self._conns:
            self._conns[index] = Redis.from_url(self.servers[index].url, socket_timeout=5, socket_connect_timeout=1)
        return self._conns[index]

    def start_workers(self, per_shard: int, settings: dict[str, str], logs: Path) -> None:
        urls = list(self.shards.urls)
        started = []
        logs.mkdir(parents=True, exist_ok=True)
        for shard in range(len(self.servers)):
            for k in range(per_shard):
                name = f"shard{shard}-w{k}"
                # To a file: a pipe nobody reads fills up and stalls the worker on its next log line.
                with open(logs / f"{name}.log", "w") as output:
                    started.append((shard, name, start_shard_worker(urls, shard, name, output=output.fileno(),
                                                                           settings=settings)))
        for shard, name, proc in started:
            wait_registered(self.conn(shard), proc, name)
            self.procs.append((shard, proc))

    def stop(self) -> None:
        for _, proc in self.procs:
            stop_worker(proc, timeout=20)
        for server in self.servers:
            server.stop()


def results_on(conn: Redis) -> list[dict[str, Any]]:
    """Every successful result of a shard's `inference:results` stream."""
    out = []
    for _, f in conn.xrange(RESULTS_STREAM):
        if f.get(b"status") == b"ok":
            out.append(json.loads(f[b"result"]))
    return out


def burst(fleet: Fleet, stations: list[str], n: int) -> dict[str, Any]:
    """Each station sends `n` frames as fast as its shard's queue bound allows; frames/s per shard, total."""
    shards = fleet.shards
    before = {i: fleet.conn(i).xlen(RESULTS_STREAM) for i in range(len(shards))}
    want = {i: before[i] + n * sum(1 for s in stations if shards.index_for(s) == i) for i in range(len(shards))}
    done_at: dict[int, float] = {}
    start = time.perf_counter()
    threads = [threading.Thread(target=loadgen.run, args=(shards.url_for(s), n, None, 64, 16, s), daemon=True)
               for s in stations]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60 + n
    while len(done_at) < len(shards) and time.monotonic() < deadline:
        for i in range(len(shards)):
            if i not in done_at and fleet.conn(i).xlen(RESULTS_STREAM) >= want[i]:
                done_at[i] = time.perf_counter() - start
        time.sleep(0.02)  # a poll of a progress counter, not a synchronisation: the deadline bounds it
    for t in threads:
        t.join(timeout=5)
    per_shard = {}
    for i in range(len(shards)):
        sent = want[i] - before[i]
        if sent:
            per_shard[i] = {"frames": sent, "seconds": round(done_at.get(i, float("nan")), 2),
                            "fps": round(sent / done_at[i], 1) if i in done_at else None}
    total = sum(v["frames"] for v in per_shard.values())
    slowest = max((v["seconds"] for v in per_shard.values()), default=float("nan"))
    return {"per_shard": per_shard, "frames": total, "seconds": slowest, "fps": round(total / slowest, 1),
            "all_done": len(done_at) == len(per_shard)}


class PacedStation(threading.Thread):
    """A camera: one frame every 1/fps seconds through `producer.api.Producer` on its shard; a frame
    that cannot reach Redis is dropped and counted (what `python -m producer camera` does)."""

    def __init__(self, station: str, shards: ShardMap, fps: float, images: list[bytes],
                 stop: threading.Event) -> None:
        super().__init__(name=f"station-{station}", daemon=True)
        from producer.api import Producer

        self.station, self.fps, self.images, self.stop_event = station, fps, images, stop
        self.producer = Producer(shards, station=station, deadline_s=10.0, max_outage_s=1e9, wait_for_redis=False)
        self.sent: dict[str, float] = {}
        self.dropped = 0

    def run(self) -> None:
        i, next_at = 0, time.monotonic()
        while not self.stop_event.is_set():
            at = time.time()  # before the send: a frame in flight at a kill counts as sent before it
            try:
                job_id = self.producer.submit_bytes(self.images[i % len(self.images)], seq=i)
                self.sent[job_id] = at
            except (RedisError, OSError):
                self.dropped += 1
            i += 1
            next_at += 1.0 / self.fps
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))


def latency_window(fleet: Fleet, stations: dict[str, PacedStation], start: float, end: float,
                   skip: frozenset[int] = frozenset(),
                   known: dict[int, list[dict[str, Any]]] | None = None) -> dict[int, dict[str, Any]]:
    """p50/p99 capture→result per shard of the results done in [start, end) (`known`: results read earlier)."""
    out: dict[int, dict[str, Any]] = {}
    for i in range(len(fleet.servers)):
        if i in skip:
            continue
        rows = (known or {}).get(i)
        ms = [r["timings"]["end_to_end_ms"] for r in (rows if rows is not None else results_on(fleet.conn(i)))
              if start <= r["done_at"] < end and r["station"] in stations]
        out[i] = {"results": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99)}
    return out


def run_proof(a: argparse.Namespace) -> dict[str, Any]:
    from .bench import build_artifact

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    images = camera_frames(16)
    tmp = Path(tempfile.mkdtemp(prefix="vq-shards-"))
    artifact = build_artifact(tmp / "model", "resnet18", a.size, images)
    fleet = Fleet([RedisServer().start() for _ in range(a.shards)])
    report: dict[str, Any] = {"shards": a.shards, "workers_per_shard": a.workers_per_shard, "cpus": os.cpu_count(),
                              "model": f"resnet18 int8 @{a.size}",
                              "frame_bytes": int(np.mean([len(i) for i in images]))}
    try:
        stations = stations_per_shard(a.shards, a.stations)
        shards = fleet.shards
        report["stations"] = {s: shards.index_for(s) for s in stations}
        fleet.start_workers(a.workers_per_shard, {**WORKER_ENV, "VQ_MODEL_PATH": str(artifact)}, out / "logs")
        log.info("workers up", workers=len(fleet.procs))
        burst(fleet, stations, 32)  # warm every worker's batch sizes before anything is timed

        alone = burst(fleet, [s for s in stations if shards.index_for(s) == 0], a.burst)
        together = burst(fleet, stations, a.burst)
        report["capacity"] = {"shard0_alone": alone, "all_shards": together,
                              "all_over_alone": round(together["fps"] / alone["fps"], 2)}
        log.info("capacity", alone=alone["fps"], together=together["fps"], per_shard=together["per_shard"])

        # Every frame's result is on its station's shard, and on no other.
        misplaced = 0
        for i in range(a.shards):
            misplaced += sum(1 for r in results_on(fleet.conn(i)) if shards.index_for(r["station"]) != i)
        report["results_on_wrong_shard"] = misplaced

        fps = max(1.0, a.load * together["fps"] / len(stations))
        stop = threading.Event()
        paced = {s: PacedStation(s, shards, fps, images, stop) for s in stations}
        for t in paced.values():
            t.start()
        t0 = time.time()
        stop.wait(a.steady)
        t_kill = time.time()
        doomed = results_on(fleet.conn(a.kill))  # read now: the server and its results are about to go
        fleet.servers[a.kill].kill()
        t_dead = time.time()  # SIGKILL delivered and reaped: from here no send can reach it
        stop.wait(a.outage)
        t_end = time.time()
        stop.set()
        for t in paced.values():
            t.join(timeout=5)
        settle = time.monotonic() + 5
        while time.monotonic() < settle:  # let the frames sent before t_end finish (bounded)
            time.sleep(0.2)
        # from t0 + 2 s: the stations' first frames warm up
        before = latency_window(fleet, paced, t0 + 2, t_kill, known={a.kill: doomed})
        during = latency_window(fleet, paced, t_kill + 1, t_end + 5, skip=frozenset({a.kill}))
        killed_sent_after = sum(1 for s, t in paced.items() if shards.index_for(s) == a.kill
                                for ts in t.sent.values() if ts > t_dead)
        report["steady_fps_per_station"] = round(fps, 1)
        report["kill"] = {
            "shard": a.kill, "steady_s": a.steady, "outage_s": a.outage,
            "p99_before": before, "p99_during": during,
            "killed_shard_frames_accepted_after_kill": killed_sent_after,
            "dropped_per_station": {s: t.dropped for s, t in paced.items()},
            "sent_per_station": {s: len(t.sent) for s, t in paced.items()},
        }
        # Frames of surviving shards: every one sent got its result.
        lost = {}
        for s, t in paced.items():
            i = shards.index_for(s)
            if i == a.kill:
                continue
            have = {r["frame_id"] for r in results_on(fleet.conn(i))}
            lost[s] = len(set(t.sent) - have)
        report["kill"]["lost_on_surviving_shards"] = lost
    finally:
        fleet.stop()
    (out / "shards.json").write_text(json.dumps(report, indent=2))
    (out / "shards.md").write_text(markdown(report))
    return report


def markdown(r: dict[str, Any]) -> str:
    cap = r["capacity"]
    lines = [f"{r['shards']} shards × {r['workers_per_shard']} workers, {len(r['stations'])} stations, "
             f"{r['model']}, {r['frame_bytes']} B frames, {r['cpus']} CPUs", "",
             "| shard | stations | burst frames/s (all shards) | p50 / p99 before kill (ms) "
             "| p50 / p99 during kill (ms) |",
             "| --- | --- | --- | --- | --- |"]
    k = r["kill"]
    for i in range(r["shards"]):
        st = ", ".join(s for s, j in r["stations"].items() if j == i)
        b = k["p99_before"].get(str(i)) or k["p99_before"].get(i) or {}
        d = k["p99_during"].get(str(i)) or k["p99_during"].get(i)
        during = "killed" if i == k["shard"] else f"{d['p50_ms']} / {d['p99_ms']}"
        fps = (cap["all_shards"]["per_shard"].get(i) or cap["all_shards"]["per_shard"].get(str(i)) or {}).get("fps")
        lines.append(f"| {i} | {st} | {fps} | {b.get('p50_ms')} / {b.get('p99_ms')} | {during} |")
    lines += ["", f"total {cap['all_shards']['fps']} frames/s with every shard busy; shard 0 alone "
              f"{cap['shard0_alone']['fps']} frames/s (ratio {cap['all_over_alone']}); results on a wrong shard: "
              f"{r['results_on_wrong_shard']}; frames lost on surviving shards: {k['lost_on_surviving_shards']}; "
              f"frames the killed shard accepted after the kill: {k['killed_shard_frames_accepted_after_kill']}", ""]
    return "\n".join(lines)


def _info(conn: Redis) -> dict[str, float]:
    cpu, mem, stats = conn.info("cpu"), conn.info("memory"), conn.info("stats")
    return {"cpu_s": cpu["used_cpu_sys"] + cpu["used_cpu_user"], "mem": mem["used_memory"],
            "net_in": stats["total_net_input_bytes"], "net_out": stats["total_net_output_bytes"]}


def measure_redis(a: argparse.Namespace) -> dict[str, Any]:
    """One redis-server's CPU, memory and network per frame through the real path (see the module docstring)."""
    from .bench import build_artifact

    images = camera_frames(16)
    tmp = Path(tempfile.mkdtemp(prefix="vq-redis-measure-"))
    artifact = build_artifact(tmp / "model", "resnet18", 32, images)
    fleet = Fleet([RedisServer().start()])
    n = a.measure_frames
    try:
        conn = fleet.conn(0)
        queue = FrameQueue(connection=conn)
        from worker.frames import make_frame

        frames = [make_frame(images[i % len(images)], station="measure", seq=i) for i in range(n)]
        s0 = _info(conn)
        t0 = time.perf_counter()
        for k in range(0, n, 16):
            enqueue_frames(queue, frames[k:k + 16], result_ttl=600, failure_ttl=600)
        enqueue_s = time.perf_counter() - t0
        s1 = _info(conn)
        fleet.start_workers(a.workers_per_shard, {**WORKER_ENV, "VQ_MODEL_PATH": str(artifact), "VQ_MAX_BATCH": "32"},
                            Path(a.out) / "logs")
        # Workers drain from their first moment, so nothing is subtracted: their registration and idle
        # polls (a few hundred commands) count against the 3,000 frames, which errs on the safe side.
        done = wait_until(lambda: conn.xlen(RESULTS_STREAM) >= n, 600)
        s3 = _info(conn)
    finally:
        fleet.stop()
    enqueue_cpu = (s1["cpu_s"] - s0["cpu_s"]) / n
    drain_cpu = (s3["cpu_s"] - s1["cpu_s"]) / n
    per_frame_cpu = enqueue_cpu + drain_cpu
    report = {
        "frames": n, "frame_bytes": int(np.mean([len(i) for i in images])), "drained": done,
        "enqueue_s": round(enqueue_s, 2),
        "redis_cpu_us_per_frame": {"enqueue": round(enqueue_cpu * 1e6, 1),
                                   "claim_and_record": round(drain_cpu * 1e6, 1),
                                   "total": round(per_frame_cpu * 1e6, 1)},
        "frames_per_s_per_redis_core": round(1 / per_frame_cpu) if per_frame_cpu > 0 else None,
        "queued_bytes_per_frame": round((s1["mem"] - s0["mem"]) / n),
        "done_bytes_per_frame": round((s3["mem"] - s0["mem"]) / n),
        "net_bytes_per_frame": {"in": round((s3["net_in"] - s0["net_in"]) / n),
                                "out": round((s3["net_out"] - s0["net_out"]) / n)},
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "redis-capacity.json").write_text(json.dumps(report, indent=2))
    return report


def wait_until(predicate: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--stations", type=int, default=3, help="stations in all, spread evenly over the shards")
    p.add_argument("--workers-per-shard", type=int, default=2)
    p.add_argument("--burst", type=int, default=300, help="frames per station in the capacity phases")
    p.add_argument("--load", type=float, default=0.3, help="steady load, as a fraction of the measured capacity")
    p.add_argument("--steady", type=float, default=20.0, help="seconds of steady load before the kill")
    p.add_argument("--outage", type=float, default=20.0, help="seconds measured with one shard's Redis dead")
    p.add_argument("--kill", type=int, default=0, help="the shard whose redis-server is SIGKILLed")
    p.add_argument("--size", type=int, default=64, help="model input size (resnet18 int8)")
    p.add_argument("--measure-redis", action="store_true", help="measure one Redis's cost per frame instead")
    p.add_argument("--measure-frames", type=int, default=3000)
    p.add_argument("--out", default="shards-out")
    a = p.parse_args(argv)
    from worker.logs import configure_logging

    configure_logging()
    if a.measure_redis:
        print(json.dumps(measure_redis(a), indent=2))
        return 0
    if not 0 <= a.kill < a.shards or a.stations < a.shards:
        p.error("--kill must name a shard, and every shard needs a station")
    report = run_proof(a)
    print(markdown(report))
    ok = (report["results_on_wrong_shard"] == 0 and report["capacity"]["all_shards"]["all_done"]
          and not any(report["kill"]["lost_on_surviving_shards"].values())
          and report["kill"]["killed_shard_frames_accepted_after_kill"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
