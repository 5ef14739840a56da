"""Start and stop real `rq worker` processes (the demo, the benchmark and the tests use these)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from redis import Redis
from rq import Worker

ROOT = Path(__file__).resolve().parents[1]
# `python -m rq.cli` is the `rq` script's own entry point, and works where packages were installed
# without scripts beside this interpreter (pip --target, a read-only venv)
RQ = [sys.executable, "-m", "rq.cli"]
BATCH_WORKER = ["--worker-class", "worker.BatchWorker"]


def pythonpath(root: Path = ROOT, env: dict[str, str] | None = None) -> str:
    """PYTHONPATH for a child that imports this checkout: `root` first, the caller's own path kept after it."""
    rest = dict(os.environ if env is None else env).get("PYTHONPATH", "")
    return str(root) + (os.pathsep + rest if rest else "")


def exit_on_sigterm(code: int = 143) -> None:
    """SIGTERM unwinds like SIGINT: `with` blocks (an embedded redis-server, started workers) clean up.
    By default SIGTERM ends the process at once and its children outlive it."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(code))


def start_worker(redis_url: str, name: str, env: dict[str, str] | None = None, worker_args: list[str] | None = None,
                 output: int | None = subprocess.PIPE, queue: str = "inference") -> subprocess.Popen:
    """`rq worker` in its own process group (so a signal reaches it and nothing else)."""
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = pythonpath(env=child_env)
    child_env["RQ_REDIS_URL"] = redis_url  # rq's own variable: a password never shows on a command line
    return subprocess.Popen(
        [*RQ, "worker", *(worker_args or BATCH_WORKER), "--name", name, queue],
        env=child_env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT if output == subprocess.PIPE else output,
        text=True, start_new_session=True,
    )


def is_registered(conn: Redis, name: str) -> bool:
    return any(w.name == name for w in Worker.all(connection=conn))


def wait_registered(conn: Redis, proc: subprocess.Popen, name: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not is_registered(conn, name):
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"worker {name} exited with {proc.returncode}: {out[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker {name} did not register within {timeout}s")
        time.sleep(0.1)


def stop_worker(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> str:
    """Signal the worker's process group; SIGKILL it if it has not exited after `timeout`. Its output."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out or ""


def start_shard_worker(redis_urls: list[str], shard: int, name: str, env: dict[str, str] | None = None,
                       worker_args: list[str] | None = None, output: int | None = subprocess.PIPE,
                       queue: str = "inference", settings: dict[str, str] | None = None) -> subprocess.Popen:
    """`rq worker` serving shard `shard` of a shard map, started the way deployments start it:
    REDIS_URLS + VQ_SHARD, through `python -m worker.shards exec` (which hands rq its URL).
    `settings` are added to `env` (default: this process's environment)."""
    child_env = dict(os.environ if env is None else env)
    child_env.update(settings or {})
    child_env["PYTHONPATH"] = pythonpath(env=child_env)
    child_env.update({"REDIS_URLS": ",".join(redis_urls), "VQ_SHARD": str(shard)})
    for stale in ("REDIS_URLS_FILE", "RQ_REDIS_URL"):  # the map given here is the one served
        child_env.pop(stale, None)
    return subprocess.Popen(
        [sys.executable, "-m", "worker.shards", "exec", "rq", "worker", *(worker_args or BATCH_WORKER),
         "--name", name, queue],
        env=child_env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT if output == subprocess.PIPE else output,
        text=True, start_new_session=True,
    )
