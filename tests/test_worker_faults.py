"""Issue 8: no input and no Redis fault stops a worker or loses a frame.

Real redis-servers (with an append-only file where a crash must lose nothing), real `rq worker`
processes, real torchvision models; faults are played with deploy/faults.py, poison with
deploy/poison.py.
"""

from __future__ import annotations

import base64
import signal
import subprocess
import zlib
from collections import Counter
from pathlib import Path

import pytest
from conftest import wait_for
from helpers import jpeg, tiny_artifact
from redis import Redis
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from deploy import poison, workers
from deploy.faults import RedisFaults
from worker import rq_internals as rq
from worker.frames import make_frame
from worker.jobs import FrameJob, FrameQueue, enqueue_frames, read_result
from worker.recovery import IntermediateWatch, recover_abandoned
from worker.redis_server import RedisServer
from worker.registry import ModelRegistry
from worker.serializer import MsgpackSerializer

TERMINAL = {JobStatus.FINISHED, JobStatus.FAILED}


def start(url: str, env: dict[str, str], name: str, log: Path, **settings: str) -> subprocess.Popen:
    """A real `rq worker` whose output goes to a file the test can read while it runs."""
    child = {**env, "VQ_LOG_FORMAT": "json", "VQ_TORCH_THREADS": "1", "VQ_DECODE_THREADS": "1",
             "VQ_SAMPLE_STRATEGY": "none", "VQ_SAMPLE_AUDIT_RATE": "0", **settings}
    return workers.start_worker(url, name, child, output=log.open("w"))


def stop(proc: subprocess.Popen) -> None:
    workers.stop_worker(proc)


def ended(conn: Redis, ids: list[str]) -> bool:
    with conn.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(FrameJob.key_for(job_id), "status")
        return all(s in (b"finished", b"failed") for s in pipe.execute())


