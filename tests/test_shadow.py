"""Shadow before promotion: workers run a candidate beside the served model, count where they disagree,
capture the disagreements for labelling, and never let the candidate touch serving; the gate judges the counts.

Real redis-server, real `rq worker` processes, real tiny torchvision models (issue 12 item 4).
"""

from __future__ import annotations

import json
import socket
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_for
from helpers import CLASSES, jpeg, metric_value, served_by, start_worker, stop_worker
from rq.job import JobStatus

from continual.gate import GateConfig, ShadowEvidence, Verdict, shadow_checks
from continual.shadow import (
    ShadowStats,
    end_shadow,
    labelled_disagreements,
    merge_verdict,
    read_stats,
    report_lines,
    report_section,
    start_shadow,
)
from continual.store import SampleStore
from worker.frames import make_frame
from worker.jobs import FrameQueue, enqueue_frames
from worker.registry import ModelRegistry
from worker.sample_feed import SAMPLES_STREAM
from worker.shadow import SHADOW_KEY, ShadowSpec, read_spec, stats_key

SHIFT = 1  # the candidate names every class the next one: it disagrees on every frame, predictably


def artifact(path: Path, shift: int = 0) -> Path:
    """resnet18 with tiny_artifact's random weights (seed 0); `shift` rolls the head's rows so that the
    candidate's class i is the served model's class i - shift."""
    import torch

    from worker.artifact import write_artifact
    from worker.model import build_model, head_parameters

    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES)).eval()
    if shift:
        with torch.no_grad():
            for param in head_parameters(model):  # the head's weight and bias: one row per class
                param.copy_(torch.roll(param, shift, dims=0))
    write_artifact(path, model, arch="resnet18", class_names=CLASSES, input_size=(32, 32))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finished(jobs: list) -> bool:
    return all(j.get_status() in (JobStatus.FINISHED, JobStatus.FAILED) for j in jobs)


def shadow_samples(conn) -> list[dict]:
    entries = [{k.decode(): v for k, v in fields.items()} for _, fields in conn.xrange(SAMPLES_STREAM)]
    return [e for e in entries if e["strategy"] == b"shadow"]


def test_workers_shadow_a_candidate_and_a_broken_one_never_touches_serving(tmp_path, redis_url, redis_conn,
                                                                           subprocess_env):
    reg = ModelRegistry(redis_conn)
    v1 = reg.publish(artifact(tmp_path / "v1"))
    port = free_port()
    # Capture only what the shadow offers: no uncertainty sampling, no audit share, no dedup.
    proc = start_worker(redis_url, subprocess_env, "w-shadow", VQ_MODEL_CACHE=str(tmp_path / "cache"),
                        VQ_SWAP_POLL_S="0.2", VQ_SHADOW_SHARE="1.0", VQ_METRICS_PORT=str(port),
                        VQ_SAMPLE_THRESHOLD="0.0", VQ_SAMPLE_AUDIT_RATE="0", VQ_SAMPLE_DEDUP_BITS="-1")
    try:
        assert served_by(redis_conn, 0, timeout=120) == v1

        # A good candidate, published unpromoted, announced as the updater does.
        v2 = reg.publish(artifact(tmp_path / "v2", shift=SHIFT), promote=False)
        start_shadow([redis_conn], v2, minutes=10, share=1.0)
        assert read_spec(redis_conn).version == v2
        wait_for(lambda: metric_value(port, 'vq_model_swaps_total{outcome="shadow_started"}') == 1.0, timeout=60,
                 what="the worker to load the shadow candidate")

        queue = FrameQueue(connection=redis_conn)
        jobs = enqueue_frames(queue, [make_frame(jpeg(seed=i), station=f"cam-{i % 2}", seq=i) for i in range(24)])
        wait_for(lambda: finished(jobs), timeout=60, what="the frames")
        assert all(j.get_status() == JobStatus.FINISHED for j in jobs)
        assert {j.return_value()["model_version"] for j in jobs} == {v1}  # the candidate served nothing

        # Every frame is shadowed or counted as skipped (the shadow thread was busy): nothing unaccounted.
        def accounted() -> ShadowStats | None:
            stats = read_stats([redis_conn], v2)
            return stats if stats.frames + stats.skipped == len(jobs) else None

        stats = wait_for(accounted, timeout=60, what="the shadow counts")
        assert stats.frames > 0 and stats.refused == 0 and stats.failed == 0
        assert sum(stats.pairs.values()) == stats.frames
        assert sum(c["frames"] for c in stats.stations.values()) == stats.frames
        assert sum(c["disagree"] for c in stats.stations.values()) == stats.disagree
        assert stats.disagree == sum(n for (cur, cand), n in stats.pairs.items() if cur != cand)
        # The rolled head: the candidate says the class after the served one, on every frame.
        for cur, cand in stats.pairs:
            assert CLASSES.index(cand) == (CLASSES.index(cur) + SHIFT) % len(CLASSES)
        assert stats.disagree == stats.frames
        ids = {j.id for j in jobs}
        assert len(stats.disagreements) == stats.disagree
        assert {d["frame_id"] for d in stats.disagreements} <= ids
        assert all(d["serving"] == v1 for d in stats.disagreements)

        # The disagreements were offered for capture, stamped with what the candidate said.
        captured = wait_for(lambda: len(s := shadow_samples(redis_conn)) == stats.disagree and s, timeout=30,
                            what="the disagreement frames on the sample stream")
        for sample in captured:
            assert sample["model_version"].decode() == v1
            assert json.loads(sample["meta"])["shadow"]["version"] == v2

        # The gate on these counts: every frame disagrees, far over 20 %.
        checks, reasons = shadow_checks(ShadowEvidence(stats.frames, stats.disagree), GateConfig(min_shadow_frames=1))
        assert not checks["shadow_disagreement"]["ok"] and reasons

        # A broken candidate (its weights corrupted in Redis): refused by the worker, counted, serving goes on.
        v3 = reg.publish(artifact(tmp_path / "v3"), promote=False)
        redis_conn.set(f"vq:models:v:{v3}:float", zlib.compress(b"not the weights"))
        start_shadow([redis_conn], v3, minutes=10, share=1.0)
        wait_for(lambda: read_stats([redis_conn], v3).refused == 1, timeout=60, what="the refusal to be counted")
        assert metric_value(port, 'vq_model_swaps_total{outcome="shadow_refused"}') == 1.0
        more = enqueue_frames(queue, [make_frame(jpeg(seed=i), station="cam-0", seq=100 + i) for i in range(8)])
        wait_for(lambda: finished(more), timeout=60, what="frames after the refusal")
        assert all(j.get_status() == JobStatus.FINISHED for j in more)
        assert {j.return_value()["model_version"] for j in more} == {v1}
        assert read_stats([redis_conn], v3).frames == 0
        before = read_stats([redis_conn], v2).frames
        assert before == stats.frames  # the earlier shadow ended when the pointer moved on

        end_shadow([redis_conn], v3)
        assert redis_conn.get(SHADOW_KEY) is None
    finally:
        stop_worker(proc)


