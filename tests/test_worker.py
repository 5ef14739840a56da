"""The streaming path end to end: real redis-server, real `rq worker` processes, real torchvision models."""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.request

from conftest import wait_for
from helpers import CLASSES, jpeg, png, start_worker, stop_worker, tiny_artifact, worker_registered
from rq import Worker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from worker.frames import make_frame
from worker.jobs import RESULTS_STREAM, FrameQueue, enqueue_frames
from worker.redis_server import free_port
from worker.serializer import MsgpackSerializer


def statuses(jobs):
    return [j.get_status(refresh=True) for j in jobs]


def all_done(jobs):
    done = {JobStatus.FINISHED, JobStatus.FAILED}
    return all(s in done for s in statuses(jobs))


def test_frames_flow_in_batches_with_results_and_true_rq_state(tmp_path, redis_url, redis_conn, subprocess_env):
    artifact = tiny_artifact(tmp_path / "model", int8=True)
    queue = FrameQueue(connection=redis_conn)
    frames = [make_frame(jpeg(seed=i), station="line-1", seq=i) for i in range(48)]
    jobs = enqueue_frames(queue, frames)  # queued before the worker starts: batches must form
    metrics_port = free_port()
    proc = start_worker(redis_url, subprocess_env, "w-e2e", VQ_MODEL_PATH=str(artifact), VQ_MAX_BATCH="16",
                        VQ_METRICS_PORT=str(metrics_port))
    try:
        wait_for(lambda: all_done(jobs), timeout=90, what="48 frames classified")
        assert statuses(jobs) == [JobStatus.FINISHED] * 48
        results = [j.return_value() for j in jobs]
        for frame, result in zip(frames, results, strict=True):
            assert result["frame_id"] == frame["id"] and result["station"] == "line-1"
            assert result["label"] in CLASSES and 0.0 < result["confidence"] <= 1.0
            assert result["topk"][0]["label"] == result["label"] and len(result["topk"]) == 3
            assert result["precision"] == "int8"
            assert set(result["timings"]) >= {"queue_wait_ms", "decode_ms", "inference_ms", "end_to_end_ms"}
        assert max(r["timings"]["batch_size"] for r in results) > 1
        versions = {r["model_version"] for r in results}
        assert versions == {json.loads((artifact / "manifest.json").read_text())["version"]}

        entries = redis_conn.xrange(RESULTS_STREAM)
        assert len(entries) == 48
        assert {e[1][b"frame_id"].decode() for e in entries} == {f["id"] for f in frames}

        # RQ's own bookkeeping shows the truth (what `rq info` and rq-dashboard read).
        assert FinishedJobRegistry("inference", connection=redis_conn).count == 48
        assert StartedJobRegistry("inference", connection=redis_conn).count == 0
        assert redis_conn.llen(queue.intermediate_queue_key) == 0
        [w] = [w for w in Worker.all(connection=redis_conn) if w.name == "w-e2e"]
        assert w.successful_job_count == 48

        # A classified frame keeps its job (args included) but not its image (VQ_KEEP_IMAGES=failed).
        kept = Job.fetch(jobs[0].id, connection=redis_conn, serializer=MsgpackSerializer)
        assert kept.args[0] == {**frames[0], "image": b""} and kept.func_name == "worker.inference.classify"
        assert int(redis_conn.hget(kept.key, "vq_image_dropped_bytes")) >= len(frames[0]["image"])

        # Prometheus metrics on VQ_METRICS_PORT.
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'vq_frames_total{outcome="ok"} 48.0' in text
        assert f'vq_model_info{{precision="int8",version="{versions.pop()}"}} 1.0' in text
        assert "vq_batch_size_count" in text and "vq_end_to_end_seconds_bucket" in text
    finally:
        out = stop_worker(proc)
    assert proc.returncode == 0, out