def wait_ended(conn: Redis, ids: list[str], proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    """Wait for every frame to end; on a timeout, fail saying where the others are and what the worker said."""
    try:
        wait_for(lambda: ended(conn, ids), timeout=timeout, what=what)
    except pytest.fail.Exception:
        try:
            why = explain(conn, ids, proc, log)
        except Exception as exc:  # Redis itself gone: the timeout is still the failure to report
            why = f"(no explanation: {type(exc).__name__}: {exc})"
        pytest.fail(f"timed out after {timeout}s waiting for {what}\n{why}")


def explain(conn: Redis, ids: list[str], proc: subprocess.Popen, log: Path) -> str:
    """Where the frames that did not end are (status, worker, lists, registries) and the worker's last words."""
    statuses = {i: status_of(conn, i) for i in ids}
    open_ids = [i for i, s in statuses.items() if s not in ("finished", "failed")]
    queue = FrameQueue(connection=conn)
    places = {i: [name for name, key in (("queue", queue.key), ("intermediate", queue.intermediate_queue_key))
                  if conn.lpos(key, i) is not None] for i in open_ids[:10]}
    started = StartedJobRegistry("inference", connection=conn).get_job_ids(cleanup=False)
    lines = log.read_text().splitlines() if log.exists() else []
    return (f"worker exit code: {proc.poll()}; statuses: {dict(Counter(statuses.values()))}\n"
            f"not ended (first 10, where): {places}\nstarted registry: {len(started)} entries, "
            f"queue {conn.llen(queue.key)}, intermediate {conn.llen(queue.intermediate_queue_key)}\n"
            f"worker log (last 40 lines):\n" + "\n".join(lines[-40:]))


def status_of(conn: Redis, job_id: str) -> str | None:
    value = conn.hget(FrameJob.key_for(job_id), "status")
    return value.decode() if value else None


def results_written(conn: Redis, job_id: str) -> int:
    return conn.xlen(f"rq:results:{job_id}")


def reason(conn: Redis, job_id: str) -> str:
    job = FrameJob.fetch(job_id, connection=conn, serializer=MsgpackSerializer)
    result = job.latest_result()
    return (result.exc_string or "") if result is not None else ""


def count_lines(log: Path, text: str) -> int:
    return log.read_text().count(text) if log.exists() else 0


def frames(n: int, station: str = "s") -> list[dict]:
    return [make_frame(jpeg(seed=i), station=station, seq=i) for i in range(n)]


@pytest.fixture
def aof_server():
    """A redis-server that fsyncs every write: kill -9 and a restart lose nothing acknowledged."""
    server = RedisServer(appendonly=True).start()
    try:
        yield server
    finally:
        server.stop()


# -- 1. no input can stop a worker --------------------------------------------------------------
def test_poison_corpus_fails_each_job_alone_and_the_worker_keeps_running(tmp_path, redis_url, redis_conn,
                                                                         subprocess_env):
    artifact = tiny_artifact(tmp_path / "model")
    calls = tmp_path / "calls"
    queue = FrameQueue(connection=redis_conn)
    with poison.CanaryServer() as canary:
        planted: dict[str, poison.Poison] = {}
        good = []
        for i, item in enumerate(poison.all_poisons()):
            planted[poison.plant(redis_conn, "inference", item, webhook_url=canary.url)] = item
            good += [j.id for j in enqueue_frames(queue, [make_frame(jpeg(seed=i), station="good", seq=i)])]
        log = tmp_path / "worker.log"
        proc = start(redis_url, subprocess_env, "w-poison", log, VQ_MODEL_PATH=str(artifact), VQ_MAX_BATCH="8",
                     VQ_TEST_CALLS=str(calls), VQ_TEST_MARKER=str(tmp_path / "imported"))
        try:
            wait_for(lambda: ended(redis_conn, [*planted, *good]), timeout=180, what="every job ended")
            assert proc.poll() is None, f"the worker exited: {log.read_text()[-3000:]}"
            assert all(status_of(redis_conn, i) == "finished" for i in good), "a good frame was failed with a bad one"
            wrong = {}
            for job_id, item in planted.items():
                why = reason(redis_conn, job_id)
                if status_of(redis_conn, job_id) != "failed" or not item.matches(why):
                    wrong[item.name] = (status_of(redis_conn, job_id), why[:160])
            assert not wrong, f"poison not failed with a reason naming it: {wrong}"
            retried = [item.name for job_id, item in planted.items() if item.name != "retries_left_garbage"
                       and (redis_conn.hget(FrameJob.key_for(job_id), "retries_left") or b"3") != b"3"]
            assert not retried, f"bad input spent a retry: {retried}"
            report = poison.canary_report(redis_conn, planted, calls, canary)
            assert report.fired == 0, f"planted code ran: {report}"
            assert not (tmp_path / "imported").exists(), "a job's function module was imported"
            # Still serving: a frame sent after the corpus is classified.
            [after] = enqueue_frames(queue, frames(1, station="after"))
            wait_for(lambda: ended(redis_conn, [after.id]), timeout=60, what="a frame after the corpus")
            assert status_of(redis_conn, after.id) == "finished"
        finally:
            stop(proc)
    assert redis_conn.llen(queue.intermediate_queue_key) == 0


# -- 2. nothing in a job hash runs code, cleanup of abandoned jobs included ---------------------
def test_callbacks_webhooks_and_dependents_planted_on_a_held_job_never_run(tmp_path, redis_url, redis_conn,
                                                                           subprocess_env):
    slow = tiny_artifact(tmp_path / "slow", size=160)
    queue = FrameQueue(connection=redis_conn)
    jobs = enqueue_frames(queue, frames(40))
    calls = tmp_path / "calls"
    started = StartedJobRegistry("inference", connection=redis_conn, job_class=FrameJob,
                                 serializer=MsgpackSerializer)
    settings = {"VQ_MODEL_PATH": str(slow), "VQ_MAX_BATCH": "8", "VQ_HEARTBEAT_TTL": "3",
                "VQ_MAINTENANCE_INTERVAL": "1", "VQ_TEST_CALLS": str(calls)}
    with poison.CanaryServer() as canary:
        victim = start(redis_url, subprocess_env, "victim", tmp_path / "victim.log", **settings)
        in_hand = wait_for(lambda: started.get_job_ids(cleanup=False), timeout=90, interval=0.005,
                           what="a batch in hand")
        victim.send_signal(signal.SIGSTOP)  # hold it still while the job hashes are tampered with
        for job_id in in_hand:
            ctx = poison.PlantContext(job_id=job_id, queue_name="inference", webhook_url=canary.url)
            with redis_conn.pipeline() as pipe:
                pipe.hset(FrameJob.key_for(job_id), mapping={
                    "failure_callback_name": poison.CALLBACK, "success_callback_name": poison.CALLBACK,
                    "stopped_callback_name": poison.CALLBACK, "repeats_left": "3", "repeat_intervals": "[0]",
                    **poison.by_name()["webhooks"].fields(ctx)})
                poison.by_name()["dependents"].sidecar(pipe, ctx)
                pipe.execute()
        workers.stop_worker(victim, signal.SIGKILL)
        rescuer = start(redis_url, subprocess_env, "rescuer", tmp_path / "rescuer.log", **settings)
        try:
            wait_for(lambda: ended(redis_conn, [j.id for j in jobs]), timeout=120, what="every frame ended")
            for job_id in in_hand:
                assert status_of(redis_conn, job_id) == "failed"
                assert "not allowed" in reason(redis_conn, job_id) or "may not" in reason(redis_conn, job_id)
            others = [j.id for j in jobs if j.id not in in_hand]
            assert all(status_of(redis_conn, i) == "finished" for i in others)
            planted = {i: poison.by_name()["dependents"] for i in in_hand}
            report = poison.canary_report(redis_conn, planted, calls, canary)
            assert report.fired == 0, f"planted code ran: {report}"
            # Whatever reads these jobs later (rq info, a dashboard) finds nothing to run.
            assert not any(redis_conn.hget(FrameJob.key_for(i), "failure_callback_name") for i in in_hand)
        finally:
            stop(rescuer)


# -- a frame that keeps killing its worker ------------------------------------------------------
def _hold_and_die(conn: Redis, queue: FrameQueue, ttl: int = 1) -> str:
    """What a worker that dies mid-batch leaves behind: one frame claimed under a lease nobody renews."""
    [(job, _)] = rq.claim_batch(conn, queue, "dead-worker", [], 1, ttl, MsgpackSerializer).claimed
    return job.id


def test_a_frame_whose_workers_keep_dying_fails_as_poison_after_n_rescues(redis_conn):
    queue = FrameQueue(connection=redis_conn)
    [job] = enqueue_frames(queue, frames(1))
    for rescue in range(1, 3):
        _hold_and_die(redis_conn, queue)
        wait_for(lambda: rq.expired_executions(redis_conn, queue), timeout=10, what="the lease to run out")
        counts = recover_abandoned(redis_conn, queue, 2, "sweeper", MsgpackSerializer)
        assert counts == {"requeued": 1}
        assert status_of(redis_conn, job.id) == "queued" and redis_conn.lrange(queue.key, 0, -1) == [job.id.encode()]
        assert redis_conn.hget(job.key, "vq_rescues") == str(rescue).encode()
    _hold_and_die(redis_conn, queue)
    wait_for(lambda: rq.expired_executions(redis_conn, queue), timeout=10, what="the lease to run out")
    assert recover_abandoned(redis_conn, queue, 2, "sweeper", MsgpackSerializer) == {"poison": 1}
    assert status_of(redis_conn, job.id) == "failed"
    assert reason(redis_conn, job.id) == "PoisonFrame: rescued 2 times; its worker died each time"
    assert redis_conn.hget(job.key, "retries_left") == b"3", "a dead worker is not the frame's fault"
    assert StartedJobRegistry("inference", connection=redis_conn).get_job_ids(cleanup=False) == []


def test_frames_stranded_on_the_intermediate_list_are_rescued_then_failed_as_poison(redis_conn):
    queue = FrameQueue(connection=redis_conn)
    [job] = enqueue_frames(queue, frames(1))
    watch = IntermediateWatch(stale_after=0.0)
    rq.wait_for_id(redis_conn, queue, 1)  # moved off the queue by a worker that died before claiming
    assert watch.sweep(redis_conn, queue, 1, "sweeper", MsgpackSerializer) == {}  # first sight only
    assert watch.sweep(redis_conn, queue, 1, "sweeper", MsgpackSerializer) == {"requeued": 1}
    assert redis_conn.lrange(queue.key, 0, -1) == [job.id.encode()]
    rq.wait_for_id(redis_conn, queue, 1)
    watch.sweep(redis_conn, queue, 1, "sweeper", MsgpackSerializer)
    assert watch.sweep(redis_conn, queue, 1, "sweeper", MsgpackSerializer) == {"poison": 1}
    assert status_of(redis_conn, job.id) == "failed" and "rescued 1 times" in reason(redis_conn, job.id)
    assert redis_conn.llen(queue.intermediate_queue_key) == 0 and redis_conn.llen(queue.key) == 0


def test_a_live_worker_fails_a_poison_frame_left_by_dead_ones(tmp_path, redis_url, redis_conn, subprocess_env):
    artifact = tiny_artifact(tmp_path / "model")
    queue = FrameQueue(connection=redis_conn)
    [doomed, fine] = enqueue_frames(queue, frames(2))
    _hold_and_die(redis_conn, queue)
    redis_conn.hset(doomed.key, "vq_rescues", 3)  # it has killed three workers already
    proc = start(redis_url, subprocess_env, "w-sweep", tmp_path / "w.log", VQ_MODEL_PATH=str(artifact),
                 VQ_MAX_RESCUES="3", VQ_MAINTENANCE_INTERVAL="1")
    try:
        wait_for(lambda: ended(redis_conn, [doomed.id, fine.id]), timeout=90, what="both frames ended")
        assert status_of(redis_conn, fine.id) == "finished"
        assert reason(redis_conn, doomed.id) == "PoisonFrame: rescued 3 times; its worker died each time"
    finally:
        stop(proc)


# -- 3. workers ride through Redis faults -------------------------------------------------------
def _ride_settings(artifact: Path, **extra: str) -> dict[str, str]:
    return {"VQ_MODEL_PATH": str(artifact), "VQ_MAX_BATCH": "4", "VQ_HEARTBEAT_TTL": "10",
            "VQ_MAINTENANCE_INTERVAL": "1", "VQ_REDIS_OUTAGE_S": "60", **extra}


def _slow_model_and_frames(tmp_path: Path, server: RedisServer, n: int) -> tuple[Path, Redis, list[str]]:
    """A model slow enough (fp32 at 160 px) to be caught mid-batch, and `n` frames queued for it."""
    conn = Redis.from_url(server.url)
    jobs = enqueue_frames(FrameQueue(connection=conn), frames(n))
    return tiny_artifact(tmp_path / "model", size=160), conn, [j.id for j in jobs]


def _assert_each_frame_recorded_once(conn: Redis, ids: list[str]) -> None:
    assert all(status_of(conn, i) == "finished" for i in ids), "a frame was lost or failed"
    twice = [i for i in ids if results_written(conn, i) != 1]
    assert not twice, f"{len(twice)} frames were recorded more than once"


def test_redis_kill9_and_restart_mid_batch_loses_nothing_and_the_worker_stays(tmp_path, aof_server,
                                                                              subprocess_env):
    artifact, conn, ids = _slow_model_and_frames(tmp_path, aof_server, 160)
    faults, log = RedisFaults(aof_server), tmp_path / "w.log"
    proc = start(aof_server.url, subprocess_env, "w-kill9", log, **_ride_settings(artifact))
    started = StartedJobRegistry("inference", connection=conn)
    try:
        for _ in range(2):  # once with batches in hand (mid-infer/finish), once wherever it is
            wait_for(lambda s=started: s.get_job_ids(cleanup=False), timeout=90, interval=0.005,
                     what="a batch in hand")
            faults.kill9_and_restart(down_s=1.0)
            conn = Redis.from_url(aof_server.url)
            started = StartedJobRegistry("inference", connection=conn)
        wait_ended(conn, ids, proc, log, 120, "every frame ended after the restarts")
        assert proc.poll() is None, f"the worker exited: {log.read_text()[-3000:]}"
        _assert_each_frame_recorded_once(conn, ids)
        assert count_lines(log, "is unavailable") >= 1
        wait_for(lambda: count_lines(log, "is back"), timeout=30, what="the worker to log that redis is back")
    finally:
        stop(proc)
    assert proc.returncode == 0


@pytest.mark.parametrize("fault", ["readonly", "oom", "disk_full", "pause"])
def test_readonly_oom_full_disk_and_pause_are_ridden_through(fault, tmp_path, aof_server, subprocess_env):
    artifact, conn, ids = _slow_model_and_frames(tmp_path, aof_server, 120)
    faults, log = RedisFaults(aof_server), tmp_path / "w.log"
    # Leases outlive the fault's setup (a failover under load takes a while): no frame looks abandoned.
    proc = start(aof_server.url, subprocess_env, f"w-{fault}", log, **_ride_settings(artifact, VQ_HEARTBEAT_TTL="60"))
    started = StartedJobRegistry("inference", connection=conn)
    try:
        wait_for(lambda: started.get_job_ids(cleanup=False), timeout=90, interval=0.005, what="a batch in hand")
        if fault == "pause":
            with faults.paused(3):
                pass  # the worker's calls block until the server lets them through
        else:
            # Held still while the fault is set up, so its next writes meet the fault with batches in hand.
            proc.send_signal(signal.SIGSTOP)
            window = {"readonly": faults.readonly, "oom": faults.oom, "disk_full": faults.disk_full}[fault]()
            with window:
                proc.send_signal(signal.SIGCONT)
                wait_for(lambda: count_lines(log, "is unavailable"), timeout=60, what="the worker to see the fault")
        wait_ended(conn, ids, proc, log, 120, "every frame ended after the fault")
        assert proc.poll() is None, f"the worker exited: {log.read_text()[-3000:]}"
        _assert_each_frame_recorded_once(conn, ids)
        if fault != "pause":  # logged just after the call that succeeded: it may trail the last frame
            wait_for(lambda: count_lines(log, "is back"), timeout=30, what="the worker to log that redis is back")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a fault that failed to start left it stopped
        stop(proc)


def test_an_idle_worker_rides_through_a_demotion_that_unblocks_its_dequeue(tmp_path, aof_server, subprocess_env):
    """Sentinel demotes an old master with REPLICAOF: the BLMOVE an idle worker waits in answers UNBLOCKED.

    Usually: the worker's BLMOVE lasts a second, and one sent while the demotion pauses writes gets
    READONLY instead. Either must be waited out; test_chaos.py checks UNBLOCKED itself, deterministically."""
    conn = Redis.from_url(aof_server.url)
    log = tmp_path / "w.log"
    proc = start(aof_server.url, subprocess_env, "w-demoted", log, **_ride_settings(tiny_artifact(tmp_path / "m")))
    try:
        workers.wait_registered(conn, proc, "w-demoted")
        wait_for(lambda: any(c["cmd"] == "blmove" and "b" in c["flags"] for c in conn.client_list()), timeout=30,
                 interval=0.005, what="the worker blocked on the empty queue")
        with RedisFaults(aof_server).readonly(via="replicaof"):
            wait_for(lambda: count_lines(log, "is unavailable"), timeout=60, what="the worker to see the demotion")
        ids = [job.id for job in enqueue_frames(FrameQueue(connection=conn), frames(6))]
        wait_ended(conn, ids, proc, log, 60, "frames sent after the demotion")
        assert all(status_of(conn, i) == "finished" for i in ids)
        assert proc.poll() is None
    finally:
        stop(proc)


def test_an_error_that_waiting_cannot_cure_stops_the_worker_with_a_failing_exit_code(tmp_path, redis_url, redis_conn,
                                                                                     subprocess_env):
    """RQ would log it and exit 0; a supervisor that restarts on failure must see a failure."""
    log = tmp_path / "w.log"
    proc = start(redis_url, subprocess_env, "w-wrongtype", log, VQ_MODEL_PATH=str(tiny_artifact(tmp_path / "m")))
    try:
        workers.wait_registered(redis_conn, proc, "w-wrongtype")
        redis_conn.set(FrameQueue(connection=redis_conn).key, "not a list")  # the queue key clobbered
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "stopped by an unexpected error: ResponseError: WRONGTYPE" in log.read_text()


@pytest.mark.parametrize("lost", ["everything", "the worker's hash"])
def test_a_worker_that_redis_forgot_registers_again_and_serves_on(lost, tmp_path, redis_url, redis_conn,
                                                                 subprocess_env):
    """A flush; or a restart from the AOF after the worker's hash expired while Redis was down."""
    log = tmp_path / "w.log"
    proc = start(redis_url, subprocess_env, "w-forgotten", log, VQ_MODEL_PATH=str(tiny_artifact(tmp_path / "m")),
                 VQ_MAINTENANCE_INTERVAL="1")
    try:
        workers.wait_registered(redis_conn, proc, "w-forgotten")
        if lost == "everything":
            redis_conn.flushall()
        else:
            with redis_conn.pipeline() as pipe:  # what a heartbeat leaves on a hash that expired
                pipe.delete("rq:worker:w-forgotten")
                pipe.hset("rq:worker:w-forgotten", "last_heartbeat", "2026-11-29T00:00:00.000000Z")
                pipe.execute()
        wait_for(lambda: redis_conn.hexists("rq:worker:w-forgotten", "birth"), timeout=30,
                 what="the worker registered again")
        assert workers.is_registered(redis_conn, "w-forgotten")
        worker = rq.Worker.find_by_key("rq:worker:w-forgotten", connection=redis_conn)
        assert worker is not None and worker.queue_names() == ["inference"] and worker.get_state() in ("idle", "busy")
        ids = [job.id for job in enqueue_frames(FrameQueue(connection=redis_conn), frames(3))]
        wait_ended(redis_conn, ids, proc, log, 60, "frames sent after the flush")
        assert all(status_of(redis_conn, i) == "finished" for i in ids)
        assert count_lines(log, "registering it again") == 1
    finally:
        stop(proc)


def test_an_outage_past_the_limit_exits_nonzero_saying_why(tmp_path, subprocess_env):
    artifact = tiny_artifact(tmp_path / "model")
    server = RedisServer().start()
    conn = Redis.from_url(server.url)
    log = tmp_path / "w.log"
    proc = start(server.url, subprocess_env, "w-gone", log, VQ_MODEL_PATH=str(artifact), VQ_REDIS_OUTAGE_S="2")
    try:
        workers.wait_registered(conn, proc, "w-gone")
        server.stop()
        proc.wait(timeout=60)
        assert proc.returncode != 0
        assert "past the limit of 2s (VQ_REDIS_OUTAGE_S)" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()


# -- 5. hot swap: an idle worker swaps, once -----------------------------------------------------
def test_an_idle_worker_swaps_without_a_frame_and_prepares_each_version_once(tmp_path, redis_url, redis_conn,
                                                                             subprocess_env):
    registry = ModelRegistry(redis_conn)
    v1 = registry.publish(tiny_artifact(tmp_path / "v1"))
    log = tmp_path / "w.log"
    proc = start(redis_url, subprocess_env, "w-idle", log, VQ_SWAP_POLL_S="0.1", VQ_MODEL_CACHE=str(tmp_path / "c"))
    try:
        workers.wait_registered(redis_conn, proc, "w-idle")
        v2 = registry.publish(tiny_artifact(tmp_path / "v2"))
        assert v2 != v1
        wait_for(lambda: count_lines(log, '"model swapped"'), timeout=60, what="the idle worker to swap")
        [job] = enqueue_frames(FrameQueue(connection=redis_conn), frames(1))
        wait_for(lambda: ended(redis_conn, [job.id]), timeout=60)
        assert Job.fetch(job.id, connection=redis_conn, serializer=MsgpackSerializer).return_value()[
            "model_version"] == v2
        assert count_lines(log, "preparing it") == 1, "the same version was fetched and warmed more than once"
    finally:
        stop(proc)


def test_a_planted_failure_text_bomb_is_read_with_a_bound(redis_conn):
    bomb = base64.b64encode(zlib.compress(b"x" * (200 * 1024 * 1024), 9))  # 270 KB that inflates to 200 MB
    result = read_result("j", "1-0", {b"type": b"2", b"exc_string": bomb,
                                      b"created_at": b"2026-01-01T00:00:00.000000Z"}, redis_conn)
    assert len(result.exc_string) == 64 * 1024
