"""`python -m deploy.gateway_load`: the gateway under abuse, on loopback, with its bounds checked.

It starts its own redis-server (with `maxmemory` and `noeviction`, as in production), a real
BatchWorker with a tiny model, and `python -m deploy.gateway` as a subprocess, then runs, with an
asyncio client (httpx):

1. uploads with no key and with a wrong key (all must get 401);
2. slow uploads that stall mid-body (all must be cut off with 408);
3. one key sending past its rate limit (some must get 429);
4. N concurrent waiters on /v1/classify (200, or 503 past --max-waiters; some must get 200);
5. M large uploads (a few MB each) to /v1/jobs (202, or 429/503 from the byte budget).

Meanwhile a separate process probes /healthz every 50 ms (its p99 must stay under 1 s) and a
thread samples Redis's `used_memory` (its peak must stay under maxmemory). It prints a table and
exits 1 when a bound is broken. Everything listens on 127.0.0.1 only; every phase is bounded in
count and time. `--quick` scales the counts down (the test suite runs that).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import httpx

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
HEALTHZ_P99_MAX_S = 1.0
PROBE_INTERVAL_S = 0.05


@dataclass
class Phase:
    name: str
    expected: set[int]
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    def record(self, status: int | str, latency: float) -> None:
        self.statuses[str(status)] += 1
        self.latencies.append(latency)

    def unexpected(self) -> dict[str, int]:
        return {s: n for s, n in self.statuses.items() if not (s.isdigit() and int(s) in self.expected)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploy.gateway_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for the test suite (~30 s)")
    parser.add_argument("--waiters", type=int, help="concurrent /v1/classify waiters (default 2000; quick 100)")
    parser.add_argument("--large", type=int, help="large uploads (default 1000; quick 20)")
    parser.add_argument("--large-mb", type=float, help="size of each large upload in MB (default 3; quick 1)")
    parser.add_argument("--large-concurrency", type=int, default=32, help="large uploads in flight at once")
    parser.add_argument("--unauthorized", type=int, help="no-key and wrong-key uploads each (default 200; quick 20)")
    parser.add_argument("--slow", type=int, help="stalled uploads (default 50; quick 3)")
    parser.add_argument("--redis-maxmemory-mb", type=int, default=256, help="Redis's maxmemory (default 256)")
    parser.add_argument("--max-waiters", type=int, default=1000, help="the gateway's --max-waiters (default 1000)")
    parser.add_argument("--time-limit", type=float, default=170.0, help="seconds for the whole run (default 170)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"waiters": (2000, 100), "large": (1000, 20), "large_mb": (3.0, 1.0), "unauthorized": (200, 20),
                "slow": (50, 3)}
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    return args


# -- the stack --------------------------------------------------------------------------------------------


def tiny_jpeg(seed: int = 0, width: int = 64, height: int = 48) -> bytes:
    import cv2
    import numpy as np

    img = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def large_jpeg(megabytes: float) -> bytes:
    """Noise, which JPEG cannot compress: about 1.2 bytes a pixel at quality 95."""
    import cv2
    import numpy as np

    pixels = megabytes * 1e6 / 1.2
    width = int((pixels * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    img = np.random.default_rng(1).integers(0, 255, (height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def free_port() -> int:
    from worker.redis_server import free_port as port

    return port()


def redis_memory_sampler(url: str, stop: threading.Event, peak: list[int]) -> None:
    from redis import Redis

    conn = Redis.from_url(url, socket_timeout=5)
    try:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # a sample lost under load is no failure of the gateway
                peak[0] = max(peak[0], int(conn.info("memory")["used_memory"]))
            stop.wait(0.1)
    finally:
        conn.close()


def probe_healthz(url: str, stop: multiprocessing.synchronize.Event, out: multiprocessing.Queue) -> None:
    """In its own process: the client's own load must not be what slows the probe down."""
    import httpx

    latencies: list[float] = []
    failures = Counter[str]()
    with httpx.Client(base_url=url, timeout=5) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                status = client.get("/healthz").status_code
                if status != 200:
                    failures[str(status)] += 1
            except Exception as exc:
                failures[type(exc).__name__] += 1
            latencies.append(time.perf_counter() - started)
            stop.wait(PROBE_INTERVAL_S)
    out.put((latencies, dict(failures)))


# -- the phases -------------------------------------------------------------------------------------------


async def timed(phase: Phase, make_request: Callable[[], Awaitable[httpx.Response]]) -> None:
    import httpx

    started = time.perf_counter()
    try:
        status: int | str = (await make_request()).status_code
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    phase.record(status, time.perf_counter() - started)


def files(image: bytes) -> dict[str, Any]:
    return {"image": ("frame.jpg", image, "application/octet-stream")}


async def unauthorized(client: httpx.AsyncClient, count: int) -> Phase:
    phase = Phase("no key / wrong key", {401})
    image = tiny_jpeg()
    headers = [{}] * count + [{"X-API-Key": "not-a-key"}] * count
    await asyncio.gather(*(timed(phase, lambda h=h: client.post("/v1/classify", headers=h, files=files(image)))
                           for h in headers))
    return phase


