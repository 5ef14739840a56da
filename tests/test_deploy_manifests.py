"""Deployment files: they parse, the KEDA trigger watches the real queue key, and every command in
them is a real CLI with real flags. (No container engine or cluster here: images are not built and
manifests are not applied; this is what can be checked without them.)"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from helpers import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from redis import Redis

from worker.jobs import FrameQueue

DEPLOY = ROOT / "deploy"
WRAPPER = "worker.redis_health"  # sets RQ_REDIS_URL (password from a file) and execs the rq command


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_commands() -> list[list[str]]:
    """Every command line in compose, Kubernetes and systemd files."""
    commands = []
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for svc in compose["services"].values():
        for key in ("command", "entrypoint"):
            if isinstance(svc.get(key), list):
                commands.append(svc[key])
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        for doc in load_all(path):
            for container in _containers(doc):
                commands.append(container["command"])
    for path in (DEPLOY / "systemd").glob("*.service"):
        for line in path.read_text().splitlines():
            if line.startswith("ExecStart="):
                commands.append(shlex.split(line.split("=", 1)[1]))
    return commands


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    template = spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template")
    return (template or {}).get("spec", {}).get("containers", [])


def python_invocations(command: list[str]) -> list[list[str]]:
    """`python -m module args…` calls, also inside `sh -c "…"` strings."""
    if command[:2] == ["sh", "-c"]:
        parts = [shlex.split(p) for p in re.split(r";|&&", command[2])]
    else:
        parts = [command]
    calls = []
    for words in parts:
        words = words[1:] if words[:1] == ["exec"] else words  # the shell's exec
        for i, w in enumerate(words):
            if w.endswith("python") and words[i + 1:i + 2] == ["-m"]:
                # `python -m worker.redis_health exec CMD…` wraps CMD (caught on its own below).
                wrapper = words[i + 2:i + 4] == [WRAPPER, "exec"]
                calls.append(words[i + 2:i + 4] if wrapper else words[i + 2:])
            if w.endswith("rq") and words[i + 1:i + 2] == ["worker"]:
                calls.append(["rq", *words[i + 1:]])
    return calls


def test_every_yaml_parses():
    files = [*DEPLOY.glob("*.yml"), *(DEPLOY / "k8s").glob("*.yaml")]
    assert len(files) >= 6
    for path in files:
        assert load_all(path), path


def test_keda_trigger_names_the_real_queue_key():
    key = FrameQueue(connection=Redis()).key  # no connection is made
    docs = load_all(DEPLOY / "k8s" / "keda-scaledobject.yaml")
    [scaled] = [d for d in docs if d["kind"] == "ScaledObject"]
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == key == "rq:queue:inference"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "visionqueue-worker"


def test_gpu_worker_asks_for_a_gpu():
    [dep] = load_all(DEPLOY / "k8s" / "worker-gpu.yaml")
    [container] = _containers(dep)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("call", [c for cmd in all_commands() for c in python_invocations(cmd)],
                         ids=lambda c: " ".join(c[:2]))
def test_commands_are_real_cli(call, subprocess_env):
    if call[0] == "rq":
        cls = call[call.index("--worker-class") + 1]
        module, name = cls.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name)
        assert call[-1] == "inference"
        return
    module, args = call[0], call[1:]
    out = subprocess.run([sys.executable, "-m", module, *_subcommand(args), "--help"], capture_output=True,
                         text=True, cwd=ROOT, env=subprocess_env, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in [a for a in args if a.startswith("--")]:
        assert flag in out.stdout, f"{module} has no {flag}"


def _subcommand(args: list[str]) -> list[str]:
    return args[:1] if args and not args[0].startswith("-") and not args[0].startswith("$") else []


INGEST = ["python", "-m", "continual.ingest", "--follow"]


def test_every_deployment_runs_the_ingest_service_next_to_the_updater():
    """Ingest keeps up with the sample stream between updates: a service in compose, Kubernetes and systemd."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    [ingest] = [svc for svc in compose.values() if svc.get("command") == INGEST]
    assert ingest["restart"] == "unless-stopped" and ingest["environment"]["REDIS_URL"]
    assert set(ingest["volumes"]) == set(compose["updater"]["volumes"])  # the same sample store

    docs = [doc for path in (DEPLOY / "k8s").glob("*.yaml") for doc in load_all(path)]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"
                    and any(c["command"] == INGEST for c in _containers(d))]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    [cron] = [d for d in docs if d["kind"] == "CronJob" and d["metadata"]["name"] == "visionqueue-update"]

    def claims(doc: dict) -> set[str]:
        spec = doc["spec"].get("template") or doc["spec"]["jobTemplate"]["spec"]["template"]
        volumes = spec["spec"]["volumes"]
        return {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}

    assert claims(deployment) == claims(cron)
    # The store's volume is ReadWriteOnce: the update must run on the ingest pod's node.
    cron_pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [term] = cron_pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["labelSelector"]["matchLabels"] == deployment["spec"]["template"]["metadata"]["labels"]

    unit = (DEPLOY / "systemd" / "visionqueue-ingest.service").read_text()
    lines = set(unit.splitlines())
    [exec_start] = [line for line in lines if line.startswith("ExecStart=")]
    assert shlex.split(exec_start.split("=", 1)[1])[1:] == INGEST[1:]
    assert {"Type=simple", "Restart=always", "KillSignal=SIGTERM", "WantedBy=multi-user.target"} <= lines
    update = (DEPLOY / "systemd" / "visionqueue-update.service").read_text()
    # The same store; each its own Redis user and credential (ingest.env / update.env).
    assert {line for line in update.splitlines() if line.startswith("Environment=CONTINUAL_STORE=")} <= lines