def test_a_shadow_that_raises_is_dropped_and_counted(tmp_path, redis_conn):
    """In process: a candidate whose forward pass raises ends its shadow; nothing propagates."""
    import torch

    from worker.artifact import load_for_serving
    from worker.metrics import WorkerMetrics
    from worker.runtime import InferenceEngine
    from worker.shadow import ShadowRunner, ShadowWork

    served = InferenceEngine(load_for_serving(artifact(tmp_path / "a")))
    candidate = InferenceEngine(load_for_serving(artifact(tmp_path / "b", shift=1)))
    candidate.model = torch.nn.Linear(7, 4)  # a real torch failure: the shapes do not fit
    metrics = WorkerMetrics()
    runner = ShadowRunner(redis_conn, metrics, max_share=1.0)
    runner.start()
    try:
        spec = ShadowSpec(candidate.version, time.time() + 600, 1.0)
        assert runner.install(spec, candidate, served.input_size)
        assert runner.wants(served.version) and not runner.wants(candidate.version)
        images = [np.zeros((32, 32, 3), np.uint8)] * 3
        frames = [{"id": f"f{i}", "station": "cam"} for i in range(3)]
        runner.submit(ShadowWork(served.version, frames, images, served.predictions(served.forward(images)),
                                 served.class_names))
        wait_for(lambda: runner.version is None, timeout=30, what="the shadow to be dropped")
        assert candidate.version in runner.refused and not runner.wanted(spec, served.version)
        wait_for(lambda: redis_conn.hget(stats_key(candidate.version), "failed") == b"1", timeout=30)
        assert redis_conn.hget(stats_key(candidate.version), "frames") is None
    finally:
        runner.stop()
        served.close()


def test_shadow_spec_is_data_checked():
    good = ShadowSpec("20260101T000000Z-abcdef", time.time() + 60, 0.5)
    assert ShadowSpec.parse(good.to_json()) == good and good.live()
    for bad in (None, b"", b"{", b"[]", json.dumps({"version": "../../etc", "until": 1, "share": 0.5}),
                json.dumps({"version": good.version, "until": "soon", "share": 0.5}),
                json.dumps({"version": good.version, "until": 1e12, "share": 2}), b"x" * 5000):
        assert ShadowSpec.parse(bad) is None


