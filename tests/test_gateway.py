"""The HTTP gateway over real HTTP: uvicorn on loopback, a real redis-server, a real BatchWorker."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from conftest import ROOT, wait_for
from helpers import CLASSES, jpeg, png, start_worker, stop_worker, tiny_artifact
from redis import Redis
from rq import Worker
from rq.suspension import suspend

from deploy import workers
from deploy.gateway import create_app
from worker.jobs import FrameJob, FrameQueue
from worker.redis_server import RedisServer, free_port

API_KEY = "s3cret-key"
MAX_UPLOAD = 64 * 1024  # small, so that oversized uploads are cheap to send
CORRUPT_JPEG = b"\xff\xd8\xff" + bytes(range(256)) * 4  # JPEG magic, then garbage


class Gateway:
    """A gateway app served by uvicorn in a background thread, on a socket bound before it starts."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Gateway:
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=20, what="uvicorn serving")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def upload(data: bytes, name: str = "frame.jpg", **form: str) -> dict:
    return {"files": {"image": (name, data, "application/octet-stream")}, "data": form}


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server and one BatchWorker (tiny model) for the whole module: the worker's start is slow."""
    artifact = tiny_artifact(tmp_path_factory.mktemp("gateway") / "artifact")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with RedisServer() as server:
        conn = Redis.from_url(server.url)
        proc = start_worker(server.url, env, "gw-worker", VQ_MODEL_PATH=str(artifact))
        try:
            workers.wait_registered(conn, proc, "gw-worker", timeout=180)
            yield server
        finally:
            stop_worker(proc)
            conn.close()


@pytest.fixture(scope="module")
def served(fleet: RedisServer) -> Iterator[Gateway]:
    with Gateway(create_app(fleet.url, api_key=API_KEY, max_upload_bytes=MAX_UPLOAD)) as gateway:
        yield gateway


@pytest.fixture
def client(served: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, headers={"X-API-Key": API_KEY}, timeout=60) as c:
        yield c


@pytest.fixture
def idle(redis_url: str) -> Iterator[httpx.Client]:
    """A gateway on a Redis with no worker at all and a queue bound of 3."""
    with Gateway(create_app(redis_url, api_key=API_KEY, max_queue=3, max_upload_bytes=MAX_UPLOAD)) as gateway, \
            httpx.Client(base_url=gateway.url, headers={"X-API-Key": API_KEY}, timeout=30) as c:
        yield c


# -- the round trip through a real worker ---------------------------------------------------------------