async def slow_uploads(url: str, key: str, count: int, body_timeout: float) -> Phase:
    """Headers promise 200 KB; 1 KB arrives, then nothing: each must get 408 at the body timeout."""
    phase = Phase("slow uploads (stall mid-body)", {408})
    host, port = url.removeprefix("http://").split(":")

    async def one() -> None:
        started = time.perf_counter()
        status: int | str = "no answer"
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write((f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\n"
                          "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 200000\r\n\r\n").encode()
                         + b"--b\r\n" + b"x" * 1024)
            await writer.drain()
            async with asyncio.timeout(body_timeout + 15):
                line = await reader.readline()
            status = int(line.split()[1]) if line else "closed"
            writer.close()
        except (OSError, TimeoutError, ValueError, IndexError) as exc:
            status = type(exc).__name__
        phase.record(status, time.perf_counter() - started)

    await asyncio.gather(*(one() for _ in range(count)))
    return phase


async def rate_limited(client: httpx.AsyncClient, key: str, count: int) -> Phase:
    phase = Phase("one key past its rate limit", {202, 429})
    image = tiny_jpeg(2)
    await asyncio.gather(*(timed(phase, lambda: client.post("/v1/jobs", headers={"X-API-Key": key},
                                                             files=files(image))) for _ in range(count)))
    if not phase.statuses.get("429"):
        phase.problems.append("no request was rate limited")
    return phase


async def waiters(client: httpx.AsyncClient, keys: list[str], count: int) -> Phase:
    phase = Phase(f"{count} concurrent waiters", {200, 503})
    images = [tiny_jpeg(i) for i in range(8)]
    await asyncio.gather(*(timed(phase, lambda i=i: client.post(
        "/v1/classify", params={"timeout": 30}, headers={"X-API-Key": keys[i % len(keys)]},
        files=files(images[i % len(images)]))) for i in range(count)))
    if not phase.statuses.get("200"):
        phase.problems.append("no waiter got its result")
    return phase


async def large_uploads(client: httpx.AsyncClient, keys: list[str], count: int, image: bytes,
                        concurrency: int) -> Phase:
    phase = Phase(f"{count} large uploads ({len(image) / 1e6:.1f} MB)", {202, 429, 503})
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await timed(phase, lambda: client.post("/v1/jobs", headers={"X-API-Key": keys[i % len(keys)]},
                                                   files=files(image)))

    await asyncio.gather(*(one(i) for i in range(count)))
    if not phase.statuses.get("202"):
        phase.problems.append("no large upload was accepted")
    return phase


async def run_phases(url: str, args: argparse.Namespace, keys: dict[str, list[str]], body_timeout: float,
                     large: bytes) -> list[Phase]:
    import httpx

    limits = httpx.Limits(max_connections=args.waiters + 100, max_keepalive_connections=args.waiters + 100)
    timeout = httpx.Timeout(60, connect=30, pool=60)
    phases: list[Phase] = []
    deadline = time.monotonic() + args.time_limit
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        steps = [
            lambda: unauthorized(client, args.unauthorized),
            lambda: slow_uploads(url, keys["slow"][0], args.slow, body_timeout),
            lambda: rate_limited(client, keys["abuser"][0], RATE_BURST + 100),
            lambda: waiters(client, keys["waiters"], args.waiters),
            lambda: large_uploads(client, keys["large"], args.large, large, args.large_concurrency),
        ]
        for step in steps:
            started = time.perf_counter()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the run's time limit passed before every phase ran")
            async with asyncio.timeout(left):
                phase = await step()
            phase.wall_s = time.perf_counter() - started
            phases.append(phase)
    return phases


RATE_LIMIT = 50  # the gateway's --rate-limit here: frames/s per key
RATE_BURST = 100
BODY_TIMEOUT_S = 10.0  # a flood of 2,000 uploads on two cores takes seconds to arrive; the slow phase waits this


def start_gateway(redis_url: str, port: int, key_file: Path, log_path: Path, max_waiters: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               VQ_LOG_FORMAT="json", REDIS_URL=redis_url)
    env.pop("VQ_API_KEY", None)
    cmd = [sys.executable, "-m", "deploy.gateway", "--host", LOOPBACK, "--port", str(port),
           "--api-key-file", str(key_file), "--body-timeout", str(BODY_TIMEOUT_S),
           "--rate-limit", str(RATE_LIMIT), "--rate-burst", str(RATE_BURST), "--max-waiters", str(max_waiters),
           "--timeout", "30"]
    with open(log_path, "w") as log_file:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)