def test_gate_shadow_checks_pass_and_fail_on_given_stats():
    config = GateConfig(max_shadow_disagreement=0.2, min_shadow_frames=20)
    checks, reasons = shadow_checks(ShadowEvidence(frames=100, disagree=15), config)
    assert reasons == [] and checks["shadow_disagreement"] == {"ok": True, "frames": 100, "disagree": 15,
                                                               "rate": 0.15, "max": 0.2}
    assert checks["shadow_labelled"]["ok"] and "no disagreement frame was labelled" in \
        checks["shadow_labelled"]["skipped"]

    _, reasons = shadow_checks(ShadowEvidence(frames=100, disagree=21), config)
    assert any("21.0% of live frames" in r for r in reasons)
    _, reasons = shadow_checks(ShadowEvidence(frames=5, disagree=0), config)
    assert any("5 live frames shadowed; at least 20" in r for r in reasons)
    _, reasons = shadow_checks(ShadowEvidence(frames=100, disagree=0, refused=1, failed=1), config)
    assert any("refused by 1 and failed on 1" in r for r in reasons)

    wins = (("dent", "ok", "dent"), ("dent", "ok", "dent"), ("ok", "ok", "scratch"))
    checks, reasons = shadow_checks(ShadowEvidence(100, 10, labelled=wins), config)
    assert reasons == [] and checks["shadow_labelled"] == {"ok": True, "n": 3, "candidate_correct": 2,
                                                           "current_correct": 1}
    loses = (("ok", "ok", "dent"), ("ok", "ok", "scratch"), ("dent", "ok", "dent"))
    checks, reasons = shadow_checks(ShadowEvidence(100, 10, labelled=loses), config)
    assert not checks["shadow_labelled"]["ok"] and "right 1 times, the current model 2" in reasons[0]

    # Merged with the offline verdict: promoted only when both agree.
    offline = Verdict(True, ["all checks passed"], {"new_holdout": {"ok": True}})
    assert merge_verdict(offline, checks, reasons).promote is False
    ok_checks, _ = shadow_checks(ShadowEvidence(100, 10, labelled=wins), config)
    merged = merge_verdict(offline, ok_checks, [])
    assert merged.promote and merged.reasons == ["all checks passed"] and "shadow_disagreement" in merged.checks


def test_labelled_disagreements_come_from_the_store_and_the_report_shows_them(tmp_path, redis_conn):
    version = "20260101T000000Z-abcdef"
    key = stats_key(version)
    redis_conn.hset(key, mapping={"frames": 10, "disagree": 3, "frames:cam-0": 10, "disagree:cam-0": 3,
                                  "skipped": 2, "bogus": 7})
    redis_conn.hset(f"{key}:pairs", mapping={json.dumps(["ok", "ok"]): 7, json.dumps(["ok", "dent"]): 3,
                                             "not json": 1})
    entries = [{"frame_id": f"f{i}", "station": "cam-0", "current": "ok", "candidate": "dent"} for i in range(3)]
    redis_conn.lpush(f"{key}:frames", *(json.dumps(e) for e in entries), "garbage")
    stats = read_stats([redis_conn], version)
    assert (stats.frames, stats.disagree, stats.skipped) == (10, 3, 2)
    assert stats.stations == {"cam-0": {"frames": 10, "disagree": 3}}
    assert stats.pairs == {("ok", "ok"): 7, ("ok", "dent"): 3} and len(stats.disagreements) == 3

    with SampleStore(tmp_path / "store") as store:
        store.add([{"frame_id": f"f{i}", "sha256": f"{i:064x}", "ext": "jpg", "station": "cam-0", "ts": 0.0}
                   for i in range(3)])
        assert labelled_disagreements(stats, store) == []  # captured, not labelled yet
        store.set_labels({"f0": "dent", "f1": "dent"}, source="test")
        labelled = labelled_disagreements(stats, store)
    assert sorted(labelled) == [("dent", "ok", "dent")] * 2
    checks, reasons = shadow_checks(ShadowEvidence(stats.frames, stats.disagree, labelled=tuple(labelled)),
                                    GateConfig(max_shadow_disagreement=0.5, min_shadow_frames=10))
    assert not reasons
    section = report_section(ShadowSpec(version, 0.0, 1.0), stats, checks)
    text = "\n".join(report_lines(section))
    assert "10 frames shadowed, 3 disagreements (30.0%)" in text and "| ok → dent | 3 |" in text
    assert "the candidate was right on 2, the current model on 0" in text


