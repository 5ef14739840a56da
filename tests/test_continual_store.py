"""Sample store, ingest from the stream (crash-safe), review export/import."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys

import numpy as np
from conftest import wait_for
from helpers import CLASSES, ROOT, jpeg

from continual import review
from continual.ingest import GROUP, ensure_group, ingest
from continual.review import export_folders, export_labelstudio, import_labels
from continual.store import SCHEMA, Doubt, SampleStore, split_for
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
        assert {s.label_source for s in store.labelled()} == {f"review import {out.resolve()}"}


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


# -- named queries, label history, schema migration, import conflicts ------------------------------

def add_rows(store: SampleStore, n: int, split: str | None = None) -> list[str]:
    """n stored samples without Redis; their frame ids."""
    rows = [{"frame_id": f"f{i}", "sha256": store.put_image(jpeg(16, 16, seed=i), "jpg"), "ext": "jpg",
             "station": "cam", "ts": float(i), "classes": json.dumps(CLASSES), "split": split}
            for i in range(n)]
    store.add(rows)
    return [r["frame_id"] for r in rows]


def test_named_queries_cover_what_the_loop_asks(tmp_path):
    with SampleStore(tmp_path / "store") as store:
        train = add_rows(store, 6, split="train")
        store.add([{"frame_id": "h0", "sha256": store.put_image(jpeg(16, 16, seed=99), "jpg"), "ext": "jpg",
                    "station": "cam", "ts": 99.0, "split": "holdout"}])
        assert store.count() == 7 and len(store.unlabeled()) == 7 and store.count_labelled() == 0
        store.set_labels({"f0": "ok", "f1": "dent", "f2": "dent", "h0": "ok", "missing": "ok"}, "alice")
        assert [s.frame_id for s in store.new_labels()] == ["f0", "f1", "f2", "h0"]
        assert store.count_new_labels() == 4 and store.count_new_labels("dent") == 2
        assert [s.frame_id for s in store.holdout()] == ["h0"]
        store.mark_used(["f0", "f1", "h0"], "v2")
        assert {s.frame_id for s in store.used_in("v2")} == {"f0", "f1", "h0"}
        assert store.get("f0").used_in == "v2"
        assert [s.frame_id for s in store.used_labels("train")] == ["f0", "f1"]
        assert [s.frame_id for s in store.used_labels("holdout")] == ["h0"]
        assert [s.frame_id for s in store.new_labels()] == ["f2"]
        assert store.latest_classes() == CLASSES
        # An open doubt holds a label out of the new ones; a person's label settles it.
        store.set_labels({"f3": "stain", "f4": "stain"}, "alice")
        store.mark_doubtful([Doubt("f3", "stain", "ok", 0.1, "run1"), Doubt("f4", "stain", "ok", 0.2, "run1")])
        assert {s.frame_id for s in store.doubtful()} == {"f3", "f4"}
        assert store.count_new_labels() == 1
        store.set_labels({"f3": "stain", "f4": "ok"}, "bob")  # f3 confirmed, f4 corrected
        assert store.doubts() == [] and store.confirmed_after_doubt() == {"f3"}
        assert store.count_new_labels() == 3
        # A value that looks like SQL is only ever a bound parameter.
        assert store.count_new_labels("x' OR '1'='1") == 0 and store.used_in("v2' OR 1=1 --") == []
        assert len(train) == 6


def test_label_history_records_who_when_and_what_before(tmp_path):
    with SampleStore(tmp_path / "store") as store:
        add_rows(store, 2)
        store.set_labels({"f0": "ok"}, "review import /tmp/a")
        store.set_labels({"f0": "dent"}, "simulated-reviewer")
        store.set_labels({"f0": "scratch"}, "fewshot")
        history = store.label_history("f0")
        assert [(h.label, h.previous, h.source) for h in history] == [
            ("ok", None, "review import /tmp/a"), ("dent", "ok", "simulated-reviewer"),
            ("scratch", "dent", "fewshot")]
        assert history[0].at <= history[1].at <= history[2].at
        assert store.label_history("f1") == []
        assert store.get("f0").label == "scratch" and store.get("f0").label_source == "fewshot"


def test_an_old_schema_store_is_migrated_in_place(tmp_path):
    """A store written before the history existed (schema 0: the samples table only) opens, keeps its
    rows, and gets one history entry per existing label, from its recorded source."""
    root = tmp_path / "store"
    (root / "images").mkdir(parents=True)
    db = sqlite3.connect(root / "index.sqlite")
    db.executescript(SCHEMA)
    db.execute("INSERT INTO samples (frame_id, sha256, ext, station, ts, ingested_at, split, label, label_source, "
               "labelled_at, used_in) VALUES ('old', 'ab', 'jpg', 'cam', 1, 2, 'train', 'dent', 'review', 3, 'v1')")
    db.execute("INSERT INTO samples (frame_id, sha256, ext, station, ts, ingested_at, split) "
               "VALUES ('raw', 'cd', 'jpg', 'cam', 2, 2, 'train')")
    db.commit()
    db.close()
    with SampleStore(root) as store:
        assert store.count() == 2 and store.get("old").label == "dent"
        assert [(h.label, h.previous, h.source, h.at) for h in store.label_history("old")] == [
            ("dent", None, "review", 3.0)]
        assert store.used_in("v1")[0].frame_id == "old"
        store.set_labels({"raw": "ok"}, "alice")
    with SampleStore(root) as store:  # a second open migrates nothing again
        assert len(store.label_history("old")) == 1 and len(store.label_history("raw")) == 1
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == 1


def test_import_reports_conflicts_instead_of_letting_the_last_win(tmp_path, capsys):
    with SampleStore(tmp_path / "store") as store:
        add_rows(store, 4)
        store.set_labels({"f2": "ok"}, "alice")
        store.mark_used(["f2"], "v7")
    out = tmp_path / "review"
    for name in ("ok", "dent"):
        (out / name).mkdir(parents=True)
    for fid, folders in {"f0": ["ok", "dent"], "f1": ["dent"], "f2": ["dent"], "f3": ["ok"]}.items():
        for folder in folders:
            (out / folder / f"{fid}.jpg").write_bytes(jpeg(16, 16, seed=0))
    code = review.main(["--store", str(tmp_path / "store"), "import", str(out), "--source-name", "carol"])
    assert code == review.EXIT_CONFLICTS
    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert printed["updated"] == 2 and printed["conflicts"] == 2
    assert "f0 in several folders: dent, ok" in captured.err and "already used by v7" in captured.err
    report = json.loads((out / "_conflicts.json").read_text())
    assert {(c["frame_id"], c["kind"]) for c in report["conflicts"]} == {("f0", "several_labels"),
                                                                        ("f2", "used_in_training")}
    with SampleStore(tmp_path / "store") as store:
        assert store.get("f0").label is None  # conflicting frames are not labelled
        assert store.get("f2").label == "ok" and len(store.label_history("f2")) == 1
        assert store.get("f1").label == "dent" and store.label_history("f1")[0].source == "carol"
    # Resolved (f0 in one folder, f2 left alone): a clean import, exit 0, the stale report removed.
    (out / "dent" / "f0.jpg").unlink()
    (out / "dent" / "f2.jpg").unlink()
    assert review.main(["--store", str(tmp_path / "store"), "import", str(out)]) == 0
    assert not (out / "_conflicts.json").exists()
    with SampleStore(tmp_path / "store") as store:  # f1, f3 re-imported unchanged: no new history
        assert store.get("f0").label == "ok" and len(store.label_history("f1")) == 1


def test_labelstudio_tasks_disagreeing_on_a_frame_are_a_conflict(tmp_path):
    with SampleStore(tmp_path / "store") as store:
        add_rows(store, 2)
        tasks = [{"data": {"frame_id": fid}, "annotations": [{"result": [{"value": {"choices": [lab]}}]}]}
                 for fid, lab in (("f0", "ok"), ("f0", "dent"), ("f1", "stain"))]
        export = tmp_path / "export.json"
        export.write_text(json.dumps(tasks))
        result = import_labels(store, export)
        assert result["updated"] == 1 and result["conflicts"] == 1
        assert (tmp_path / "export.conflicts.json").exists()
        assert store.get("f0").label is None and store.get("f1").label == "stain"


# -- what a new user may feed the loop ------------------------------------------------------------

def test_labels_that_cannot_name_a_class_are_refused_at_import(tmp_path, capsys):
    with SampleStore(tmp_path / "store") as store:
        add_rows(store, 6)
        bad = ["", " ok ", "x" * 150, "_unlabeled", "../x"]
        rows = [{"frame_id": f"f{i}", "label": lab} for i, lab in enumerate(bad)]
        rows.append({"frame_id": "f5", "label": {"choices": [7]}})  # JSON_MIN, a number chosen
        export = tmp_path / "min.json"
        export.write_text(json.dumps(rows))
        code = review.main(["--store", str(tmp_path / "store"), "import", str(export)])
        assert code == review.EXIT_CONFLICTS
        assert all(store.get(f"f{i}").label is None for i in range(6))
        err = capsys.readouterr().err
        assert err.count("must be printable") == 5 and "is not text" in err


def test_a_file_that_is_not_a_label_studio_export_is_named_in_one_line(tmp_path, capsys):
    store_dir = str(tmp_path / "store")
    with SampleStore(store_dir) as store:
        add_rows(store, 1)
    for name, text in (("obj.json", '{"a": 1}'), ("cut.json", '[{"data": '), ("empty.json", ""),
                       ("scalars.json", '[1, "x", null]'), ("labels.csv", "f0,ok\n"),
                       ("shape.json", '[{"annotations": [{"result": [5]}]}]')):
        (tmp_path / name).write_text(text)
        assert review.main(["--store", store_dir, "import", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / name}") and "Traceback" not in err, err
    # A byte order mark, as a Windows editor saves it, is read as Label Studio's export.
    (tmp_path / "bom.json").write_text('[{"frame_id": "f0", "label": "ok"}]', encoding="utf-8-sig")
    assert review.main(["--store", store_dir, "import", str(tmp_path / "bom.json")]) == 0


def test_ingest_counts_an_entry_with_a_bad_id_or_number_as_bad_and_stores_no_image(tmp_path, redis_conn):
    [good] = push_samples(redis_conn, 1)
    fields = redis_conn.xrange(SAMPLES_STREAM)[0][1]
    for change in ({b"ts": b"nan"}, {b"frame_id": b"../../escaped"}, {b"confidence": b"inf"}):
        redis_conn.xadd(SAMPLES_STREAM, {**fields, **change})
    missing = {k: v for k, v in fields.items() if k != b"frame_id"}
    redis_conn.xadd(SAMPLES_STREAM, missing)
    with SampleStore(tmp_path / "store") as store:
        assert ingest(redis_conn, store) == {"added": 1, "acked": 5, "bad": 4, "deleted": 0}
        assert [s.frame_id for s in store.samples()] == [good["id"]]
        assert len(list((tmp_path / "store" / "images").rglob("*.*"))) == 1  # no orphaned image


def test_a_label_naming_one_of_the_models_classes_is_fine_whatever_its_name(tmp_path):
    with SampleStore(tmp_path / "store") as store:
        store.add([{"frame_id": "f0", "sha256": store.put_image(jpeg(16, 16), "jpg"), "ext": "jpg", "station": "cam",
                    "ts": 0.0, "classes": json.dumps(["_background", "ok"])}])
        export = tmp_path / "min.json"
        export.write_text(json.dumps([{"frame_id": "f0", "label": "_background"}]))
        assert import_labels(store, export)["updated"] == 1 and store.get("f0").label == "_background"