def test_one_bad_frame_fails_alone_and_foreign_functions_never_run(tmp_path, redis_url, redis_conn,
                                                                    subprocess_env):
    artifact = tiny_artifact(tmp_path / "model")
    marker = tmp_path / "imported"
    queue = FrameQueue(connection=redis_conn)
    good = [make_frame(jpeg(seed=i), station="s", seq=i) for i in range(6)]
    bad_frames = {
        "corrupt": {**make_frame(jpeg()), "image": b"\xff\xd8\xff" + bytes(range(256)) * 4},
        "truncated": {**make_frame(jpeg()), "image": jpeg()[:300]},
        "empty": {**make_frame(jpeg()), "image": b""},
        "non-image": {**make_frame(jpeg()), "image": b"GIF89a" + b"\0" * 100},
        "oversized": make_frame(jpeg(200, 200)),  # 40,000 pixels, over the worker's VQ_MAX_PIXELS
        "stale": make_frame(jpeg(), ts=time.time() - 60, meta={"deadline_s": 1}),
    }
    frames = good[:3] + list(bad_frames.values()) + good[3:]
    jobs = enqueue_frames(queue, frames)
    foreign = queue.enqueue("tests.forbidden_job.boom", "payload")
    proc = start_worker(redis_url, subprocess_env, "w-bad", VQ_MODEL_PATH=str(artifact), VQ_MAX_PIXELS="20000",
                        VQ_TEST_MARKER=str(marker))
    try:
        wait_for(lambda: all_done([*jobs, foreign]), timeout=90, what="all jobs ended")
        by_id = {j.id: j for j in jobs}
        for frame in good:
            assert by_id[frame["id"]].get_status() == JobStatus.FINISHED
        expected = {
            "corrupt": "could not be decoded|corrupt",
            "truncated": "could not be decoded|truncated",
            "empty": "empty",
            "non-image": "neither JPEG nor PNG",
            "oversized": "VQ_MAX_PIXELS",
            "stale": "FrameExpired: .*deadline",
        }
        for name, frame in bad_frames.items():
            job = by_id[frame["id"]]
            assert job.get_status() == JobStatus.FAILED, name
            assert re.search(expected[name], job.latest_result().exc_string), (name, job.latest_result().exc_string)
            assert job.retries_left == 3, f"{name}: a bad frame must not be retried"
        assert foreign.get_status() == JobStatus.FAILED
        assert "not allowed" in foreign.latest_result().exc_string
        assert not marker.exists(), "the worker imported a function outside the allowlist"
        assert FailedJobRegistry("inference", connection=redis_conn).count == len(bad_frames) + 1
        # A failed frame keeps its image, for a look at it or `rq requeue`.
        corrupt = Job.fetch(bad_frames["corrupt"]["id"], connection=redis_conn, serializer=MsgpackSerializer)
        assert corrupt.args[0]["image"] == bad_frames["corrupt"]["image"]
    finally:
        stop_worker(proc)


def _slow_worker_settings(artifact):
    # fp32 at 160 px on one thread: ~0.2 s per batch of 8, long enough to be caught mid-batch.
    return {"VQ_MODEL_PATH": str(artifact), "VQ_MAX_BATCH": "8", "VQ_HEARTBEAT_TTL": "3",
            "VQ_MAINTENANCE_INTERVAL": "1"}


