"""The producer package: frames on the queue, the Python API, result reading, `files`, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest
from conftest import ROOT
from helpers import CLASSES, jpeg, png, start_worker, stop_worker, tiny_artifact
from redis import Redis
from rq.job import JobStatus
from rq.results import Result

from producer.api import BacklogFull, Producer
from producer.paths import expand_paths
from producer.results import Outcome
from worker.frames import FrameError, validate_frame
from worker.jobs import JOB_FUNC, QUEUE_NAME, FrameJob, FrameQueue
from worker.serializer import MsgpackSerializer

PY = sys.executable


def run_producer(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "producer", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


# -- no torch ---------------------------------------------------------------------------------------


def test_producer_never_imports_torch(subprocess_env: dict[str, str]) -> None:
    code = (
        "import sys\n"
        "import producer, producer.cli, producer.api, producer.camera, producer.watch, producer.files\n"
        "import producer.logs, producer.results, producer.backlog, producer.images, producer.paths\n"
        "from producer.cli import main\n"
        "for argv in (['--help'], ['files', '--help'], ['camera', '--help'], ['watch', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (argv, exc.code)\n"
        "assert 'torch' not in sys.modules, 'producer imported torch'\n"
        "assert 'cv2' not in sys.modules, 'cv2 must be imported lazily'\n"
        "print('clean')\n"
    )
    done = subprocess.run([PY, "-c", code], env=subprocess_env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "clean" in done.stdout


def test_python_m_producer_help_imports_no_torch(subprocess_env: dict[str, str]) -> None:
    # -X importtime lists every module the real `python -m producer` entry point imports.
    done = subprocess.run([PY, "-X", "importtime", "-m", "producer", "--help"], env=subprocess_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in ("files", "camera", "watch"):
        assert name in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "producer.cli" in imported
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}


# -- frames on the queue ----------------------------------------------------------------------------


def test_submit_bytes_lands_on_inference_queue_as_msgpack(redis_url: str, redis_conn: Redis) -> None:
    image = jpeg()
    with Producer(redis_url, station="line-3") as producer:
        job_id = producer.submit_bytes(image, meta={"lot": "A7"})
        second = producer.submit_bytes(png())

    queue = FrameQueue(connection=redis_conn)
    assert queue.name == QUEUE_NAME
    assert queue.job_ids == [job_id, second]
    job = queue.fetch_job(job_id)
    assert isinstance(job, FrameJob)
    assert job.func_name == JOB_FUNC
    frame = validate_frame(job.args[0])
    assert frame["id"] == job_id
    assert frame["station"] == "line-3"
    assert frame["image"] == image
    assert frame["meta"] == {"lot": "A7"}
    assert [frame["seq"], queue.fetch_job(second).args[0]["seq"]] == [0, 1]
    assert job.ttl is None  # no deadline: the frame waits as long as it takes
    # The stored job data is plain msgpack (FrameJob skips zlib), never pickle.
    raw = redis_conn.hget(FrameJob.key_for(job_id), "data")
    func, _instance, args, _kwargs = msgpack.unpackb(raw, raw=False)
    assert func == JOB_FUNC
    assert args[0]["image"] == image


def test_deadline_goes_into_meta_and_job_ttl(redis_url: str, redis_conn: Redis) -> None:
    with Producer(redis_url, station="cam", deadline_s=2.5) as producer:
        job_id = producer.submit_bytes(jpeg())
    job = FrameQueue(connection=redis_conn).fetch_job(job_id)
    assert job.args[0]["meta"]["deadline_s"] == 2.5
    assert job.ttl == 3  # whole seconds, rounded up: never expire a frame before its deadline
    assert 0 < redis_conn.ttl(FrameJob.key_for(job_id)) <= 3


def test_submit_array_encodes_bgr_and_submit_many_is_ordered(redis_url: str, redis_conn: Redis) -> None:
    blue_bgr = np.zeros((24, 32, 3), dtype=np.uint8)
    blue_bgr[..., 0] = 255  # OpenCV order: channel 0 is blue
    with Producer(redis_url, station="api") as producer:
        job_id = producer.submit_array(blue_bgr, jpeg_quality=95)
        many = producer.submit_many([jpeg(seed=1), blue_bgr, png()])
    queue = FrameQueue(connection=redis_conn)
    assert queue.job_ids == [job_id, *many]
    decoded = cv2.imdecode(np.frombuffer(queue.fetch_job(job_id).args[0]["image"], np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (24, 32, 3)
    b, g, r = (int(decoded[..., c].mean()) for c in range(3))
    assert b > 240 and g < 15 and r < 15


def test_bad_images_are_refused_before_sending(redis_url: str, redis_conn: Redis) -> None:
    with Producer(redis_url) as producer:
        with pytest.raises(FrameError, match="neither JPEG nor PNG"):
            producer.submit_bytes(b"GIF89a not really")
        with pytest.raises(FrameError, match="empty"):
            producer.submit_bytes(b"")
        with pytest.raises(ValueError, match="uint8"):
            producer.submit_array(np.zeros((4, 4, 3), dtype=np.float32))
    assert FrameQueue(connection=redis_conn).count == 0


def test_max_pending_bounds_unfinished_frames(redis_url: str, redis_conn: Redis) -> None:
    with Producer(redis_url, station="cam", max_pending=2) as producer:
        first, second = producer.submit_bytes(jpeg()), producer.submit_bytes(jpeg())
        assert not producer.has_room()
        with pytest.raises(BacklogFull, match="2 frames"):
            producer.submit_bytes(jpeg())
        # A frame a worker has taken is still pending; a finished one or an expired one is not.
        queue = FrameQueue(connection=redis_conn)
        queue.fetch_job(first).set_status(JobStatus.STARTED)
        assert not producer.has_room()
        queue.fetch_job(first).set_status(JobStatus.FINISHED)
        assert producer.has_room()
        producer.submit_bytes(jpeg())
        assert not producer.has_room()
        redis_conn.delete(FrameJob.key_for(second))  # what the job ttl does to a stale frame
        assert producer.has_room()
        assert producer.pending == 1


# -- reading results --------------------------------------------------------------------------------


def _finish(conn: Redis, job_id: str, value: object) -> None:
    """Record a result the way RQ's worker does (RQ's own Result API, real Redis)."""
    job = FrameJob.fetch(job_id, connection=conn, serializer=FrameQueue(connection=conn).serializer)
    with conn.pipeline() as pipe:
        Result.create(job, Result.Type.SUCCESSFUL, ttl=60, return_value=value, pipeline=pipe)
        job.set_status(JobStatus.FINISHED, pipeline=pipe)
        pipe.execute()


def _fail(conn: Redis, job_id: str, exc_string: str) -> None:
    job = FrameJob.fetch(job_id, connection=conn, serializer=FrameQueue(connection=conn).serializer)
    with conn.pipeline() as pipe:
        Result.create_failure(job, ttl=60, exc_string=exc_string, pipeline=pipe)
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        pipe.execute()


def test_wait_reports_each_job_once(redis_url: str, redis_conn: Redis) -> None:
    with Producer(redis_url, station="api") as producer:
        ok_id, bad_id, gone_id, slow_id, junk_id = producer.submit_many([jpeg(seed=i) for i in range(5)])
        result = {"frame_id": ok_id, "label": "scratch", "confidence": 0.9,
                  "topk": [{"label": "scratch", "confidence": 0.9}], "timings": {"end_to_end_ms": 12.5}}
        _finish(redis_conn, ok_id, result)
        _fail(redis_conn, bad_id, "Traceback (most recent call last):\n  ...\n"
                                  "worker.frames.FrameError: image is corrupt\n")
        _finish(redis_conn, junk_id, "Unserializable return value")
        redis_conn.delete(FrameJob.key_for(gone_id))
        outcomes = {o.job_id: o for o in producer.wait([ok_id, bad_id, gone_id, slow_id, junk_id], timeout=0.3)}

    assert outcomes[ok_id] == Outcome(ok_id, "finished", result=result)
    assert outcomes[ok_id].ok
    assert outcomes[bad_id].status == "failed"
    assert outcomes[bad_id].reason == "FrameError: image is corrupt"
    assert "Traceback" in outcomes[bad_id].error
    assert outcomes[gone_id].status == "expired"
    assert outcomes[slow_id].status == "timeout"
    assert "queued" in outcomes[slow_id].error
    assert outcomes[junk_id].status == "failed" and "unusable result" in outcomes[junk_id].error


def test_a_frame_nobody_took_before_its_deadline_expires(redis_url: str, redis_conn: Redis) -> None:
    with Producer(redis_url, deadline_s=0.5) as producer:  # job ttl: 1 s
        job_id = producer.submit_bytes(jpeg())
        [outcome] = producer.wait([job_id], timeout=10)
    assert outcome.status == "expired" and "ttl" in outcome.error
    assert not redis_conn.exists(FrameJob.key_for(job_id))


def test_wait_yields_results_as_they_arrive(redis_url: str, redis_conn: Redis) -> None:
    with Producer(redis_url) as producer:
        first, second = producer.submit_many([jpeg(), png()])
        _finish(redis_conn, second, {"label": "ok"})
        outcomes = producer.wait([first, second], timeout=30, interval=0.01)
        assert next(outcomes).job_id == second  # the first to finish comes first
        _finish(redis_conn, first, {"label": "dent"})
        assert next(outcomes).result == {"label": "dent"}
        assert list(outcomes) == []


# -- files ------------------------------------------------------------------------------------------


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / ".done").mkdir()
    (tmp_path / "a" / "one.jpg").write_bytes(jpeg(seed=1))
    (tmp_path / "a" / "deep" / "TWO.JPEG").write_bytes(jpeg(seed=2))
    (tmp_path / "a" / "deep" / "three.Png").write_bytes(png())
    (tmp_path / "a" / "deep" / "readme.txt").write_text("not an image")
    (tmp_path / "a" / ".done" / "old.jpg").write_bytes(jpeg(seed=3))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.jpg").write_bytes(jpeg(seed=4))
    (tmp_path / "b" / "y.jpg").write_bytes(jpeg(seed=5))
    (tmp_path / "b" / "notes.txt").write_text("hello")
    return tmp_path


def test_expand_paths_folders_globs_and_files(image_tree: Path) -> None:
    folder = image_tree / "a"
    files, problems = expand_paths([str(folder), str(image_tree / "b" / "*.jpg"), str(image_tree / "b" / "x.jpg"),
                                    str(image_tree / "b" / "notes.txt"), str(image_tree / "missing.jpg"),
                                    str(image_tree / "b" / "*.gif")])
    assert files == [
        folder / "one.jpg", folder / "deep" / "TWO.JPEG", folder / "deep" / "three.Png",  # recursive, any case
        image_tree / "b" / "x.jpg", image_tree / "b" / "y.jpg",  # glob; x.jpg named again: once
        image_tree / "b" / "notes.txt",  # named directly: its content decides
    ]
    assert problems == [f"{image_tree / 'missing.jpg'}: no such file or directory",
                        f"{image_tree / 'b' / '*.gif'}: no image files found"]
    recursive, _ = expand_paths([str(image_tree / "**" / "*.jpg")])
    assert set(recursive) == {folder / "one.jpg", image_tree / "b" / "x.jpg", image_tree / "b" / "y.jpg"}


def test_files_command_sends_folder_and_glob_and_rejects_non_images(
    image_tree: Path, redis_url: str, redis_conn: Redis, subprocess_env: dict[str, str]
) -> None:
    done = run_producer(["files", str(image_tree / "a"), str(image_tree / "b" / "*.jpg"),
                         str(image_tree / "b" / "notes.txt"), "--station", "uploader", "--redis-url", redis_url],
                        subprocess_env)
    assert done.returncode == 1, done.stderr  # one file was not sent
    assert f"{image_tree / 'b' / 'notes.txt'}: not sent: image is neither JPEG nor PNG" in done.stderr
    assert "5 frames sent to queue 'inference', 1 not sent" in done.stderr
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert [Path(path).name for _, path in lines] == ["one.jpg", "TWO.JPEG", "three.Png", "x.jpg", "y.jpg"]
    queue = FrameQueue(connection=redis_conn)
    assert queue.job_ids == [job_id for job_id, _ in lines]
    for job_id, path in lines:
        job = queue.fetch_job(job_id)
        assert job.func_name == JOB_FUNC
        frame = validate_frame(job.args[0])
        assert frame["station"] == "uploader"
        assert frame["image"] == Path(path).read_bytes()
        assert frame["meta"]["filename"] == Path(path).name


def test_files_command_uses_redis_url_env_and_fails_clearly_without_redis(
    tmp_path: Path, redis_url: str, redis_conn: Redis, subprocess_env: dict[str, str]
) -> None:
    (tmp_path / "p.jpg").write_bytes(jpeg())
    env = {**subprocess_env, "REDIS_URL": redis_url}
    done = run_producer(["files", str(tmp_path / "p.jpg")], env)
    assert done.returncode == 0, done.stderr
    assert FrameQueue(connection=redis_conn).count == 1

    env["REDIS_URL"] = "redis://127.0.0.1:1/0"  # nothing listens there
    env["VQ_REDIS_OUTAGE_S"] = "1"  # the outage it waits out before giving up
    done = run_producer(["files", str(tmp_path / "p.jpg")], env)
    assert done.returncode == 3
    assert "not sent: Redis is unavailable" in done.stderr and "past the limit of 1s" in done.stderr
    done = run_producer(["files", str(tmp_path / "nothing-here")], env)
    assert done.returncode == 2
    assert "no such file or directory" in done.stderr


# -- files --wait with a real BatchWorker -----------------------------------------------------------


def test_files_wait_prints_results_and_names_failures(
    tmp_path: Path, redis_url: str, redis_conn: Redis, subprocess_env: dict[str, str]
) -> None:
    classes = CLASSES
    artifact = tiny_artifact(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    (images / "good1.jpg").write_bytes(jpeg(seed=1))
    (images / "good2.png").write_bytes(png())
    broken = bytearray(png())
    at = broken.find(b"IDAT")
    broken[at + 10] ^= 0xFF  # header intact (the producer accepts it), pixels undecodable (the worker fails it)
    (images / "broken.png").write_bytes(bytes(broken))

    worker = start_worker(redis_url, subprocess_env, "w-files", VQ_MODEL_PATH=str(artifact))
    try:
        done = run_producer(["files", str(images), "--wait", "--timeout", "90", "--redis-url", redis_url],
                            subprocess_env, timeout=120)
    finally:
        worker_log = stop_worker(worker)
    assert done.returncode == 1, f"{done.stderr}\n--- worker ---\n{worker_log}"
    lines = {Path(line["path"]).name: line for line in map(json.loads, done.stdout.splitlines())}
    assert set(lines) == {"good1.jpg", "good2.png", "broken.png"}, worker_log
    for name in ("good1.jpg", "good2.png"):
        line = lines[name]
        assert line["status"] == "finished"
        assert line["label"] in classes
        assert 0.0 <= line["confidence"] <= 1.0
        assert line["topk"][0]["label"] == line["label"]
        assert line["model_version"]
        assert line["latency_ms"] >= 0
        assert set(line) >= {"frame_id", "path", "label", "confidence", "topk", "model_version", "latency_ms"}
    assert lines["broken.png"]["status"] == "failed"
    assert f"error: {images / 'broken.png'}: failed: " in done.stderr
    assert lines["broken.png"]["error"] in done.stderr


def test_odd_files_and_names_fail_alone_and_never_block(
    tmp_path: Path, redis_url: str, redis_conn: Redis, subprocess_env: dict[str, str]
) -> None:
    import os

    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(jpeg())
    # A Latin-1 name from an SMB share or a camera's card is not UTF-8: it reaches Python as surrogates.
    (folder / os.fsdecode(b"caf\xe9.jpg")).write_bytes(jpeg(seed=1))
    os.mkfifo(folder / "cam.jpg")  # a FIFO named like an image: reading it would block for ever
    done = run_producer(["files", str(folder), "--redis-url", redis_url], subprocess_env, timeout=30)
    assert done.returncode == 0, done.stderr
    names = sorted(Path(line.split("\t")[1]).name for line in done.stdout.splitlines())
    assert names == ["caf\\xe9.jpg", "ok.jpg"]
    metas = sorted(validate_frame(FrameJob.fetch(i, connection=redis_conn, serializer=MsgpackSerializer).args[0])
                   ["meta"]["filename"] for i in FrameQueue(connection=redis_conn).job_ids)
    assert metas == ["caf\\xe9.jpg", "ok.jpg"]
    fifo = run_producer(["files", str(folder / "cam.jpg"), "--redis-url", redis_url], subprocess_env, timeout=30)
    assert fifo.returncode == 2 and "cam.jpg: not a regular file" in fifo.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--station", ""], "argument --station: station '' is not a printable string"),
    (["--timeout", "nan"], "argument --timeout: must be a positive finite number"),
    (["--redis-url", ""], "error: the Redis URL is empty"),
    (["--redis-url", "http://localhost:6379/0"], "is not a redis://, rediss:// or unix:// URL (scheme 'http')"),
    (["--redis-url", "redis://localhost:99999/0"], "has a port that is not a number in 0..65535"),
])
def test_bad_arguments_are_named_once_at_start(
    tmp_path: Path, args: list[str], message: str, subprocess_env: dict[str, str]
) -> None:
    (tmp_path / "a.jpg").write_bytes(jpeg())
    done = run_producer(["files", str(tmp_path), *args], subprocess_env)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_api_names_wrong_types_and_values(redis_url: str) -> None:
    with pytest.raises(ValueError, match="station"):
        Producer(redis_url, station="")
    for bad in (float("nan"), 1e9, 0):
        with pytest.raises(ValueError, match="deadline_s"):
            Producer(redis_url, deadline_s=bad)
    with pytest.raises(ValueError, match="result_ttl"):
        Producer(redis_url, result_ttl=0)
    with pytest.raises(ValueError, match="max_pending"):
        Producer(redis_url, max_pending=0)
    with Producer(redis_url, station="cam") as producer:
        with pytest.raises(TypeError, match="read it first"):
            producer.submit_bytes("part.jpg")
        with pytest.raises(TypeError, match="use submit_bytes for a single image"):
            producer.submit_many(jpeg())
        with pytest.raises(FrameError, match=r"meta\['when'\] cannot be sent as msgpack"):
            producer.submit_bytes(jpeg(), meta={"when": {1, 2}})
        job_id = producer.submit_bytes(memoryview(jpeg()))
        [outcome] = producer.wait(job_id, timeout=0.2)  # one id, not its letters one by one
        assert outcome.job_id == job_id and outcome.status == "timeout"
