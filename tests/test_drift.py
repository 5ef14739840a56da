"""Drift detection: the statistics, the workers' histograms in Redis, the alarm, and the nudge."""

from __future__ import annotations

import time

import numpy as np
from conftest import wait_for
from helpers import CLASSES, jpeg, rewrite_manifest, start_worker, stop_worker, tiny_artifact

from continual import drift
from worker.artifact import read_manifest
from worker.drift_stats import BINS, DriftStats, stations_key, window_key
from worker.frames import make_frame
from worker.jobs import FrameQueue, enqueue_frames
from worker.metrics import WorkerMetrics
from worker.runtime import Prediction
from worker.sample_feed import SAMPLES_STREAM, SampleFeed, SamplingConfig


def _hist(values: np.ndarray) -> np.ndarray:
    return np.bincount(np.minimum(BINS - 1, (values * BINS).astype(int)), minlength=BINS).astype(float)


def test_psi_and_ks_agree_on_what_is_the_same_and_what_shifted():
    rng = np.random.default_rng(0)
    day = _hist(rng.beta(8, 1.5, 4000))
    same = _hist(rng.beta(8, 1.5, 600))
    night = _hist(rng.beta(2, 2, 600))  # a model unsure of itself
    assert drift.psi(day, same) < drift.PSI_MODERATE and drift.ks_binned(day, same)[1] > 0.05
    assert drift.psi(day, night) > drift.PSI_SIGNIFICANT and drift.ks_binned(day, night)[1] < 1e-6
    assert drift.band(0.05) == "stable" and drift.band(0.2) == "moderate" and drift.band(0.3) == "significant"


def test_no_alarm_below_the_minimum_or_by_chance_at_the_stated_rate():
    rng = np.random.default_rng(1)
    reference = {"confidence": _hist(rng.beta(8, 1.5, 5000)).tolist(), "classes": [100, 50, 50, 50]}
    few = drift.compare("s", "v", reference, _hist(rng.beta(2, 2, 50)), np.array([10, 10, 10, 20]))
    assert few.band == "significant" and not few.alarm  # 50 frames: too few to say
    # Same distribution, 200 windows: alarms at most about alpha of the time.
    alarms = sum(drift.compare("s", "v", reference, _hist(rng.beta(8, 1.5, 300)), np.array([120, 60, 60, 60])).alarm
                 for _ in range(200))
    assert alarms <= 4


def test_the_reference_is_the_histogram_of_calibrated_confidence_and_classes():
    probs = np.array([[0.9, 0.1, 0, 0], [0.2, 0.7, 0.1, 0], [0.5, 0.5, 0, 0]])
    ref = drift.reference_from_probs(probs)
    assert ref["n"] == 3 and sum(ref["confidence"]) == 3 and ref["classes"] == [2, 1, 0, 0]
    assert ref["confidence"][18] == 1 and ref["confidence"][14] == 1 and ref["confidence"][10] == 1


def test_workers_keep_histograms_and_the_monitor_alarms_only_on_the_shifted_station(tmp_path, redis_url, redis_conn,
                                                                                    subprocess_env):
    artifact = tiny_artifact(tmp_path / "model")
    proc = start_worker(redis_url, subprocess_env, "w-drift", VQ_MODEL_PATH=str(artifact),
                        VQ_SAMPLE_STRATEGY="none", VQ_SAMPLE_AUDIT_RATE="0")
    queue = FrameQueue(connection=redis_conn)
    try:
        enqueue_frames(queue, [make_frame(jpeg(seed=i % 7), station=s, seq=i) for i in range(60)
                               for s in ("line-1", "line-2")])
        version = read_manifest(artifact)["version"]
        wait_for(lambda: redis_conn.scard(stations_key(version)) == 2 and sum(
            int(v) for s in ("line-1", "line-2") for k, v in _window(redis_conn, version, s).items()
            if k.startswith(b"c")) == 120, timeout=120, what="both stations' 60 frames in the histograms")
    finally:
        stop_worker(proc)
    manifest = read_manifest(artifact)
    counts = drift.read_window(redis_conn, version, ["line-1", "line-2"], 2, len(CLASSES))
    conf, classes = counts["line-1"]
    assert conf.sum() == 60 and classes.sum() == 60
    # The reference says what line-1 does now; line-2's frames are the same, so neither drifted ...
    manifest["drift_reference"] = {"confidence": (conf * 10).tolist(), "classes": (classes * 10).tolist()}
    rows = {r.station: r for r in drift.check(redis_conn, manifest, 2, min_frames=50)}
    assert not rows["line-1"].alarm and not rows["line-2"].alarm and rows["line-1"].psi < drift.PSI_MODERATE
    # ... and against a reference where the model was sure of everything, both did.
    sure = np.zeros(BINS)
    sure[-1] = 600
    manifest["drift_reference"] = {"confidence": sure.tolist(), "classes": (classes * 10).tolist()}
    rows = {r.station: r for r in drift.check(redis_conn, manifest, 2, min_frames=50)}
    assert rows["line-1"].alarm and rows["line-1"].band == "significant"
    rewrite_manifest(artifact, lambda m: m.pop("drift_reference", None))


