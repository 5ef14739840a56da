"""Redis faults around the worker: producers, gateway, update lock, sample feed and ingest.

Every fault is a real one on a real redis-server: `kill -9` and a restart on the same port and
directory (AOF, `appendfsync always`), READONLY (REPLICAOF another local server), OOM (a tiny
`maxmemory`), a pause (CLIENT PAUSE WRITE). The "worker" that finishes frames here is RQ's own
job and result API, so no model has to load: these tests are about what surrounds the worker.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import structlog.testing
from conftest import ROOT, wait_for
from helpers import CLASSES, jpeg
from redis import Redis
from rq.job import Job, JobStatus
from rq.results import Result
from test_gateway import Gateway, upload

from continual.ingest import GROUP, ingest
from continual.store import SampleStore
from continual.update import LOCK_KEY, UpdateLock, get_args_parser
from continual.update import main as update_main
from deploy.faults import RedisFaults
from deploy.gateway import create_app
from producer.api import Producer
from producer.camera import CameraOptions, CameraStreamer
from producer.connection import mask_url
from producer.watch import Watcher
from worker.frames import make_frame
from worker.jobs import FrameJob, FrameQueue
from worker.metrics import WorkerMetrics
from worker.redis_health import RedisHealth, connect
from worker.redis_server import RedisServer
from worker.runtime import Prediction
from worker.sample_feed import SAMPLES_COUNTS, SAMPLES_STREAM, SampleFeed, SamplingConfig
from worker.serializer import MsgpackSerializer

PY = sys.executable


@pytest.fixture
def aof() -> Iterator[RedisServer]:
    """A redis-server whose acknowledged writes survive kill -9 (appendonly, appendfsync always)."""
    with RedisServer(appendonly=True) as server:
        yield server


def finish(conn: Redis, job_id: str) -> None:
    """Play the worker's part through RQ's own API: a successful result, then the status."""
    job = Job.fetch(job_id, connection=conn, serializer=MsgpackSerializer)
    Result.create(job, Result.Type.SUCCESSFUL, ttl=600, return_value={"frame_id": job_id, "label": "ok"})
    job.set_status(JobStatus.FINISHED)


def frames(n: int, station: str = "s") -> list[dict[str, Any]]:
    return [make_frame(jpeg(seed=i), station=station, seq=i) for i in range(n)]


class InThread:
    """Run `fn` on a thread; `.result()` joins and returns its value or raises its exception."""

    def __init__(self, fn: Any) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Any) -> None:
        try:
            self.value = fn()
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def result(self, timeout: float = 30) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "still running"
        if self.error is not None:
            raise self.error
        return self.value


# -- producer: idempotent resend ------------------------------------------------------------------------


def test_a_resend_never_makes_a_second_job_nor_undoes_a_result(redis_url: str, redis_conn: Redis) -> None:
    batch = frames(3)
    with Producer(redis_url, station="s") as producer:
        assert producer.submit_frames(batch) == [f["id"] for f in batch]
        finish(redis_conn, batch[0]["id"])
        # The same frames again, as after an ambiguous failure (the write done, the reply lost).
        assert producer.submit_frames(batch) == [f["id"] for f in batch]
        assert producer.already_enqueued == 3
    queue = FrameQueue(connection=redis_conn)
    assert queue.job_ids == [f["id"] for f in batch]  # each queued once, not twice
    assert redis_conn.hget(FrameJob.key_for(batch[0]["id"]), "status") == b"finished"


# -- producer: riding through each fault ---------------------------------------------------------------


def test_submit_and_wait_ride_through_kill9_and_an_aof_restart(aof: RedisServer) -> None:
    producer = Producer(aof.url, station="s", max_outage_s=30)
    producer.health.max_delay = 0.1
    before = producer.submit_frames(frames(2))
    aof.kill()
    late = frames(3, station="late")
    sending = InThread(lambda: producer.submit_frames(late))
    wait_for(lambda: not producer.health.up, timeout=10, what="the producer noticing the outage")
    aof.start()
    ids = sending.result()
    conn = Redis.from_url(aof.url)
    assert FrameQueue(connection=conn).job_ids == before + ids  # the AOF kept the first two
    waiting = InThread(lambda: list(producer.wait(before + ids, timeout=20)))
    aof.kill()
    wait_for(lambda: not producer.health.up, timeout=10, what="the wait noticing the outage")
    aof.start()
    conn = Redis.from_url(aof.url)
    for job_id in before + ids:
        finish(conn, job_id)
    outcomes = waiting.result()
    assert sorted(o.job_id for o in outcomes) == sorted(before + ids) and all(o.ok for o in outcomes)
    assert producer.health.outages == 2
    conn.close()
    producer.close()


def make_readonly(primary: RedisServer, other: RedisServer) -> Redis:
    conn = Redis.from_url(primary.url)
    conn.replicaof("127.0.0.1", other.port)
    return conn


@pytest.mark.parametrize("fault", ["readonly", "oom", "disk_full", "pause"])
def test_submit_waits_out_readonly_oom_full_disk_and_pause(fault: str, redis_server: RedisServer,
                                                           redis_conn: Redis) -> None:
    # A short socket timeout, so the paused write times out (and is resent) rather than just waiting.
    producer = Producer(connect(redis_server.url, socket_timeout=0.3), station="s", max_outage_s=30)
    producer.health.max_delay = 0.1
    other = RedisServer().start() if fault == "readonly" else None
    full_disk = contextlib.ExitStack()
    try:
        if fault == "readonly":
            redis_conn.replicaof("127.0.0.1", other.port)
            wait_for(lambda: redis_conn.info("replication")["master_link_status"] == "up", timeout=10)
        elif fault == "disk_full":
            full_disk.enter_context(RedisFaults(redis_server).disk_full())
        elif fault == "oom":
            redis_conn.config_set("maxmemory", 1)
        else:
            redis_conn.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
        batch = frames(4)
        sending = InThread(lambda: producer.submit_frames(batch))
        wait_for(lambda: not producer.health.up, timeout=10, what=f"the producer noticing {fault}")
        if fault == "readonly":
            redis_conn.replicaof("no", "one")
        elif fault == "disk_full":
            full_disk.close()
        elif fault == "oom":
            redis_conn.config_set("maxmemory", 0)
        else:
            redis_conn.execute_command("CLIENT", "UNPAUSE")
        assert sending.result() == [f["id"] for f in batch]
        assert producer.health.up
        # Exactly one job per frame, even where a timed-out EXEC may have been applied after all.
        assert FrameQueue(connection=redis_conn).job_ids == [f["id"] for f in batch]
    finally:
        full_disk.close()
        if other is not None:
            other.stop()
        producer.connection.close()


def test_files_wait_rides_through_a_restart_and_reports_every_frame(
    aof: RedisServer, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(seed=i))
    err = tmp_path / "stderr.log"
    env = {**subprocess_env, "VQ_REDIS_OUTAGE_S": "30", "VQ_LOG_FORMAT": "json"}
    with open(err, "w") as err_file:
        proc = subprocess.Popen([PY, "-m", "producer", "files", str(tmp_path), "--wait", "--timeout", "60",
                                 "--redis-url", aof.url], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=err_file, text=True)
    try:
        conn = Redis.from_url(aof.url)
        wait_for(lambda: FrameQueue(connection=conn).count == 3, timeout=30, what="3 frames queued")
        ids = FrameQueue(connection=conn).job_ids
        conn.close()
        aof.kill()
        wait_for(lambda: "is unavailable; waiting for it" in err.read_text(), timeout=20, what="outage noticed")
        aof.start()
        conn = Redis.from_url(aof.url)
        for job_id in ids:
            finish(conn, job_id)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.read_text()
    lines = [json.loads(line) for line in out.splitlines()]
    assert sorted(line["frame_id"] for line in lines) == sorted(ids)
    assert {line["status"] for line in lines} == {"finished"}
    assert "redis (producer) is back" in err.read_text()


def test_cli_masks_the_password_and_names_a_bad_outage_setting(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    (tmp_path / "p.jpg").write_bytes(jpeg())

    def files(url: str, outage: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "producer", "files", str(tmp_path / "p.jpg"), "--redis-url", url],
                              env={**subprocess_env, "VQ_REDIS_OUTAGE_S": outage}, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    done = files("redis://:hunter2@127.0.0.1:1/0", "1")  # nothing listens there
    assert done.returncode == 3
    assert "hunter2" not in done.stderr + done.stdout and "not sent: Redis is unavailable" in done.stderr
    with RedisServer(extra_args=("--requirepass", "right-one")) as server:
        done = files(f"redis://:hunter2@127.0.0.1:{server.port}/0", "1")
    assert done.returncode == 3 and "hunter2" not in done.stderr + done.stdout
    assert f"Redis at redis://:***@127.0.0.1:{server.port}/0 refused our credentials" in done.stderr
    done = files("redis://:hunter2@127.0.0.1:1/0", "soon")
    assert done.returncode == 2 and "VQ_REDIS_OUTAGE_S='soon' is not a number" in done.stderr
    assert mask_url("redis://u:pw@h:1/0?password=pw2") == "redis://u:***@h:1/0?password=***"


def test_watch_keeps_files_through_oom_and_moves_them_once_confirmed(
    tmp_path: Path, redis_url: str, redis_conn: Redis
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    producer = Producer(redis_url, station="dock", max_outage_s=30)
    watcher = Watcher(producer, inbox, poll=0.02, backoff_initial=0.02, backoff_max=0.05)
    running = InThread(watcher.run)
    try:
        redis_conn.config_set("maxmemory", 1)
        (inbox / "a.jpg").write_bytes(jpeg())
        wait_for(lambda: watcher.counters["redis_errors"] >= 2, timeout=20, what="enqueue refused while OOM")
        assert (inbox / "a.jpg").exists() and not (inbox / ".done").exists()
        redis_conn.config_set("maxmemory", 0)
        wait_for(lambda: (inbox / ".done" / "a.jpg").exists(), timeout=20, what="a.jpg moved once enqueued")
    finally:
        watcher.stop.set()
    assert running.result() == 0
    [job] = FrameQueue(connection=redis_conn).get_jobs()
    assert job.args[0]["image"] == (inbox / ".done" / "a.jpg").read_bytes()
    producer.close()


class FlakyRedisCapture:
    """A video source whose frames are numbered images; it turns OOM on at frame `on`, off at `off`."""

    def __init__(self, conn: Redis, n: int, on: int, off: int) -> None:
        self.conn, self.n, self.on, self.off, self.i = conn, n, on, off, 0

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.i >= self.n:
            return False, None
        if self.i == self.on:
            self.conn.config_set("maxmemory", 1)
        if self.i == self.off:
            self.conn.config_set("maxmemory", 0)
        self.i += 1
        return True, np.full((24, 32, 3), self.i * 7 % 256, dtype=np.uint8)

    def isOpened(self) -> bool:  # OpenCV's name
        return True

    def release(self) -> None:
        pass


def test_camera_drops_and_counts_frames_while_redis_is_oom_and_logs_once(redis_url: str, redis_conn: Redis) -> None:
    n = 30
    with Producer(redis_url, station="cam", wait_for_redis=False) as producer, \
            structlog.testing.capture_logs() as logs:
        options = CameraOptions(source="clip.avi", fps=200, backoff_initial=0.001, backoff_max=0.004)
        streamer = CameraStreamer(producer, options, opener=lambda _: FlakyRedisCapture(redis_conn, n, 5, 12))
        assert streamer.run() == 0
    c = streamer.counters
    assert c["captured"] == n and c["sent"] + c["skipped_redis"] == n
    assert c["skipped_redis"] >= 7 and c["sent"] >= 5 + 1 and c["redis_outages"] == 1
    assert FrameQueue(connection=redis_conn).count == c["sent"]
    events = [e["event"] for e in logs]
    assert events.count("camera.redis_unavailable") == 1 and events.count("camera.redis_back") == 1
    assert events.count("redis (camera) is unavailable; waiting for it") == 1


# -- gateway ----------------------------------------------------------------------------------------------


def test_gateway_answers_503_with_retry_after_through_each_fault_and_recovers(aof: RedisServer) -> None:
    conn = Redis.from_url(aof.url)
    other = RedisServer().start()
    # A short socket timeout so that a paused Redis costs this test little; the default is 5 s.
    app = create_app(connection=connect(aof.url, socket_timeout=0.5), api_key="k")
    port = str(aof.port)
    try:
        with Gateway(app) as gateway, httpx.Client(base_url=gateway.url, headers={"X-API-Key": "k"}, timeout=30) as c:
            assert c.post("/v1/jobs", **upload(jpeg())).status_code == 202

            def unavailable(kind: str) -> None:
                r = c.post("/v1/jobs", **upload(jpeg()))
                assert r.status_code == 503, (kind, r.text)
                assert int(r.headers["retry-after"]) >= 1 and kind in r.json()["detail"]
                assert port not in r.text and "127.0.0.1" not in r.text
                if kind != "unreachable":
                    return  # reads still work (PING, the readiness checks): only writes are refused
                ready = c.get("/readyz")
                assert ready.status_code == 503 and ready.json()["reason"] == f"Redis is {kind}"
                assert port not in ready.text and "127.0.0.1" not in ready.text
                health = c.get("/healthz")
                assert health.status_code == 200 and health.json()["redis_error"] == kind

            def back() -> None:
                wait_for(lambda: c.post("/v1/jobs", **upload(jpeg())).status_code == 202, timeout=20,
                         what="the gateway recovering by itself")

            aof.kill()
            unavailable("unreachable")
            aof.start()
            back()
            conn = Redis.from_url(aof.url)
            conn.config_set("maxmemory", 1)
            unavailable("out of memory")
            conn.config_set("maxmemory", 0)
            back()
            conn.replicaof("127.0.0.1", other.port)
            wait_for(lambda: conn.info("replication")["master_link_status"] == "up", timeout=10)
            unavailable("read-only (failover in progress)")
            conn.replicaof("no", "one")
            back()
            conn.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
            r = c.post("/v1/jobs", **upload(jpeg()))
            assert r.status_code == 503 and "paused" in r.json()["detail"] and r.headers["retry-after"]
            conn.execute_command("CLIENT", "UNPAUSE")
            back()
    finally:
        other.stop()
        conn.close()


# -- the update lock --------------------------------------------------------------------------------------


def test_update_lock_is_short_renewed_and_survives_a_restart(aof: RedisServer) -> None:
    assert get_args_parser().parse_args([]).lock_ttl <= 120  # a dead updater blocks the next run briefly
    conn = connect(aof.url, socket_timeout=1)
    lost = threading.Event()
    lock = UpdateLock(conn, 3, RedisHealth(30), on_lost=lost.set)
    lock._keeper_health.max_delay = 0.1
    assert lock.acquire()
    second = UpdateLock(Redis.from_url(aof.url), 3, RedisHealth(30))
    assert not second.acquire()
    wait_for(lambda: lock.renewals >= 3, timeout=20, what="three renewals (past the 3 s TTL)")
    aof.kill()
    aof.start()  # the key comes back from the AOF with its expiry
    renewed = lock.renewals
    wait_for(lambda: lock.renewals > renewed, timeout=20, what="a renewal after the restart")
    probe = Redis.from_url(aof.url)
    assert probe.get(LOCK_KEY) == lock.token and not lost.is_set()
    # Someone else holds it now (it expired, another run took it): the keeper says the lock is lost.
    probe.set(LOCK_KEY, b"someone-else", px=60_000)
    wait_for(lost.is_set, timeout=20, what="the lock reported lost")
    lock.release()
    assert probe.get(LOCK_KEY) == b"someone-else"  # not ours to delete
    probe.close()


def test_update_main_releases_its_lock_and_names_a_bad_setting(
    redis_url: str, redis_conn: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--redis-url", redis_url, "--store", str(tmp_path / "store"), "--out", str(tmp_path / "runs"),
            "--min-new-labels", "1000"]
    assert update_main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out and redis_conn.get(LOCK_KEY) is None
    monkeypatch.setenv("VQ_REDIS_OUTAGE_S", "0")
    assert update_main(argv) == 1
    assert "VQ_REDIS_OUTAGE_S=0.0 is out of range" in capsys.readouterr().err


# -- samples: refused, not trimmed; every entry accounted for ----------------------------------------------


def offer(feed: SampleFeed, n: int, start: int = 0) -> None:
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        pred = Prediction(0, "ok", 0.3, [], np.array([0.3, 0.3, 0.2, 0.2]))
        feed.offer(make_frame(jpeg(seed=i), station="s", seq=i), pred, image, "v1", CLASSES)


def counts(conn: Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in conn.hgetall(SAMPLES_COUNTS).items()}


def test_a_full_sample_stream_refuses_and_counts_instead_of_trimming(tmp_path: Path, redis_conn: Redis) -> None:
    cfg = SamplingConfig(audit_rate=0.0, dedup_bits=-1, stream_maxlen=5)
    feed = SampleFeed(redis_conn, WorkerMetrics(), cfg)
    feed.start()
    offer(feed, 8)
    feed.stop()
    assert redis_conn.xlen(SAMPLES_STREAM) == 5
    first = [f[b"frame_id"] for _, f in redis_conn.xrange(SAMPLES_STREAM)]
    assert counts(redis_conn) == {"offered": 8, "added": 5, "dropped_full": 3}
    assert feed.metrics.samples.labels(outcome="dropped_full")._value.get() == 3
    # A pending entry deleted under the ingester, and a bad one: counted, not silently gone.
    ids = [i for i, _ in redis_conn.xrange(SAMPLES_STREAM)]
    redis_conn.xgroup_create(SAMPLES_STREAM, GROUP, id="0")
    redis_conn.xreadgroup(GROUP, "dead-one", {SAMPLES_STREAM: ">"}, count=1)
    redis_conn.xdel(SAMPLES_STREAM, ids[0])
    with SampleStore(tmp_path / "store") as store:
        got = ingest(redis_conn, store)
        assert got["added"] == 4 and got["deleted"] == 1
        assert {s.frame_id.encode() for s in store.samples()} == set(first[1:])
    c = counts(redis_conn)
    assert c["added"] == c.get("ingested", 0) + c.get("deleted", 0) + c.get("bad", 0) + redis_conn.xlen(SAMPLES_STREAM)
    # Room again: the oldest samples were kept, new ones are taken.
    feed = SampleFeed(redis_conn, WorkerMetrics(), cfg)
    feed.start()
    offer(feed, 2, start=100)
    feed.stop()
    assert redis_conn.xlen(SAMPLES_STREAM) == 2 and counts(redis_conn)["added"] == 7


def test_the_capture_thread_survives_redis_kill9_and_logs_once(aof: RedisServer) -> None:
    conn = Redis.from_url(aof.url)
    feed = SampleFeed(conn, WorkerMetrics(), SamplingConfig(audit_rate=0.0, dedup_bits=-1))
    feed.health.max_delay = 0.05
    dropped = feed.metrics.samples.labels(outcome="dropped_error")
    with structlog.testing.capture_logs() as logs:
        feed.start()
        aof.kill()
        for k in range(5):  # batches: offered one at a time, each waits to be taken
            offer(feed, 1, start=k)
            wait_for(lambda k=k: dropped._value.get() >= k + 1, timeout=10, what="the sample dropped and counted")
        assert feed._thread.is_alive()
        aof.start()
        after = Redis.from_url(aof.url)
        seeds = iter(range(50, 10_000))

        def captured() -> bool:  # offers until one gets through (the first may fall in the backoff)
            offer(feed, 1, start=next(seeds))
            return after.xlen(SAMPLES_STREAM) >= 1

        wait_for(captured, timeout=20, interval=0.05, what="capture after the restart")
        feed.stop()
        after.close()
    events = [e["event"] for e in logs]
    assert events.count("redis (sample feed) is unavailable; waiting for it") == 1
    assert events.count("redis (sample feed) is back") == 1
    assert "samples dropped" not in events


def test_ingest_follow_rides_through_a_restart_and_stops_on_sigterm(
    aof: RedisServer, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    conn = Redis.from_url(aof.url)
    feed_cfg = SamplingConfig(audit_rate=0.0, dedup_bits=-1)

    def capture(n: int, start: int) -> None:
        feed = SampleFeed(Redis.from_url(aof.url), WorkerMetrics(), feed_cfg)
        feed.start()
        offer(feed, n, start=start)
        feed.stop()

    store_dir = tmp_path / "store"
    err = tmp_path / "ingest.log"
    env = {**subprocess_env, "VQ_REDIS_OUTAGE_S": "30", "VQ_LOG_FORMAT": "json"}
    with open(err, "w") as err_file:
        proc = subprocess.Popen([PY, "-m", "continual.ingest", "--follow", "--redis-url", aof.url, "--store",
                                 str(store_dir)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err_file)
    try:
        capture(6, 0)
        probe = SampleStore(store_dir)
        wait_for(lambda: probe.count() == 6 and conn.xlen(SAMPLES_STREAM) == 0, timeout=60, what="6 ingested")
        aof.kill()
        wait_for(lambda: "redis (ingest) is unavailable" in err.read_text(), timeout=20, what="outage noticed")
        aof.start()
        conn = Redis.from_url(aof.url)
        capture(4, 10)
        wait_for(lambda: probe.count() == 10, timeout=60, what="4 more ingested after the restart")
        probe.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, err.read_text()
    assert "ingest stopped" in err.read_text()
    c = counts(conn)
    assert c["added"] == c["ingested"] == 10 and conn.xlen(SAMPLES_STREAM) == 0
    assert conn.xpending(SAMPLES_STREAM, GROUP)["pending"] == 0
    conn.close()


def test_a_read_does_not_end_an_outage_of_refused_writes_but_ends_one_of_a_lost_connection() -> None:
    from redis import exceptions as rex

    with structlog.testing.capture_logs() as logs:
        health = RedisHealth(60)
        health.failed(rex.ReadOnlyError("You can't write against a read only replica."))
        health.succeeded(wrote=False)  # a GET still works on a read-only server
        assert not health.up
        health.failed(rex.ConnectionError("Connection reset"))  # a connection lost inside the window
        health.succeeded(wrote=False)
        assert not health.up
        health.succeeded()
        assert health.up
        health.failed(rex.ConnectionError("Connection refused"))
        health.succeeded(wrote=False)  # the server answers again: that is all a lost connection needed
        assert health.up
    assert [e["event"] for e in logs].count("redis is back") == 2