def test_classify_returns_the_workers_result(client: httpx.Client) -> None:
    r = client.post("/v1/classify", **upload(jpeg(seed=3), station="line-9"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] in CLASSES and body["label"] == body["topk"][0]["label"]
    assert 0 <= body["confidence"] <= 1 and body["station"] == "line-9"
    assert body["model_version"] and body["worker"]
    assert {"queue_wait_ms", "decode_ms", "inference_ms", "end_to_end_ms", "batch_size"} <= set(body["timings"])

    r = client.post("/v1/classify", params={"timeout": 30}, **upload(png(), "frame.png"))
    assert r.status_code == 200, r.text
    assert r.json()["label"] in CLASSES


def test_jobs_submit_then_poll(client: httpx.Client) -> None:
    r = client.post("/v1/jobs", **upload(jpeg(seed=5)))
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["status"] == "queued" and r.headers["location"] == accepted["status_url"]
    assert accepted["status_url"] == f"/v1/jobs/{accepted['job_id']}"

    def finished() -> dict | None:
        view = client.get(accepted["status_url"]).json()
        assert view["status"] in ("queued", "started", "finished"), view
        return view if view["status"] == "finished" else None

    view = wait_for(finished, timeout=30, what="the job to finish")
    assert view["job_id"] == accepted["job_id"] and view["result"]["label"] in CLASSES
    assert view["result"]["frame_id"] == accepted["job_id"] and view.get("error") is None

    r = client.get("/v1/jobs/0123456789abcdef0123456789abcdef")
    assert r.status_code == 404 and "no frame job" in r.json()["detail"]


def test_truncated_jpeg_fails_at_the_worker_with_its_reason(client: httpx.Client) -> None:
    # The header is intact (so the up-front checks pass); the scan data is cut off.
    r = client.post("/v1/classify", **upload(jpeg()[:300]))
    assert r.status_code == 422, r.text
    body = r.json()
    assert re.match(r"FrameError: .*(could not be decoded|truncated)", body["detail"]), body
    assert body["status"] == "failed" and body["job_id"]
    view = client.get(body["status_url"]).json()
    assert view["status"] == "failed" and view["error"] == body["detail"] and "Traceback" not in view["error"]


# -- refused up front -------------------------------------------------------------------------------------


def test_corrupt_jpeg_is_refused_with_the_reason(client: httpx.Client) -> None:
    r = client.post("/v1/classify", **upload(CORRUPT_JPEG))
    assert r.status_code == 422
    assert "JPEG is corrupt" in r.json()["detail"]


def test_non_images_are_refused(client: httpx.Client) -> None:
    r = client.post("/v1/jobs", **upload(b"<html><body>not an image</body></html>", "page.jpg"))
    assert r.status_code == 415
    assert "neither JPEG nor PNG" in r.json()["detail"]
    r = client.post("/v1/jobs", **upload(b""))
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = client.post("/v1/jobs", data={"station": "x"})  # no image part at all
    assert r.status_code == 422 and r.json()["detail"] == "image: Field required"
    r = client.post("/v1/jobs", **upload(jpeg(), station="s" * 129))
    assert r.status_code == 422 and r.json()["detail"].startswith("station: String should have at most 128")


def test_oversized_uploads_get_413(client: httpx.Client) -> None:
    # Just over the image limit: the body is within the form allowance, the image itself is not.
    r = client.post("/v1/jobs", **upload(b"\xff\xd8\xff" + b"\0" * MAX_UPLOAD))
    assert r.status_code == 413
    assert f"over the limit of {MAX_UPLOAD} bytes" in r.json()["detail"]

    # Far over: refused from Content-Length, before the body is parsed.
    r = client.post("/v1/jobs", **upload(b"\xff\xd8\xff" + b"\0" * (4 * MAX_UPLOAD)))
    assert r.status_code == 413 and "request body is" in r.json()["detail"]

    # No Content-Length (chunked): counted while it streams and cut off at the limit.
    boundary = "vq-test-boundary"

    def chunks() -> Iterator[bytes]:
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n'
               "Content-Type: image/jpeg\r\n\r\n").encode() + b"\xff\xd8\xff"
        for _ in range(4):
            yield b"\0" * MAX_UPLOAD
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/v1/jobs", content=chunks(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and "request body is" in r.json()["detail"]