@pytest.mark.parametrize("role", ["worker", "updater"])
def test_acl_gives_each_role_its_shadow_keys(tmp_path, monkeypatch, role):
    """deploy/redis/users.acl: workers write the counts and only read the pointer; the updater the reverse."""
    from redis.exceptions import NoPermissionError
    from test_redis_acl import AclRedis, redis_server_7, render_acl

    from worker import redis_server
    from worker.redis_server import RedisServer

    binary = redis_server_7()
    if binary is None:
        pytest.skip("needs redis-server 7 or later on PATH")
    monkeypatch.setattr(redis_server, "redis_server_binary", lambda: binary)
    secrets_dir, acl = render_acl(tmp_path)
    version = "20260101T000000Z-abcdef"
    with RedisServer(extra_args=("--aclfile", str(acl))) as server:
        acl_redis = AclRedis(server, secrets_dir)
        with acl_redis.conn(role) as conn:
            if role == "updater":
                start_shadow([conn], version, minutes=1, share=0.5)
                assert read_stats([conn], version).frames == 0
                with pytest.raises(NoPermissionError):
                    conn.hincrby(stats_key(version), "frames", 1)  # the counts are the workers' to write
                end_shadow([conn], version)
            else:
                assert read_spec(conn) is None
                with conn.pipeline(transaction=False) as pipe:
                    pipe.hincrby(stats_key(version), "frames", 1)
                    pipe.lpush(f"{stats_key(version)}:frames", "{}")
                    pipe.ltrim(f"{stats_key(version)}:frames", 0, 9)
                    pipe.expire(stats_key(version), 60)
                    pipe.execute()
                with pytest.raises(NoPermissionError):
                    conn.set(SHADOW_KEY, ShadowSpec(version, time.time() + 60, 1.0).to_json())


def test_the_updaters_shadow_step_publishes_unpromoted_waits_and_judges(tmp_path, redis_conn):
    """No worker is running: the window passes with nothing shadowed, so the candidate is not promoted,
    stays in the registry unpromoted, and the pointer is gone afterwards."""
    from continual.shadow import shadow_step

    reg = ModelRegistry(redis_conn)
    v1 = reg.publish(artifact(tmp_path / "v1"))
    offline = Verdict(True, ["all checks passed"], {"new_holdout": {"ok": True}})
    with SampleStore(tmp_path / "store") as store:
        verdict, section = shadow_step(redis_conn, reg, store, artifact(tmp_path / "cand", shift=1), offline,
                                       GateConfig(min_shadow_frames=1), minutes=0.01, share=0.5)
    assert not verdict.promote and any("0 live frames shadowed" in r for r in verdict.reasons)
    assert verdict.checks["new_holdout"] == {"ok": True} and "shadow_disagreement" in verdict.checks
    assert section["version"] in reg.versions() and reg.current() == v1
    assert section["share"] == 0.5 and section["frames"] == 0
    assert redis_conn.get(SHADOW_KEY) is None


def test_the_whole_shadow_run_with_a_live_worker_promotes_a_candidate_that_agrees(tmp_path, redis_url, redis_conn,
                                                                                  subprocess_env):
    """The updater's step and a real worker together: frames flow while the window is open, the worker
    shadows them, the updater reads the counts; a candidate with the served weights never disagrees."""
    import threading

    from continual.shadow import shadow_step

    reg = ModelRegistry(redis_conn)
    v1 = reg.publish(artifact(tmp_path / "v1"))
    proc = start_worker(redis_url, subprocess_env, "w-shadow-e2e", VQ_MODEL_CACHE=str(tmp_path / "cache"),
                        VQ_SWAP_POLL_S="0.2", VQ_SHADOW_SHARE="1.0")
    outcome: dict = {}
    try:
        assert served_by(redis_conn, 0, timeout=120) == v1
        offline = Verdict(True, ["all checks passed"], {"new_holdout": {"ok": True}})
        candidate = artifact(tmp_path / "cand")

        def updater() -> None:
            with SampleStore(tmp_path / "store") as store:  # SQLite: opened by the thread that uses it
                outcome["result"] = shadow_step(redis_conn, reg, store, candidate, offline,
                                                GateConfig(min_shadow_frames=5), minutes=0.4, share=1.0)

        thread = threading.Thread(target=updater)
        thread.start()
        queue, jobs, seq = FrameQueue(connection=redis_conn), [], 0
        while thread.is_alive():  # live traffic for as long as the window is open
            jobs += enqueue_frames(queue, [make_frame(jpeg(seed=seq), station="cam-0", seq=seq)])
            seq += 1
            thread.join(timeout=0.2)
        wait_for(lambda: finished(jobs), timeout=60, what="the frames")
    finally:
        stop_worker(proc)
    verdict, section = outcome["result"]
    assert {j.return_value()["model_version"] for j in jobs} == {v1}  # the candidate served nothing
    assert section["frames"] >= 5 and section["disagree"] == 0, section
    assert verdict.promote and verdict.checks["shadow_disagreement"]["ok"], verdict.reasons
    assert redis_conn.get(SHADOW_KEY) is None and reg.current() == v1  # promoting is the caller's step