def redis_conf() -> dict[str, str]:
    conf = {}
    for line in (DEPLOY / "redis" / "redis.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            conf[key] = value.strip()
    return conf


def test_compose_redis_fsyncs_every_write_and_is_bounded():
    # A kill -9 of Redis must not lose a frame a producer was told is accepted; a full Redis refuses
    # writes (OOM, ridden through) instead of evicting job hashes or registry keys.
    redis = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["redis"]
    conf = redis_conf()
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "always"
    assert conf["maxmemory-policy"] == "noeviction" and conf["maxmemory"].endswith(("mb", "gb"))
    assert conf["aclfile"] == "/run/redis/users.acl" and "requirepass" not in conf
    [entry] = redis["entrypoint"][2:]
    assert "render-acl.sh /etc/redis/users.acl /run/secrets /run/redis/users.acl" in entry
    assert "redis-server /etc/redis/redis.conf" in entry
    mounts = {v.split(":")[1] for v in redis["volumes"] if v.startswith("./")}
    assert mounts == {"/etc/redis/redis.conf", "/etc/redis/users.acl", "/etc/redis/render-acl.sh"}


# -- least privilege, signing, hardening (issue 9) --------------------------------------------------------

COMPOSE_ROLES = {"worker": "worker", "camera": "camera", "gateway": "gateway", "ingest": "ingest", "updater": "updater",
                 "drift": "drift"}


def acl_users() -> set[str]:
    return {line.split()[1] for line in (DEPLOY / "redis" / "users.acl").read_text().splitlines()
            if line.startswith("user ")}


def test_compose_gives_every_service_its_own_redis_user_and_no_password_in_a_url():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(COMPOSE_ROLES.values()) <= acl_users()
    for name, role in COMPOSE_ROLES.items():
        svc = services[name]
        env = svc["environment"]
        assert env["REDIS_URL"] == f"redis://{role}@redis:6379/0", name  # the user; no password
        assert env["REDIS_PASSWORD_FILE"] == "/run/secrets/redis-password"
        [password] = [s for s in svc["secrets"] if isinstance(s, dict) and s.get("target") == "redis-password"]
        assert password["source"] == f"redis-{role}-password" and password["mode"] == 0o400
    # Redis holds every role's password file (rendered into its ACL), and nothing else holds another's.
    for source in compose["secrets"]:
        if source.startswith("redis-"):
            holders = [n for n, svc in services.items() for s in svc.get("secrets", [])
                       if (s if isinstance(s, str) else s["source"]) == source]
            assert set(holders) <= {"redis", source.removeprefix("redis-").removesuffix("-password")}, source
    for name, svc in services.items():
        assert "ports" not in svc or name in ("gateway", "prometheus"), name
        assert svc.get("read_only") is True, name
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    assert services["gateway"]["environment"]["VQ_API_KEY_FILE"]
    assert "user " in (DEPLOY / "redis" / "users.acl").read_text() and not (DEPLOY / "secrets").exists()


def test_signed_by_default_key_only_where_models_are_published():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    holders = {name for name, svc in compose.items()
               if any((s if isinstance(s, str) else s["source"]) == "signing-key" for s in svc.get("secrets", []))}
    assert holders == {"updater"}
    assert compose["updater"]["environment"]["VQ_SIGN_KEY_FILE"] == "/run/secrets/signing.key"
    for name in ("worker", "updater"):
        assert compose[name]["environment"]["VQ_MODEL_PUBKEY"] == "/run/secrets/signing.pub"

    docs = {d["metadata"]["name"]: d for path in (DEPLOY / "k8s").glob("*.yaml") for d in load_all(path)
            if d["kind"] in ("Deployment", "CronJob")}
    for name in ("visionqueue-worker", "visionqueue-update"):
        [container] = _containers(docs[name])
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["VQ_MODEL_PUBKEY"].endswith("/signing.pub"), name
    for name, doc in docs.items():
        for container in _containers(doc):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            spec = (doc["spec"].get("template") or doc["spec"].get("jobTemplate", {}).get("spec", {})
                    .get("template"))["spec"]
            signing = [v for v in spec.get("volumes", []) if v.get("secret", {}).get("secretName") ==
                       "visionqueue-signing-key"]
            assert bool(signing) == (name == "visionqueue-update") == ("VQ_SIGN_KEY_FILE" in env), name
            if signing:
                assert signing[0]["secret"]["defaultMode"] == 0o400


def test_k8s_pods_are_locked_down_and_take_their_redis_password_from_a_file():
    urls = next(d for d in load_all(DEPLOY / "k8s" / "secret.yaml") if d["kind"] == "ConfigMap")["data"]
    assert all("@" in url and ":" not in url.split("//", 1)[1].split("@")[0] for url in urls.values())
    assert set(urls) <= acl_users()
    assert not [d for path in (DEPLOY / "k8s").glob("*.yaml") for d in load_all(path) if d["kind"] == "Secret"]
    seen = 0
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        for doc in load_all(path):
            for container in _containers(doc):
                seen += 1
                spec = (doc["spec"].get("template") or doc["spec"]["jobTemplate"]["spec"]["template"])["spec"]
                assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
                sc = container["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"]["drop"] == ["ALL"]
                env = {e["name"]: e for e in container["env"]}
                assert "envFrom" not in container and "value" not in env["REDIS_URL"]  # from the URL ConfigMap
                assert env["REDIS_PASSWORD_FILE"]["value"] == "/run/secrets/redis/password"
                [vol] = [v for v in spec["volumes"] if v["name"] == "redis-password"]
                assert vol["secret"]["defaultMode"] == 0o400
                assert vol["secret"]["secretName"].removeprefix("visionqueue-redis-") in acl_users()
                assert "$REDIS" not in " ".join(container["command"])  # no credential on a command line
    assert seen == 5


def test_k8s_worker_has_a_liveness_probe_on_its_metrics_port():
    [dep] = load_all(DEPLOY / "k8s" / "worker-gpu.yaml")
    [container] = _containers(dep)
    port = {e["name"]: e["value"] for e in container["env"] if "value" in e}["VQ_METRICS_PORT"]
    [metrics] = [p for p in container["ports"] if p["name"] == "metrics"]
    assert str(metrics["containerPort"]) == port
    assert container["livenessProbe"]["httpGet"]["port"] in ("metrics", int(port))
    assert container["command"][:4] == ["python", "-m", WRAPPER, "exec"] and "-u" not in container["command"]


def test_keda_authenticates_as_its_own_user():
    docs = load_all(DEPLOY / "k8s" / "keda-scaledobject.yaml")
    [auth] = [d for d in docs if d["kind"] == "TriggerAuthentication"]
    params = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert params["username"]["name"] == params["password"]["name"] == "visionqueue-redis-keda"
    assert "keda" in acl_users()
    [scaled] = [d for d in docs if d["kind"] == "ScaledObject"]
    assert scaled["spec"]["triggers"][0]["metadata"]["enableTLS"] in ("true", "false")


def test_image_installs_only_the_hashed_lock_from_pypi_and_runs_as_non_root():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "--extra-index-url" not in dockerfile and "--index-url" not in dockerfile
    assert "pip install --require-hashes --no-deps --no-build-isolation -r /tmp/requirements.lock" in dockerfile
    # An sdist in the lock (grad-cam) is built with the lock's hashed setuptools, installed first,
    # never with build tools pip would fetch unhashed into an isolated build environment.
    build_tools = re.search(r"sed -n '/\^setuptools==/,/# via/p' /tmp/requirements.lock > (\S+)", dockerfile)
    assert build_tools, "the Dockerfile should install the lock's setuptools before the lock"
    assert f"pip install --require-hashes --no-deps -r {build_tools[1]}" in dockerfile
    assert re.search(r"^setuptools==", (DEPLOY / "requirements.lock").read_text(), flags=re.M)
    assert "pip install --no-deps --no-build-isolation ." in dockerfile
    # Every base image ships the Python the project needs (no apt-get of a python3.X a distro lacks).
    bases = re.findall(r"^FROM (\S+)", dockerfile, flags=re.M)
    python = re.search(r"^ARG PYTHON=(\S+)", dockerfile, flags=re.M)[1]
    assert python == "3.11"
    assert all(b.startswith("python:${PYTHON}-") or b.startswith("base-") for b in bases), bases
    run_lines = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in run_lines if "apt-get install" in line and "python3" in line]
    assert re.search(r"^USER 10001", dockerfile, flags=re.M)

    lock = (DEPLOY / "requirements.lock").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", lock, flags=re.M))
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name in ("torch", "torchvision", "rq"):
        assert f'"{name}=={pins[name]}"' in pyproject, name
    blocks = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", lock.split("\n", lock.index("==") and 1)[1])
    assert all("--hash=sha256:" in b for b in blocks if re.match(r"[A-Za-z0-9_.-]+==", b))
    requirements = "\n".join(line for line in lock.splitlines() if not line.lstrip().startswith("#"))
    assert "file://" not in requirements and "--extra-index-url" not in requirements and " @ " not in requirements