def test_api_key_is_enforced_on_v1_only(served: Gateway) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as anon:
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": f"Basic {API_KEY}"},
                        {"Authorization": "Bearer wrong"}):
            r = anon.post("/v1/classify", headers=headers, **upload(jpeg()))
            assert r.status_code == 401, headers
            assert "API key" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
            assert anon.get("/v1/jobs/abc", headers=headers).status_code == 401
        # Either header is accepted; an unknown job then answers 404, not 401.
        assert anon.get("/v1/jobs/abc", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 404
        assert anon.get("/v1/jobs/abc", headers={"X-API-Key": API_KEY}).status_code == 404
        assert anon.get("/healthz").status_code == 200
        assert anon.get("/readyz").status_code == 200
        assert anon.get("/openapi.json").status_code == 200


def test_probes_with_a_worker(client: httpx.Client) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["redis"] is True
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    ready = r.json()
    assert ready["ready"] is True and [w["name"] for w in ready["workers"]] == ["gw-worker"]
    assert ready["workers"][0]["last_heartbeat_s"] < 60


def test_openapi_lists_paths_models_and_security(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["info"]["title"] == "visionqueue gateway" and spec["info"]["version"]
    assert {"/v1/classify", "/v1/jobs", "/v1/jobs/{job_id}", "/healthz", "/readyz"} <= set(spec["paths"])
    classify = spec["paths"]["/v1/classify"]["post"]
    assert {"200", "413", "415", "422", "429", "504"} <= set(classify["responses"])
    assert "multipart/form-data" in classify["requestBody"]["content"]
    schemas = spec["components"]["schemas"]
    assert {"ClassifyResult", "JobAccepted", "JobView", "ErrorBody", "Readiness"} <= set(schemas)
    assert schemas["ClassifyResult"]["examples"][0]["label"] == "scratch"
    assert {"APIKeyHeader", "HTTPBearer"} <= set(spec["components"]["securitySchemes"])


# -- no worker: readiness, backpressure, timeouts -----------------------------------------------------


def test_readyz_without_a_live_worker(idle: httpx.Client, redis_conn: Redis) -> None:
    r = idle.get("/readyz")
    assert r.status_code == 503 and "no worker listens on queue 'inference'" in r.json()["reason"]
    assert idle.get("/healthz").json()["redis"] is True

    # A worker registered long ago that stopped heart-beating (SIGKILLed, say) does not count.
    ghost = Worker([FrameQueue(connection=redis_conn)], connection=redis_conn, name="ghost")
    ghost.register_birth()
    assert idle.get("/readyz").status_code == 200
    redis_conn.hset(ghost.key, "last_heartbeat", "2020-01-01T00:00:00.000000Z")
    r = idle.get("/readyz")
    assert r.status_code == 503 and "none with a heartbeat" in r.json()["reason"]

    ghost.heartbeat()
    assert idle.get("/readyz").status_code == 200
    suspend(redis_conn)
    r = idle.get("/readyz")
    assert r.status_code == 503 and "suspended" in r.json()["reason"]


def test_full_queue_answers_429_with_retry_after(idle: httpx.Client) -> None:
    for seed in range(3):
        assert idle.post("/v1/jobs", **upload(jpeg(seed=seed))).status_code == 202
    r = idle.post("/v1/jobs", **upload(jpeg()))
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1 and "limit 3" in r.json()["detail"]
    assert idle.post("/v1/classify", **upload(jpeg())).status_code == 429


def test_timeout_answers_504_with_a_job_to_poll(idle: httpx.Client, redis_conn: Redis) -> None:
    started = time.monotonic()
    r = idle.post("/v1/classify", params={"timeout": 0.3}, **upload(jpeg()))
    assert r.status_code == 504 and time.monotonic() - started < 10
    body = r.json()
    assert body["status"] == "queued" and "no result within 0.3s" in body["detail"]
    assert idle.get(body["status_url"]).json() == {"job_id": body["job_id"], "status": "queued", "result": None,
                                                   "error": None}
    # Gone from Redis (its ttl or result ttl ran out): the gateway still knows it sent it.
    redis_conn.delete(FrameJob.key_for(body["job_id"]))
    view = idle.get(body["status_url"]).json()
    assert view["status"] == "expired" and "gone from Redis" in view["error"]

    # A frame with a deadline that no worker takes in time drops out of Redis: 504, not a wait to the timeout.
    started = time.monotonic()
    r = idle.post("/v1/classify", params={"timeout": 20}, **upload(jpeg(), deadline_s="0.5"))
    assert r.status_code == 504 and r.json()["status"] == "expired", r.text
    assert time.monotonic() - started < 10

    assert idle.post("/v1/classify", params={"timeout": 0}, **upload(jpeg())).status_code == 422
    assert idle.post("/v1/classify", params={"timeout": 10_000}, **upload(jpeg())).status_code == 422


def test_waiting_does_not_block_the_event_loop(idle: httpx.Client) -> None:
    results: list[httpx.Response] = []
    waiter = threading.Thread(target=lambda: results.append(
        idle.post("/v1/classify", params={"timeout": 2}, **upload(jpeg()))))
    waiter.start()
    try:
        wait_for(lambda: idle.get("/readyz").json()["queue_length"] == 1, timeout=10, what="the frame enqueued")
        for _ in range(5):  # the classify request is still waiting all along
            t0 = time.monotonic()
            assert idle.get("/healthz").status_code == 200
            assert time.monotonic() - t0 < 1.0
        assert not results
    finally:
        waiter.join()
    assert results[0].status_code == 504


# -- the command line ----------------------------------------------------------------------------------


def test_cli_serves_with_key_from_the_environment(redis_url: str, subprocess_env: dict[str, str]) -> None:
    port = free_port()
    env = dict(subprocess_env, REDIS_URL=redis_url, VQ_API_KEY=API_KEY, VQ_LOG_FORMAT="json")
    proc = subprocess.Popen([sys.executable, "-m", "deploy.gateway", "--port", str(port), "--max-queue", "5"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def healthy() -> dict | None:
            if proc.poll() is not None:
                pytest.fail(f"gateway exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()
            except httpx.TransportError:
                return None

        assert wait_for(healthy, timeout=60, what="the gateway to serve")["redis"] is True
        assert httpx.get(f"http://127.0.0.1:{port}/v1/jobs/abc", timeout=5).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    requests = [e for e in lines if e.get("event") == "request"]
    assert [(e["path"], e["status"]) for e in requests] == [("/healthz", 200), ("/v1/jobs/abc", 401)], err
    assert all(e["latency_ms"] >= 0 for e in requests)


def test_redis_down_is_503_on_submit_and_readyz_but_not_healthz() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with Gateway(create_app(dead, api_key=API_KEY)) as gateway, \
            httpx.Client(base_url=gateway.url, headers={"X-API-Key": API_KEY}, timeout=30) as c:
        r = c.post("/v1/jobs", **upload(jpeg()))
        assert r.status_code == 503 and "Redis is unreachable" in r.json()["detail"] and r.headers["retry-after"]
        assert c.get("/v1/jobs/abc").status_code == 503
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["reason"] == "Redis is unreachable"
        health = c.get("/healthz")
        assert health.status_code == 200 and health.json()["redis"] is False and health.json()["redis_error"]


# -- a gateway that holds: auth, limits, timeouts, probes without internals ---------------------------------


def raw_request(url: str, head: str, body: bytes = b"", timeout: float = 20) -> tuple[int, bytes]:
    """Send a request line and headers (and maybe part of a body) over a bare socket; the status and the
    rest of the answer. The socket stays open while the answer is read: nothing more is sent."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode() + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def _length(data: bytes) -> int:
    match = re.search(rb"(?i)content-length: *(\d+)", data)
    return int(match.group(1)) if match else 0


def test_401_is_answered_before_the_body_is_read(served: Gateway) -> None:
    # Headers promise 100 KB (within the limits) and no byte of it is ever sent: the 401 still comes.
    head = ("POST /v1/classify HTTP/1.1\r\nHost: x\r\nX-API-Key: wrong\r\nContent-Length: 100000\r\n"
            "Content-Type: multipart/form-data; boundary=b")
    status, answer = raw_request(served.url, head)
    assert status == 401 and b"API key" in answer and b"connection: close" in answer.lower()


def test_slow_body_is_cut_off_with_408(redis_url: str) -> None:
    app = create_app(redis_url, api_key=API_KEY, body_timeout=0.5)
    with Gateway(app) as gateway:
        head = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\nContent-Length: 5000\r\n"
                "Content-Type: multipart/form-data; boundary=b")
        started = time.monotonic()
        status, answer = raw_request(gateway.url, head, b"--b\r\n")  # then nothing more
        assert status == 408 and b"did not arrive within 0.5s" in answer
        assert time.monotonic() - started < 10
        assert app.state.policy.counters["body_timeout"] == 1
        wait_for(lambda: app.state.policy.budget.held == 0, timeout=10, what="the reservation given back")


def test_keys_from_a_list_own_their_jobs_and_are_rate_limited_each(redis_url: str) -> None:
    app = create_app(redis_url, api_key=["key-a", "key-b"], rate_limit=0.5, rate_burst=2, max_upload_bytes=MAX_UPLOAD)
    with Gateway(app) as gateway, httpx.Client(base_url=gateway.url, timeout=30) as c:
        a, b = {"X-API-Key": "key-a"}, {"Authorization": "Bearer key-b"}
        first = c.post("/v1/jobs", headers=a, **upload(jpeg()))
        assert first.status_code == 202
        assert c.post("/v1/jobs", headers=a, **upload(jpeg())).status_code == 202
        r = c.post("/v1/jobs", headers=a, **upload(jpeg()))
        assert r.status_code == 429 and "rate limit" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
        assert c.post("/v1/jobs", headers=b, **upload(jpeg())).status_code == 202  # its own bucket
        # The other key cannot read key-a's job: the same answer as no such job.
        assert c.get(first.json()["status_url"], headers=a).json()["status"] == "queued"
        assert c.get(first.json()["status_url"], headers=b).status_code == 404


def test_a_key_is_required_unless_insecure_no_auth(redis_url: str) -> None:
    with pytest.raises(ValueError, match="no API key"):
        create_app(redis_url)
    with pytest.raises(ValueError, match="no API key"):
        create_app(redis_url, api_key=["", "  "])
    with Gateway(create_app(redis_url, insecure_no_auth=True)) as gateway:
        assert httpx.post(f"{gateway.url}/v1/jobs", timeout=30, **upload(jpeg())).status_code == 202


def test_byte_budget_counts_bytes_and_gives_them_back(redis_url: str, redis_conn: Redis) -> None:
    image = jpeg(seed=1)
    # Room for two uploads (image + form) and not three.
    app = create_app(redis_url, api_key=API_KEY, max_inflight_bytes=2 * len(image) + 1500,
                     max_upload_bytes=MAX_UPLOAD)
    budget = app.state.policy.budget
    with Gateway(app) as gateway, httpx.Client(base_url=gateway.url, headers={"X-API-Key": API_KEY}, timeout=30) as c:
        for _ in range(2):
            assert c.post("/v1/jobs", **upload(image, deadline_s="1")).status_code == 202
        assert budget.in_flight == 2 * len(image) and budget.reading == 0
        r = c.post("/v1/jobs", **upload(image))
        assert r.status_code == 429 and "budget" in r.json()["detail"] and r.headers["retry-after"]
        # No worker: the frames drop out of Redis at their deadline, and their bytes come back.
        wait_for(lambda: budget.held == 0, timeout=15, what="the expired frames' bytes given back")
        assert c.post("/v1/jobs", **upload(image, deadline_s="1")).status_code == 202
        wait_for(lambda: budget.held == 0, timeout=15, what="that frame's bytes given back")

        # Redis's own headroom: frames may fill 70 % of maxmemory, and it is already past that
        # (while Redis itself would still take writes).
        maxmemory = int(redis_conn.info("memory")["used_memory"] * 1.2)
        redis_conn.config_set("maxmemory", maxmemory)
        wait_for(lambda: budget.redis_max == maxmemory, timeout=15, what="the memory sample")
        r = c.post("/v1/jobs", **upload(image))
        assert r.status_code == 503 and "memory is nearly full" in r.json()["detail"] and r.headers["retry-after"]
        assert str(maxmemory) not in r.text
        redis_conn.config_set("maxmemory", 0)
        wait_for(lambda: budget.redis_max == 0, timeout=15, what="the memory sample")
        assert c.post("/v1/jobs", **upload(image)).status_code == 202


def test_waiters_are_bounded(redis_url: str) -> None:
    app = create_app(redis_url, api_key=API_KEY, max_waiters=2, max_upload_bytes=MAX_UPLOAD)
    waiters = app.state.policy.waiters
    with Gateway(app) as gateway, httpx.Client(base_url=gateway.url, headers={"X-API-Key": API_KEY}, timeout=30) as c:
        results: list[int] = []

        def wait() -> None:
            results.append(c.post("/v1/classify", params={"timeout": 3}, **upload(jpeg())).status_code)

        threads = [threading.Thread(target=wait) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: waiters.active == 2, timeout=10, what="two waiters")
            r = c.post("/v1/classify", **upload(jpeg()))
            assert r.status_code == 503 and "waiting" in r.json()["detail"] and r.headers["retry-after"] == "1"
            assert c.post("/v1/jobs", **upload(jpeg())).status_code == 202  # submitting is not waiting
            assert c.get("/healthz").status_code == 200
        finally:
            for t in threads:
                t.join()
        assert results == [504, 504]
        wait_for(lambda: waiters.active == 0, timeout=10, what="the waiter slots given back")


def test_pixel_limit_is_checked_from_the_header(redis_url: str) -> None:
    with Gateway(create_app(redis_url, api_key=API_KEY, max_pixels=1000)) as gateway:
        r = httpx.post(f"{gateway.url}/v1/jobs", headers={"X-API-Key": API_KEY}, timeout=30, **upload(jpeg()))
        assert r.status_code == 422 and "64x48 = 3072 pixels, over the gateway's limit of 1000" in r.json()["detail"]


def test_probes_show_no_internals_without_a_key(served: Gateway) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as anon:
        assert anon.get("/healthz").json() == {"status": "ok", "redis": True}
        assert anon.get("/readyz").json() == {"ready": True}
        assert "gw-worker" not in anon.get("/readyz").text
        keyed = anon.get("/readyz", headers={"X-API-Key": API_KEY}).json()
        assert keyed["workers"][0]["name"] == "gw-worker"
        assert anon.get("/healthz", headers={"X-API-Key": API_KEY}).json()["version"]
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with Gateway(create_app(dead, api_key=API_KEY)) as gateway, httpx.Client(base_url=gateway.url, timeout=30) as c:
        assert c.get("/readyz").json() == {"ready": False}
        wait_for(lambda: c.get("/healthz").json() == {"status": "ok", "redis": False}, timeout=10,
                 what="the gateway noticing Redis is down")


def test_worker_internals_stay_out_of_failure_bodies() -> None:
    from deploy.gateway.service import WORKER_FAILED, public_reason

    assert public_reason("FrameError: image could not be decoded (300 bytes)") == (
        "FrameError: image could not be decoded (300 bytes)")
    assert public_reason("ConnectionError: Error 111 connecting to 10.0.0.7:6379") == WORKER_FAILED
    assert public_reason(None) == WORKER_FAILED


def test_cli_requires_a_key_and_reads_a_key_file(tmp_path) -> None:
    from deploy.gateway.__main__ import parse_args

    env = {k: v for k, v in os.environ.items() if k not in ("VQ_API_KEY", "VQ_API_KEY_FILE")}
    with pytest.MonkeyPatch.context() as mp:
        for k in ("VQ_API_KEY", "VQ_API_KEY_FILE"):
            mp.delenv(k, raising=False)
        with pytest.raises(SystemExit):
            parse_args([])
        keys = tmp_path / "keys"
        keys.write_text("# line 1\nkey-one\n\n  key-two  \n")
        assert parse_args(["--api-key-file", str(keys)]).keys == ["key-one", "key-two"]
        mp.setenv("VQ_API_KEY", "from-env")
        assert parse_args(["--api-key", "flag"]).keys == ["flag", "from-env"]
        assert parse_args(["--insecure-no-auth"]).keys == ["from-env"]
    assert env is not None


def test_uploads_without_a_length_hold_what_arrived_not_the_largest_body(redis_url: str) -> None:
    image = jpeg(seed=2)
    # Room for one largest body (4 MiB + the form) and 64 KiB more: enough for many small uploads.
    largest = 4 * 1024 * 1024
    app = create_app(redis_url, api_key=API_KEY, max_inflight_bytes=largest + 128 * 1024, max_upload_bytes=largest)
    form = upload(image)
    body, content_type = _multipart(form)

    def chunked() -> Iterator[bytes]:  # no Content-Length: sent as chunks
        yield body[:100]
        yield body[100:]

    with Gateway(app) as gateway, httpx.Client(base_url=gateway.url, timeout=30) as c:
        for _ in range(20):  # each held the largest body while read: past ~15 in flight, all were refused
            r = c.post("/v1/jobs", content=chunked(), headers={"X-API-Key": API_KEY, "Content-Type": content_type})
            assert r.status_code == 202, r.text
    budget = app.state.policy.budget
    assert budget.reading == 0 and budget.in_flight == 20 * len(image)  # what is held is what arrived


def _multipart(form: dict) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", **form)
    return request.read(), request.headers["content-type"]


@pytest.mark.parametrize(("args", "message", "code"), [
    (["--shard", "1"], "--shard 1 is given but no shard map is", 2),
    (["--shard", "1", "--redis-url", "redis://localhost:1/0"], "--shard picks a shard of a shard map", 2),
    (["--max-upload-bytes", str(10**9), "--max-inflight-bytes", str(2 * 10**9)],
     "--max-upload-bytes must be at most VQ_MAX_IMAGE_BYTES", 2),
    (["--redis-url", "http://localhost:1/0"], "is not a redis://, rediss:// or unix:// URL", 2),
])
def test_cli_refuses_settings_that_cannot_work_in_one_line(args: list[str], message: str, code: int,
                                                           subprocess_env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", "deploy.gateway", "--api-key", "k", *args], env=subprocess_env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == code and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_cli_refuses_credentials_redis_refuses(subprocess_env: dict[str, str]) -> None:
    with RedisServer(extra_args=["--requirepass", "right"]) as server:
        url = server.url.replace("redis://", "redis://:wrong@")
        done = subprocess.run([sys.executable, "-m", "deploy.gateway", "--api-key", "k", "--redis-url", url],
                              env=subprocess_env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and "refused our credentials" in done.stderr and "wrong" not in done.stderr