def _window(conn, version: str, station: str) -> dict:
    minute = int(time.time() // 60)
    out: dict = {}
    for m in (minute - 1, minute):
        for k, v in conn.hgetall(window_key(version, station, m)).items():
            out[k] = out.get(k, 0) + int(v)
    return out


def test_drift_stats_write_one_pipeline_per_batch(redis_conn):
    stats = DriftStats("v1")
    stats.add("a", 0.97, 1)
    stats.add("a", 0.42, 0)
    stats.add("b", 0.5, 2)
    with redis_conn.pipeline(transaction=False) as pipe:
        stats.write(pipe, now=600.0)
        pipe.execute()
    assert redis_conn.hgetall(window_key("v1", "a", 10)) == {b"c19": b"1", b"k1": b"1", b"c8": b"1", b"k0": b"1"}
    assert redis_conn.smembers(stations_key("v1")) == {b"a", b"b"}
    assert redis_conn.ttl(window_key("v1", "b", 10)) > 0


def test_a_nudge_raises_the_capture_quota_of_that_station_only(redis_conn):
    drift.nudge(redis_conn, "night-line", 3.0, 10)
    redis_conn.hset(drift.BOOST_KEY, "planted", "not:a:number")
    feed = SampleFeed(redis_conn, WorkerMetrics(), SamplingConfig(per_minute=2, audit_rate=0.0, dedup_bits=-1))
    rng = np.random.default_rng(3)
    feed.start()
    for i in range(8):
        for station in ("night-line", "day-line"):
            image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            pred = Prediction(0, "ok", 0.3, [], np.array([0.3, 0.3, 0.2, 0.2]))
            feed.offer(make_frame(jpeg(seed=i), station=station, seq=i), pred, image, "v1", CLASSES)
    feed.stop()
    stations = [f[b"station"] for _, f in redis_conn.xrange(SAMPLES_STREAM)]
    # The fleet's 2 a minute went to whichever came first; the nudged station got up to 2 x (3 - 1) more.
    assert stations.count(b"day-line") <= 2 and stations.count(b"night-line") >= 4
    assert len(stations) <= 2 + 4


def test_an_alarm_needs_confirm_checks_in_a_row_and_one_quiet_check_clears_it() -> None:
    from continual.drift import Alarms, StationDrift

    def row(station: str, alarm: bool) -> StationDrift:
        return StationDrift(station, "v1", 300, 0.3 if alarm else 0.01, 0.1, 0.001, 0.0,
                            "significant" if alarm else "stable", alarm)

    alarms = Alarms(confirm=2)
    assert alarms.update([row("a", True), row("b", False)]) == ([], [])  # one noisy window: not yet
    assert alarms.update([row("a", False)]) == ([], [])  # the streak is broken
    assert alarms.update([row("a", True)]) == ([], [])
    new, cleared = alarms.update([row("a", True), row("b", True)])
    assert [r.station for r in new] == ["a"] and cleared == [] and alarms.raised == {"a"}
    assert alarms.update([row("a", True)]) == ([], [])  # raised once, not again
    new, cleared = alarms.update([row("a", False), row("b", True)])
    assert [r.station for r in new] == ["b"] and [r.station for r in cleared] == ["a"]
    assert alarms.raised == {"b"}
    assert [r.station for r in Alarms(confirm=1).update([row("c", True)])[0]] == ["c"]


def test_a_check_that_could_not_run_is_not_an_alarm(redis_url, capsys):
    from worker.redis_server import free_port

    assert drift.main(["--redis-url", f"redis://127.0.0.1:{free_port()}/0"]) == drift.EXIT_NOT_RUN
    assert drift.main(["--redis-url", redis_url, "--version", "no-such-version"]) == drift.EXIT_NOT_RUN
    err = capsys.readouterr().err
    assert err.count("error: the drift check could not run") == 2 and "Traceback" not in err
