"""Sample store, ingest from the stream (crash-safe), review export/import."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
from conftest import wait_for
from helpers import CLASSES, ROOT, jpeg

from continual.ingest import GROUP, ensure_group, ingest
from continual.review import export_folders, export_labelstudio, import_labels
from continual.store import SampleStore, split_for
from worker.frames import make_frame
from worker.sample_feed import SAMPLES_STREAM, Candidate, SampleFeed


def push_samples(conn, n, station="cam", start=0):
    frames = []
    with conn.pipeline(transaction=False) as pipe:
        for i in range(start, start + n):
            frame = make_frame(jpeg(32, 24, seed=i), station=station, seq=i, meta={"truth": CLASSES[i % 4]})
            cand = Candidate(frame, "ok", 0.4, [0.4, 0.3, 0.2, 0.1], "v1", CLASSES, "least_confidence", 0.6,
                             np.zeros((8, 8, 3), np.uint8))
            pipe.xadd(SAMPLES_STREAM, SampleFeed._fields(cand, 0.0))
            frames.append(frame)
        pipe.execute()
    return frames


def test_ingest_is_idempotent_and_acknowledges_only_stored(tmp_path, redis_conn):
    frames = push_samples(redis_conn, 30)
    with SampleStore(tmp_path / "store") as store:
        counts = ingest(redis_conn, store)
        assert counts == {"added": 30, "acked": 30, "bad": 0, "deleted": 0}
        assert redis_conn.xlen(SAMPLES_STREAM) == 0
        assert ingest(redis_conn, store)["added"] == 0
        rows = {s.frame_id: s for s in store.samples()}
        assert set(rows) == {f["id"] for f in frames}
        for f in frames:
            s = rows[f["id"]]
            assert s.path.read_bytes() == f["image"]
            assert s.meta["truth"] == f["meta"]["truth"]
            assert s.split == split_for(s.sha256)
            assert s.predicted == "ok" and s.model_version == "v1"


def test_entries_a_dead_ingester_read_are_not_lost(tmp_path, redis_conn):
    push_samples(redis_conn, 10)
    ensure_group(redis_conn)
    # A crashed ingester read five entries and died before storing or acknowledging them.
    redis_conn.xreadgroup(GROUP, "dead-one", {SAMPLES_STREAM: ">"}, count=5)
    with SampleStore(tmp_path / "store") as store:
        assert ingest(redis_conn, store)["added"] == 10
        assert store.count() == 10
    assert redis_conn.xpending(SAMPLES_STREAM, GROUP)["pending"] == 0


def test_sigkill_mid_ingest_then_rerun_loses_and_duplicates_nothing(tmp_path, redis_url, redis_conn,
                                                                   subprocess_env):
    n = 3000
    frames = push_samples(redis_conn, n)
    store_dir = tmp_path / "store"
    cmd = [sys.executable, "-m", "continual.ingest", "--redis-url", redis_url, "--store", str(store_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = SampleStore(store_dir)
    wait_for(lambda: probe.count() > 0 or proc.poll() is not None, timeout=60, interval=0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = probe.count()
    probe.close()
    assert partial < n, "ingest finished before it could be killed; raise n"
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with SampleStore(store_dir) as store:
        assert store.count() == n
        assert store.db.execute("SELECT COUNT(DISTINCT frame_id) FROM samples").fetchone()[0] == n
        assert all(s.path.exists() for s in store.samples())
        assert {s.frame_id for s in store.samples()} == {f["id"] for f in frames}
    assert redis_conn.xlen(SAMPLES_STREAM) == 0
    print(f"killed after {partial}/{n} rows; rerun completed the rest")


def test_review_folders_round_trip_accepts_a_new_class(tmp_path, redis_conn):
    push_samples(redis_conn, 8)
    with SampleStore(tmp_path / "store") as store:
        ingest(redis_conn, store)
        out = tmp_path / "review"
        assert export_folders(store.unlabeled(), out, CLASSES) == 8
        pending = sorted((out / "_unlabeled").iterdir())
        (out / "crack").mkdir()  # a defect type the model has never seen
        for i, f in enumerate(pending[:6]):
            f.rename(out / ("crack" if i == 0 else CLASSES[i % 4]) / f.name)
        report = import_labels(store, out)
        assert report["updated"] == 6 and "crack" in report["classes"]
        assert len(store.unlabeled()) == 2
        assert {s.label for s in store.labelled()} >= {"crack"}
        assert {s.label_source for s in store.labelled()} == {"review"}


def test_review_labelstudio_round_trip(tmp_path, redis_conn):
    push_samples(redis_conn, 3)
    with SampleStore(tmp_path / "store") as store:
        ingest(redis_conn, store)
        out = tmp_path / "ls"
        export_labelstudio(store.unlabeled(), out, CLASSES)
        tasks = json.loads((out / "tasks.json").read_text())
        assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == ["ok"]
        assert '<Choice value="stain"/>' in (out / "labeling_config.xml").read_text()
        # What Label Studio exports once a person has annotated the tasks.
        for t in tasks:
            t["annotations"] = [{"result": [{"value": {"choices": ["dent"]}}]}]
        export = out / "export.json"
        export.write_text(json.dumps(tasks))
        assert import_labels(store, export)["updated"] == 3
        assert {s.label for s in store.labelled()} == {"dent"}