def test_sigkill_mid_batch_loses_no_frame(tmp_path, redis_url, redis_conn, subprocess_env):
    artifact = tiny_artifact(tmp_path / "model", size=160)
    queue = FrameQueue(connection=redis_conn)
    frames = [make_frame(jpeg(seed=i), station="s", seq=i) for i in range(60)]
    jobs = enqueue_frames(queue, frames)
    started = StartedJobRegistry("inference", connection=redis_conn)
    victim = start_worker(redis_url, subprocess_env, "victim", **_slow_worker_settings(artifact))
    rescuer = None
    try:
        in_hand = wait_for(lambda: started.get_job_ids(), timeout=90, interval=0.005, what="a batch in hand")
        stop_worker(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        assert in_hand, "no frame was in hand when the worker died"
        rescuer = start_worker(redis_url, subprocess_env, "rescuer", **_slow_worker_settings(artifact))
        wait_for(lambda: all_done(jobs), timeout=150, what="every frame classified after the kill")
        recovery_s = time.monotonic() - killed_at
        assert statuses(jobs) == [JobStatus.FINISHED] * len(jobs), "a frame was lost or failed"
        rescued = {j.id for j in jobs if j.return_value()["worker"] == "rescuer"}
        assert set(in_hand) <= rescued, "frames in the killed batch were not re-run by another worker"
        print(f"recovered {len(in_hand)} in-hand frames; all done {recovery_s:.1f}s after SIGKILL")
    finally:
        if rescuer is not None:
            stop_worker(rescuer)


def test_sigterm_finishes_the_batch_in_hand(tmp_path, redis_url, redis_conn, subprocess_env):
    artifact = tiny_artifact(tmp_path / "model", size=160)
    queue = FrameQueue(connection=redis_conn)
    jobs = enqueue_frames(queue, [make_frame(jpeg(seed=i), seq=i) for i in range(60)])
    started = StartedJobRegistry("inference", connection=redis_conn)
    proc = start_worker(redis_url, subprocess_env, "w-term", **_slow_worker_settings(artifact))
    in_hand = wait_for(lambda: started.get_job_ids(), timeout=90, interval=0.005, what="a batch in hand")
    out = stop_worker(proc, signal.SIGTERM, timeout=60)
    assert proc.returncode == 0, out
    by_id = {j.id: j for j in jobs}
    assert all(by_id[i].get_status() == JobStatus.FINISHED for i in in_hand), "SIGTERM dropped a claimed frame"
    assert started.count == 0
    assert all(s in (JobStatus.FINISHED, JobStatus.QUEUED) for s in statuses(jobs))
    assert not worker_registered(redis_conn, "w-term")


def test_a_bad_setting_stops_the_worker_naming_it(redis_url, subprocess_env):
    proc = start_worker(redis_url, subprocess_env, "w-cfg", VQ_MAX_BATCH="lots")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "VQ_MAX_BATCH='lots' is not an integer" in out


def test_png_frames_are_classified(tmp_path, redis_url, redis_conn, subprocess_env):
    artifact = tiny_artifact(tmp_path / "model")
    queue = FrameQueue(connection=redis_conn)
    [job] = enqueue_frames(queue, [make_frame(png(), station="png")])
    proc = start_worker(redis_url, subprocess_env, "w-png", VQ_MODEL_PATH=str(artifact))
    try:
        wait_for(lambda: all_done([job]), timeout=90)
        assert job.get_status() == JobStatus.FINISHED
    finally:
        stop_worker(proc)


def test_rq_suspend_holds_an_idle_worker_and_resume_sets_it_going(tmp_path, redis_url, redis_conn, subprocess_env):
    from rq.suspension import resume, suspend

    artifact = tiny_artifact(tmp_path / "model")
    proc = start_worker(redis_url, subprocess_env, "w-suspend", VQ_MODEL_PATH=str(artifact))
    try:
        wait_for(lambda: worker_registered(redis_conn, "w-suspend"), timeout=120, what="the worker registered")
        suspend(redis_conn)
        [me] = [w for w in Worker.all(connection=redis_conn) if w.name == "w-suspend"]
        # idle, it notices without a frame to wake it (RQ's own loop would take the next batch first)
        wait_for(lambda: me.refresh() or me.get_state() == "suspended", timeout=30, what="the worker suspended")
        jobs = enqueue_frames(FrameQueue(connection=redis_conn), [make_frame(jpeg(seed=i), seq=i) for i in range(4)])
        time.sleep(1.5)  # not synchronization: the span in which a worker that ignored the suspension would act
        assert statuses(jobs) == [JobStatus.QUEUED] * 4
        resume(redis_conn)
        wait_for(lambda: all_done(jobs), timeout=60, what="the frames done after rq resume")
        assert statuses(jobs) == [JobStatus.FINISHED] * 4
    finally:
        stop_worker(proc)
