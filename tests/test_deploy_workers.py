"""Scripts under deploy/ that embed a redis-server must not leave it running when they are stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from deploy.workers import ROOT, pythonpath

SCRIPT = """
import time
from deploy.workers import exit_on_sigterm
from worker.redis_server import RedisServer
exit_on_sigterm()
with RedisServer() as server:
    print(server.proc.pid, flush=True)
    time.sleep(300)  # stands for a bench's long run; SIGTERM ends it
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_a_script_stops_the_redis_server_it_embedded() -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=pythonpath()))
    try:
        server_pid = int(proc.stdout.readline())
        assert _alive(server_pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        deadline = time.monotonic() + 30
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(server_pid), "the embedded redis-server outlived the script SIGTERM stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