def wait_serving(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the gateway did not serve within {timeout}s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from redis import Redis

    from deploy import workers
    from deploy.bench import build_artifact
    from worker.redis_server import RedisServer

    started = time.monotonic()
    maxmemory = args.redis_maxmemory_mb * 1024 * 1024
    work = Path(tempfile.mkdtemp(prefix="vq-gateway-load-"))
    key_names = {"waiters": 25, "large": 15, "slow": 1, "abuser": 1}
    keys = {name: [f"{name}-{i}-{os.urandom(8).hex()}" for i in range(n)] for name, n in key_names.items()}
    key_file = work / "keys"
    key_file.write_text("".join(k + "\n" for group in keys.values() for k in group))
    key_file.chmod(0o600)
    print(f"building a tiny model in {work} …", flush=True)
    artifact = build_artifact(work / "artifact", "resnet18", 32, [tiny_jpeg(i) for i in range(16)])
    large = large_jpeg(args.large_mb)

    extra = ("--maxmemory", str(maxmemory), "--maxmemory-policy", "noeviction")
    with RedisServer(extra_args=extra) as server:
        conn = Redis.from_url(server.url)
        worker_log = open(work / "worker.log", "w")  # noqa: SIM115 - closed in the finally below
        env = dict(os.environ, VQ_MODEL_PATH=str(artifact), VQ_TORCH_THREADS="1", VQ_DECODE_THREADS="1",
                   VQ_LOG_FORMAT="json", OMP_NUM_THREADS="1")
        worker = workers.start_worker(server.url, "load-worker", env, output=worker_log)
        port = free_port()
        url = f"http://{LOOPBACK}:{port}"
        gateway = start_gateway(server.url, port, key_file, work / "gateway.log", args.max_waiters)
        ctx = multiprocessing.get_context("spawn")
        stop_probe, probe_out = ctx.Event(), ctx.Queue()
        prober = None
        stop_sampler, peak = threading.Event(), [0]
        sampler = threading.Thread(target=redis_memory_sampler, args=(server.url, stop_sampler, peak), daemon=True)
        try:
            workers.wait_registered(conn, worker, "load-worker", timeout=120)
            wait_serving(url, gateway)
            print(f"stack up in {time.monotonic() - started:.0f}s; running the phases …", flush=True)
            sampler.start()
            prober = ctx.Process(target=probe_healthz, args=(url, stop_probe, probe_out), daemon=True)
            prober.start()
            left = args.time_limit - (time.monotonic() - started)
            args.time_limit = left
            phases = asyncio.run(run_phases(url, args, keys, BODY_TIMEOUT_S, large))
        finally:
            stop_probe.set()
            probe = probe_out.get(timeout=30) if prober is not None else ([], {})
            if prober is not None:
                prober.join(timeout=10)
            stop_sampler.set()
            if sampler.is_alive():
                sampler.join(timeout=5)
            gateway.terminate()
            try:
                gateway.wait(timeout=20)
            except subprocess.TimeoutExpired:
                gateway.kill()
            workers.stop_worker(worker)
            worker_log.close()
            conn.close()
    return report(phases, probe, peak[0], maxmemory, time.monotonic() - started, work)


def report(phases: list[Phase], probe: tuple[list[float], dict[str, int]], peak: int, maxmemory: int,
           wall_s: float, work: Path) -> int:
    latencies, probe_failures = probe
    problems: list[str] = []
    print()
    print(f"{'phase':<34} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'wall s':>7}  status codes")
    for phase in phases:
        codes = ", ".join(f"{s}: {n}" for s, n in sorted(phase.statuses.items()))
        print(f"{phase.name:<34} {len(phase.latencies):>8} {percentile(phase.latencies, 50) * 1000:>8.0f} "
              f"{percentile(phase.latencies, 99) * 1000:>8.0f} {phase.wall_s:>7.1f}  {codes}")
        if phase.unexpected():
            problems.append(f"{phase.name}: unexpected answers {phase.unexpected()}")
        problems += [f"{phase.name}: {p}" for p in phase.problems]
    p99 = percentile(latencies, 99)
    print()
    print(f"/healthz probes: {len(latencies)}, p50 {percentile(latencies, 50) * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms, max {max(latencies, default=0) * 1000:.0f} ms "
          f"(bound {HEALTHZ_P99_MAX_S * 1000:.0f} ms); failures: {probe_failures or 'none'}")
    print(f"Redis used_memory peak: {peak / 2**20:.1f} MiB of a {maxmemory / 2**20:.0f} MiB budget (maxmemory)")
    print(f"run: {wall_s:.0f} s; logs in {work}")
    if not latencies or not p99 < HEALTHZ_P99_MAX_S:
        problems.append(f"/healthz p99 {p99:.3f}s is not under {HEALTHZ_P99_MAX_S}s")
    if probe_failures:
        problems.append(f"/healthz failed: {probe_failures}")
    if not 0 < peak < maxmemory:
        problems.append(f"Redis used_memory peaked at {peak} bytes, not under its budget of {maxmemory}")
    for problem in problems:
        print(f"BOUND BROKEN: {problem}")
    print("OK: every bound held" if not problems else f"FAILED: {len(problems)} bound(s) broken")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
