"""Deployment files: they parse, the KEDA trigger watches the real queue key, and every command in
them is a real CLI with real flags. (No container engine or cluster here: images are not built and
manifests are not applied; this is what can be checked without them.)"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT
from redis import Redis

from worker.jobs import FrameQueue

DEPLOY = ROOT / "deploy"


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
        words = [w for w in words if w not in ("exec",)]
        for i, w in enumerate(words):
            if w.endswith("python") and words[i + 1:i + 2] == ["-m"]:
                calls.append(words[i + 2:])
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
