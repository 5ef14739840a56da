"""Artifact format and the Redis model registry."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys

import pytest
from conftest import wait_for
from helpers import ROOT, OutputTail, rewrite_manifest, served_by, start_worker, stop_worker, tiny_artifact

from worker.artifact import ArtifactError, load_for_serving, read_manifest
from worker.model_source import NoModelError, current_artifact, load_engine
from worker.registry import InvalidVersionError, ModelRegistry, RegistryError
from worker.settings import Settings


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
    with pytest.raises(ArtifactError, match=r"checksum mismatch for \S*weights\.safetensors"):
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


def test_a_worker_that_cannot_start_says_why_in_one_line_naming_the_setting(tmp_path, redis_url, subprocess_env):
    artifact = tiny_artifact(tmp_path / "a")
    weights = artifact / "weights.safetensors"
    cut = weights.read_bytes()[:40]  # a copy cut short, its manifest's checksum updated to match
    weights.write_bytes(cut)
    digest = hashlib.sha256(cut).hexdigest()
    rewrite_manifest(artifact, lambda m: m["files"]["weights.safetensors"].update(sha256=digest))
    proc = start_worker(redis_url, subprocess_env, "w-cut", VQ_MODEL_PATH=str(artifact))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"no model to serve from VQ_MODEL_PATH={artifact}" in out and "not a readable safetensors file" in out
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_worker(redis_url, subprocess_env, "w-port", VQ_MODEL_PATH=str(tiny_artifact(tmp_path / "b")),
                            VQ_METRICS_PORT=str(port))
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"VQ_METRICS_PORT={port}: cannot listen there" in out


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


# -- the registry's data is data ------------------------------------------------------------------
def bad_versions(tmp_path):
    return ["../x", "/tmp/x", str(tmp_path / "victim"), "*", "?", "[ab]", "a/b", "..", "x..y", "v 1", "a:b",
            "", "-x", "v\n", "a" * 65]


def plant_manifest(reg: ModelRegistry, artifact, change) -> tuple[str, str]:
    """Publish `artifact`, then rewrite its stored manifest with `change`, as someone with Redis access could."""
    version = reg.publish(artifact)
    key = f"vq:models:v:{version}:manifest"
    planted = json.loads(reg.conn.get(key))
    change(planted)
    reg.conn.set(key, json.dumps(planted))
    return version, key


def test_path_like_and_glob_versions_are_refused_everywhere(tmp_path, redis_conn):
    reg = ModelRegistry(redis_conn)
    good = reg.publish(tiny_artifact(tmp_path / "a"))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "label.json").write_text("precious")
    cache = tmp_path / "cache"
    for bad in bad_versions(tmp_path):
        for call in (reg.promote, reg.manifest, lambda v: reg.fetch(v, cache), lambda v: reg.rollback(to=v)):
            with pytest.raises(InvalidVersionError, match="not a valid model version"):
                call(bad)
        assert not reg.exists(bad)
    assert reg.current() == good and reg.versions() == [good]
    assert (victim / "label.json").read_text() == "precious"
    assert not cache.exists() or sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == []

    # An artifact whose manifest names itself like a path is refused at publish.
    artifact = tiny_artifact(tmp_path / "b")
    for bad in ("../x", "/tmp/x", "*"):
        rewrite_manifest(artifact, lambda m, bad=bad: m.update(version=bad))
        with pytest.raises(ArtifactError, match="not a valid model version"):
            reg.publish(artifact)
    assert reg.versions() == [good]


def test_a_current_pointer_that_is_a_path_is_refused_and_touches_nothing(tmp_path, redis_url, redis_conn,
                                                                         subprocess_env):
    reg = ModelRegistry(redis_conn)
    v1 = reg.publish(tiny_artifact(tmp_path / "a"))
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "frame.jpg").write_bytes(b"a captured frame")
    settings = Settings(model_cache=tmp_path / "cache", device="cpu")
    for planted in (str(samples), "../samples", "*"):
        redis_conn.set(reg.current_key, planted)
        with pytest.raises(InvalidVersionError, match=r"current pointer .* is not a valid model version"):
            reg.current()
        with pytest.raises(InvalidVersionError):
            current_artifact(settings, redis_conn)
    assert (samples / "frame.jpg").read_bytes() == b"a captured frame"  # main rmtree'd this directory
    cli = subprocess.run([sys.executable, "-m", "worker.registry", "--redis-url", redis_url, "current"],
                         capture_output=True, text=True, cwd=ROOT, env=subprocess_env)
    assert cli.returncode == 2 and "is not a valid model version" in cli.stderr
    # list still works, and rollback --to repairs the pointer.
    assert [r["version"] for r in reg.describe()] == [v1]
    assert reg.rollback(to=v1) == v1 and reg.current() == v1


def test_a_glob_version_planted_in_the_registry_cannot_prune_the_others(tmp_path, redis_conn):
    reg = ModelRegistry(redis_conn, keep=2)
    v1 = reg.publish(tiny_artifact(tmp_path / "a1", int8=True))
    # Planted as the oldest version: main's prune built `vq:models:v:*:*` from it and deleted everything.
    redis_conn.zadd(reg.versions_key, {"*": 0})
    redis_conn.set("vq:models:v:*:manifest", b"{}")
    v2 = reg.publish(tiny_artifact(tmp_path / "a2", int8=True))
    v3 = reg.publish(tiny_artifact(tmp_path / "a3", int8=True))
    assert reg.versions() == [v2, v3]
    assert redis_conn.zscore(reg.versions_key, "*") is None
    assert list(redis_conn.scan_iter(match=f"vq:models:v:{v1}:*")) == []  # every key of the pruned version
    for version in (v2, v3):
        assert redis_conn.exists(*reg.version_keys(version)) == 3  # manifest, float, int8 (no signature)
        assert reg.fetch(version, tmp_path / "cache", include_float=True).is_dir()


def test_out_of_cache_file_names_are_refused(tmp_path, redis_conn):
    artifact = tiny_artifact(tmp_path / "a", int8=True)
    original = (artifact / "manifest.json").read_text()
    escape = tmp_path / "escape"
    for name in ("/abs/x", "../x", str(escape), "int8.safetensors/../../x", "sub/int8.safetensors", "manifest.json"):
        (artifact / "manifest.json").write_text(original)

        def rename(m, name=name):
            m["files"][name] = m["files"].pop("int8.safetensors")
            m["quantization"]["file"] = name

        rewrite_manifest(artifact, rename)
        with pytest.raises(ArtifactError, match="not an allowed artifact file name"):
            read_manifest(artifact)
    (artifact / "manifest.json").write_text(original)

    # The same manifest planted in Redis under a valid version: fetch writes nothing, anywhere.
    reg = ModelRegistry(redis_conn)

    def escape_files(planted):
        planted["files"][str(escape)] = planted["files"].pop("int8.safetensors")
        planted["quantization"]["file"] = str(escape)

    version, key = plant_manifest(reg, artifact, escape_files)
    cache = tmp_path / "cache"
    with pytest.raises(ArtifactError, match="not an allowed artifact file name"):
        reg.fetch(version, cache)
    assert not escape.exists() and not (cache / version).exists()

    # A symlink planted where the version's cache directory goes is replaced, never followed.
    redis_conn.set(key, json.dumps(json.loads(original)))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("precious")
    cache.mkdir()
    (cache / version).symlink_to(victim, target_is_directory=True)
    target = reg.fetch(version, cache)
    assert not target.is_symlink() and (target / "int8.safetensors").is_file()
    assert sorted(p.name for p in victim.iterdir()) == ["keep"]


ABSURD = [
    ("input_size", lambda m: m.update(input_size=[100_000, 100_000]), "input_size"),
    ("input_size 0", lambda m: m.update(input_size=[0, 32]), "input_size"),
    ("input_size bool", lambda m: m.update(input_size=[True, 32]), "input_size"),
    ("NaN temperature", lambda m: m.update(temperature=float("nan")), "temperature"),
    ("inf temperature", lambda m: m.update(temperature=float("inf")), "temperature"),
    ("negative temperature", lambda m: m.update(temperature=-1.0), "temperature"),
    ("string temperature", lambda m: m.update(temperature="1"), "temperature"),
    ("std 0", lambda m: m["normalization"].update(std=[0.0, 0.0, 0.0]), "std"),
    ("std NaN", lambda m: m["normalization"].update(std=[float("nan")] * 3), "std"),
    ("mean inf", lambda m: m["normalization"].update(mean=[float("inf")] * 3), "mean"),
    ("100k classes", lambda m: m.update(class_names=[f"c{i}" for i in range(100_000)], num_classes=100_000),
     "class_names has 100000 entries"),
    ("long class name", lambda m: m["class_names"].__setitem__(0, "x" * 10_000), "class names"),
    ("arch path", lambda m: m.update(arch="../../evil"), "arch"),
    ("unknown precision", lambda m: m.update(precision="int4"), "precision"),
    ("bad sha256", lambda m: m["files"]["weights.safetensors"].update(sha256="zz"), "sha256"),
    ("quantization not an object", lambda m: m.update(quantization="int8.safetensors"), "quantization"),
]


def test_absurd_manifests_are_refused(tmp_path, redis_conn):
    artifact = tiny_artifact(tmp_path / "a")
    original = (artifact / "manifest.json").read_text()
    for label, change, message in ABSURD:
        (artifact / "manifest.json").write_text(original)
        rewrite_manifest(artifact, change)
        with pytest.raises(ArtifactError, match=message):
            read_manifest(artifact)
            pytest.fail(f"{label}: accepted")
    (artifact / "manifest.json").write_text(original)
    # A manifest past the size bound is refused before it is parsed.
    (artifact / "manifest.json").write_text(original[:-2] + ', "pad": "' + "x" * (2 * 1024**2) + '"}')
    with pytest.raises(ArtifactError, match="larger than"):
        read_manifest(artifact)

    # Planted in Redis: fetch refuses before anything is written (or allocated).
    (artifact / "manifest.json").write_text(original)
    reg = ModelRegistry(redis_conn)
    version, _ = plant_manifest(reg, artifact, lambda planted: planted.update(input_size=[1_000_000, 1_000_000]))
    with pytest.raises(ArtifactError, match=r"input_size must be \[height, width\], each an integer in \[16, 2048\]"):
        reg.fetch(version, tmp_path / "cache")
    assert not (tmp_path / "cache" / version).exists()


def test_bootstrap_falls_back_along_history_in_process(tmp_path, redis_conn):
    reg = ModelRegistry(redis_conn)
    v1 = reg.publish(tiny_artifact(tmp_path / "a1"))
    v2 = reg.publish(tiny_artifact(tmp_path / "a2"))
    settings = Settings(model_cache=tmp_path / "cache", device="cpu", torch_threads=1, decode_threads=1)
    # current points at a path: the newest valid entry of the history serves.
    redis_conn.set(reg.current_key, "/var/lib/visionqueue/samples")
    redis_conn.lpush(reg.history_key, "../../etc")
    engine = load_engine(settings, redis_conn)
    try:
        assert engine.version == v2
    finally:
        engine.close()
    # Every version broken (and no cached copy): a clear error naming what was refused and what was tried.
    settings = Settings(model_cache=tmp_path / "cache2", device="cpu", torch_threads=1, decode_threads=1)
    reg.promote(v2)
    for version in (v1, v2):
        key = f"vq:models:v:{version}:float"
        redis_conn.set(key, redis_conn.get(key)[:-64] + b"\x78" * 64)
    with pytest.raises(NoModelError, match=f"no earlier promoted version loads \\(tried: {v1}\\)"):
        load_engine(settings, redis_conn)


def test_worker_starts_on_the_previous_version_when_current_is_absurd(tmp_path, redis_url, redis_conn,
                                                                      subprocess_env):
    reg = ModelRegistry(redis_conn)
    v1 = reg.publish(tiny_artifact(tmp_path / "a1"))
    v2 = reg.publish(tiny_artifact(tmp_path / "a2"))
    # main: every worker allocated a 32 x 3 x 100000 x 100000 warm-up batch and was OOM-killed, in a loop.
    key = f"vq:models:v:{v2}:manifest"
    planted = json.loads(redis_conn.get(key))
    planted["input_size"] = [100_000, 100_000]
    redis_conn.set(key, json.dumps(planted))
    proc = start_worker(redis_url, subprocess_env, "w-fallback", VQ_MODEL_CACHE=str(tmp_path / "cache"),
                        VQ_SWAP_POLL_S="0.5")
    out = OutputTail(proc)
    try:
        assert served_by(redis_conn, 0, timeout=120) == v1
        assert "falling back along the promotion history" in out.text()
        assert "SERVING AN EARLIER VERSION" in out.text()
        # The watcher tries current again, refuses it (counted there) and keeps serving v1.
        wait_for(lambda: "model refused" in out.text(), timeout=30, what="the watcher's refusal of v2")
        assert served_by(redis_conn, 1) == v1
        assert reg.current() == v2  # the worker reads the registry; it never rewrites it
        # A current pointer planted as a path while it runs: refused, nothing touched, v1 serves on.
        samples = tmp_path / "samples"
        samples.mkdir()
        (samples / "frame.jpg").write_bytes(b"a captured frame")
        redis_conn.set(reg.current_key, str(samples))
        redis_conn.publish(reg.events_channel, json.dumps({"event": "promote", "version": str(samples)}))
        wait_for(lambda: f"the registry's current pointer '{samples}' is not a valid model version" in out.text(),
                 timeout=30, what="the planted pointer refused")
        assert served_by(redis_conn, 2) == v1
        assert (samples / "frame.jpg").read_bytes() == b"a captured frame"
    finally:
        stop_worker(proc)


def test_a_version_that_lost_its_files_is_never_made_current(tmp_path, redis_conn):
    reg = ModelRegistry(redis_conn)
    first = reg.publish(tiny_artifact(tmp_path / "a"))
    second = reg.publish(tiny_artifact(tmp_path / "b"))
    assert reg.current() == second
    redis_conn.delete(f"vq:models:v:{first}:float")  # evicted, a partial restore, a hand-made mistake
    with pytest.raises(RegistryError, match=r"cannot be made current: its weights\.safetensors is gone"):
        reg.promote(first)
    with pytest.raises(RegistryError, match="no earlier promoted version"):
        reg.rollback()
    assert reg.current() == second and reg.history()[0] == second
    redis_conn.delete(f"vq:models:v:{first}:manifest")
    with pytest.raises(RegistryError, match="its manifest"):
        reg.rollback(first)
    assert reg.rollback(second) == second and reg.history()[0] == second  # to itself: history kept