IMAGE_EXTRAS = ("worker", "train", "gateway")  # what the image installs; the lock's header names the same


def image_requirements() -> list[Requirement]:
    """pyproject.toml's base dependencies and those of the image's extras, self-references (train's
    visionqueue[worker]) followed."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras, seen, todo = project["optional-dependencies"], set(), list(IMAGE_EXTRAS)
    reqs = [Requirement(r) for r in project["dependencies"]]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in map(Requirement, extras[extra]):
            if canonicalize_name(req.name) == canonicalize_name(project["name"]):
                todo.extend(req.extras)
            else:
                reqs.append(req)
    return reqs


def test_lock_covers_every_dependency_of_the_image_extras_at_its_pinned_version():
    """A dependency added to pyproject.toml but not to the lock is missing from the image (installed
    with --no-deps): every one must be locked, and at a version its specifier allows (== pins exactly)."""
    lock = (DEPLOY / "requirements.lock").read_text()
    pins = {canonicalize_name(n): v for n, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", lock, flags=re.M)}
    linux = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
             "python_version": "3.11", "python_full_version": "3.11.0", "implementation_name": "cpython"}
    reqs = [r for r in image_requirements() if r.marker is None or r.marker.evaluate(linux)]
    names = {canonicalize_name(r.name) for r in reqs}
    assert {"torch", "torchvision", "rq", "torch-pruning", "grad-cam", "cleanlab", "fastapi"} <= names
    missing = sorted(str(r) for r in reqs if canonicalize_name(r.name) not in pins)
    assert not missing, f"not in deploy/requirements.lock (regenerate it, see its header): {missing}"
    wrong = sorted(f"{r} (lock: {pins[canonicalize_name(r.name)]})" for r in reqs
                   if not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True))
    assert not wrong, f"deploy/requirements.lock disagrees with pyproject.toml: {wrong}"


# -- past one Redis: deploy/k8s/shards ------------------------------------------------------------------

SHARDS = DEPLOY / "k8s" / "shards"


def _shard_docs() -> list[dict]:
    return [doc for path in sorted(SHARDS.glob("*.yaml")) for doc in load_all(path)]


def test_each_shard_has_its_worker_and_its_own_keda_trigger_on_its_own_redis():
    from worker.shards import shard_map

    docs = _shard_docs()
    [urls] = [d["data"] for d in docs if d["kind"] == "ConfigMap"
              and d["metadata"]["name"] == "visionqueue-redis-shards"]
    maps = {role: shard_map(value) for role, value in urls.items()}
    assert set(urls) <= acl_users() and len({len(m) for m in maps.values()}) == 1  # every role: the same shards
    hosts = [u.split("@", 1)[1].split("/", 1)[0] for u in maps["worker"].urls]
    for role, m in maps.items():  # the same hosts in the same order (position is identity)
        assert [u.split("@", 1)[1].split("/", 1)[0] for u in m.urls] == hosts, role
    key = FrameQueue(connection=Redis()).key
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    assert len(deployments) == len(scaled) == len(hosts) >= 2
    for i, host in enumerate(hosts):
        [container] = _containers(deployments[f"visionqueue-worker-shard-{i}"])
        env = {e["name"]: e for e in container["env"]}
        assert env["VQ_SHARD"]["value"] == str(i)
        ref = env["REDIS_URLS"]["valueFrom"]["configMapKeyRef"]
        assert ref == {"name": "visionqueue-redis-shards", "key": "worker"}
        assert container["command"][:4] == ["python", "-m", "worker.shards", "exec"]
        assert container["command"][4:6] == ["rq", "worker"] and "-u" not in container["command"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        [trigger] = scaled[f"visionqueue-worker-shard-{i}"]["spec"]["triggers"]
        assert trigger["metadata"]["address"] == host and trigger["metadata"]["listName"] == key
        assert trigger["authenticationRef"]["name"] == "visionqueue-redis-auth"  # keda-scaledobject.yaml's


def test_shard_manifests_are_locked_down_and_their_commands_are_real(subprocess_env):
    seen = 0
    for doc in _shard_docs():
        for container in _containers(doc):
            seen += 1
            spec = (doc["spec"].get("template") or doc["spec"]["jobTemplate"]["spec"]["template"])["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            env = {e["name"]: e for e in container["env"]}
            assert "value" not in env["REDIS_URLS"]
            assert env["REDIS_PASSWORD_FILE"]["value"] == "/run/secrets/redis/password"
            [vol] = [v for v in spec["volumes"] if v["name"] == "redis-password"]
            assert vol["secret"]["defaultMode"] == 0o400
            assert vol["secret"]["secretName"].removeprefix("visionqueue-redis-") in acl_users()
            command = container["command"]
            assert command[:2] == ["python", "-m"]
            module = command[2]
            args = command[3:5] if module == "worker.shards" else command[3:]
            out = subprocess.run([sys.executable, "-m", module, *args[:1], "--help"], capture_output=True, text=True,
                                 cwd=ROOT, env=subprocess_env, timeout=120)
            assert out.returncode == 0, (command, out.stderr)
    assert seen == 4  # three shard workers and the registry mirror


def test_the_drift_monitor_runs_everywhere_as_its_own_user_with_metrics_and_nudges():
    """continual.drift --every is a service in compose, Kubernetes and systemd, scraped by Prometheus."""
    want = ["python", "-m", "continual.drift", "--every", "60", "--metrics-port", "9108", "--nudge"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert compose["services"]["drift"]["command"] == want
    [dep] = load_all(DEPLOY / "k8s" / "drift.yaml")
    [container] = _containers(dep)
    assert container["command"] == want and dep["spec"]["replicas"] == 1
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9108"
    assert {e["name"]: e for e in container["env"]}["REDIS_URL"]["valueFrom"]["configMapKeyRef"]["key"] == "drift"
    unit = (DEPLOY / "systemd" / "visionqueue-drift.service").read_text()
    assert "ExecStart=/opt/visionqueue/.venv/bin/python " + " ".join(want[1:]) in unit
    assert "redis-drift-password" in unit and "signing" not in unit.split("[Unit]")[1]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert any(t == "drift:9108" for job in prometheus["scrape_configs"] for c in job.get("static_configs", [])
               for t in c["targets"])
    assert "user drift on" in (DEPLOY / "redis" / "users.acl").read_text()
