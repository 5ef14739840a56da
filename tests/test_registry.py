"""Artifact format and the Redis model registry."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT, start_worker, tiny_artifact

from worker.artifact import ArtifactError, load_for_serving, read_manifest
from worker.registry import ModelRegistry, RegistryError


def test_publish_current_fetch_round_trip(tmp_path, redis_conn):
    artifact = tiny_artifact(tmp_path / "a", int8=True)
    reg = ModelRegistry(redis_conn)
    version = reg.publish(artifact)
    assert reg.current() == version
    cpu = reg.fetch(version, tmp_path / "cache")
    # A CPU worker fetches only the int8 state; the float weights stay in Redis for the updater.
    assert sorted(p.name for p in cpu.iterdir()) == ["int8.safetensors", "manifest.json"]
    served = load_for_serving(cpu)
    assert served.precision == "int8" and served.version == version
    full = reg.fetch(version, tmp_path / "cache2", include_float=True)
    assert (full / "weights.safetensors").read_bytes() == (artifact / "weights.safetensors").read_bytes()


def test_promote_rollback_and_prune_keep_current_and_predecessor(tmp_path, redis_conn):
    reg = ModelRegistry(redis_conn, keep=2)
    versions = [reg.publish(tiny_artifact(tmp_path / f"a{i}")) for i in range(2)]
    reg.promote(versions[0])
    # Three publications without promotion: the current one and its predecessor survive pruning.
    for i in range(2, 5):
        reg.publish(tiny_artifact(tmp_path / f"a{i}"), promote=False)
    kept = reg.versions()
    assert versions[0] in kept and versions[1] in kept and len(kept) == 2
    assert reg.rollback() == versions[1]
    assert reg.current() == versions[1]
    with pytest.raises(RegistryError, match="not in the registry"):
        reg.promote("nope")


def test_corrupt_artifacts_are_refused(tmp_path, redis_conn):
    artifact = tiny_artifact(tmp_path / "a")
    blob = bytearray((artifact / "weights.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (artifact / "weights.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=r"checksum mismatch for weights\.safetensors"):
        ModelRegistry(redis_conn).publish(artifact)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_for_serving(artifact)


def test_manifest_class_count_mismatch_and_missing_file(tmp_path):
    artifact = tiny_artifact(tmp_path / "a")
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["num_classes"] = 5
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="class count mismatch"):
        read_manifest(artifact)
    other = tiny_artifact(tmp_path / "b")
    (other / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"missing weights\.safetensors"):
        load_for_serving(other)


def test_weights_for_another_class_count_are_refused(tmp_path):
    artifact = tiny_artifact(tmp_path / "a")
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["class_names"] = ["a", "b", "c"]
    manifest["num_classes"] = 3
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not fit the architecture"):
        load_for_serving(artifact)


def test_worker_refuses_a_tampered_registry_model(tmp_path, redis_url, redis_conn, subprocess_env):
    reg = ModelRegistry(redis_conn)
    version = reg.publish(tiny_artifact(tmp_path / "a"))
    key = f"vq:models:v:{version}:float"
    import zlib

    data = bytearray(zlib.decompress(redis_conn.get(key)))
    data[-1] ^= 0xFF
    redis_conn.set(key, zlib.compress(bytes(data)))
    proc = start_worker(redis_url, subprocess_env, "w-tampered", VQ_MODEL_CACHE=str(tmp_path / "cache"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "checksum mismatch" in out


def test_registry_cli(tmp_path, redis_url, subprocess_env):
    artifact = tiny_artifact(tmp_path / "a")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "worker.registry", "--redis-url", redis_url, *args],
                              capture_output=True, text=True, cwd=ROOT, env=subprocess_env)

    published = cli("publish", str(artifact))
    assert published.returncode == 0, published.stderr
    version = published.stdout.strip()
    assert cli("current").stdout.strip() == version
    [row] = [json.loads(line) for line in cli("list").stdout.splitlines()]
    assert row["version"] == version and row["current"] and row["arch"] == "resnet18"
    assert "not in the registry" in cli("promote", "missing").stderr
