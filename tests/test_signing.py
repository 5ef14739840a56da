"""Signed models: keygen, signed publish, workers that pin a key refuse everything else."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import zlib

import pytest
from conftest import wait_for
from helpers import ROOT, OutputTail, metric_value, served_by, start_worker, stop_worker, tiny_artifact

from worker.artifact import SIGNATURE_FILE
from worker.model_source import current_artifact
from worker.redis_server import free_port
from worker.registry import ModelRegistry
from worker.settings import Settings, SettingsError
from worker.signing import SignatureError, SigningError, canonical_manifest, generate_keypair, parse_public_keys


def registry_cli(redis_url, env, *args):
    return subprocess.run([sys.executable, "-m", "worker.registry", "--redis-url", redis_url, *args],
                          capture_output=True, text=True, cwd=ROOT, env=env)


@pytest.fixture
def unsigned_env(subprocess_env, monkeypatch):
    """No signing key or pinned key leaks in from the environment running the tests."""
    for name in ("VQ_SIGN_KEY_FILE", "VQ_MODEL_PUBKEY"):
        monkeypatch.delenv(name, raising=False)
        subprocess_env.pop(name, None)
    return subprocess_env


def test_keygen_writes_a_private_key_0600_and_a_public_key(tmp_path, redis_url, unsigned_env):
    out = registry_cli(redis_url, unsigned_env, "keygen", "--out", str(tmp_path / "keys"))
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    private, public = tmp_path / "keys" / "signing.key", tmp_path / "keys" / "signing.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    # The same key whichever way a worker is given it: file, inline PEM, raw base64.
    [key] = parse_public_keys(str(public))
    assert parse_public_keys(public.read_text()) == (key,) == parse_public_keys(info["public_key_b64"])
    assert info["public_key_b64"] == key
    # Never overwrites a key.
    again = registry_cli(redis_url, unsigned_env, "keygen", "--out", str(tmp_path / "keys"))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    # A private key is not a trusted key; a bad setting names its variable.
    with pytest.raises(SigningError, match="private key"):
        parse_public_keys(str(private))
    with pytest.raises(SettingsError, match="VQ_MODEL_PUBKEY: 'not-a-key' is neither a readable file nor"):
        Settings.from_env({"VQ_MODEL_PUBKEY": "not-a-key"})
    _, other = generate_keypair(tmp_path / "other")
    both = Settings.from_env({"VQ_MODEL_PUBKEY": f"{public},{other}"}).model_pubkeys
    assert len(both) == 2 and both[0] == key


def test_publish_signs_and_list_shows_signed_and_valid(tmp_path, redis_url, redis_conn, unsigned_env):
    private, public = generate_keypair(tmp_path / "keys")
    signed = registry_cli(redis_url, unsigned_env, "publish", str(tiny_artifact(tmp_path / "a")),
                          "--sign-key", str(private))
    assert signed.returncode == 0, signed.stderr
    unsigned = registry_cli(redis_url, unsigned_env, "publish", str(tiny_artifact(tmp_path / "b")), "--no-promote")
    assert unsigned.returncode == 0, unsigned.stderr
    v1, v2 = signed.stdout.strip(), unsigned.stdout.strip()

    rows = {r["version"]: r for r in map(json.loads, registry_cli(redis_url, unsigned_env, "list").stdout.splitlines())}
    assert rows[v1]["signed"] is True and rows[v2]["signed"] is False
    assert "signature_valid" not in rows[v1]  # no key configured: nothing to say about validity

    pinned = {**unsigned_env, "VQ_MODEL_PUBKEY": str(public)}
    rows = {r["version"]: r for r in map(json.loads, registry_cli(redis_url, pinned, "list").stdout.splitlines())}
    assert rows[v1]["signature_valid"] is True and rows[v1]["signed_by"]
    assert rows[v2]["signature_valid"] is False
    assert registry_cli(redis_url, pinned, "verify", v1).returncode == 0
    refused = registry_cli(redis_url, pinned, "verify", v2)
    assert refused.returncode == 3 and "is not signed" in refused.stderr

    # The signature is over the canonical manifest that is stored.
    reg = ModelRegistry(redis_conn)
    assert redis_conn.get(f"vq:models:v:{v1}:manifest") == canonical_manifest(reg.manifest(v1))
    assert len(reg.signature(v1)) == 64 and reg.signature(v2) is None


def test_library_publish_signs_with_VQ_SIGN_KEY_FILE(tmp_path, redis_conn, unsigned_env, monkeypatch):
    private, public = generate_keypair(tmp_path / "keys")
    trusted = parse_public_keys(str(public))
    monkeypatch.setenv("VQ_SIGN_KEY_FILE", str(private))
    reg = ModelRegistry(redis_conn, keep=2)
    version = reg.publish(tiny_artifact(tmp_path / "a"))  # what trainer.train --publish and continual.update call
    assert reg.verify(version, trusted)
    fetched = reg.fetch(version, tmp_path / "cache", trusted_keys=trusted)
    assert (fetched / SIGNATURE_FILE).read_bytes() == reg.signature(version)
    # Pruning removes the signature with the rest of the version.
    reg.publish(tiny_artifact(tmp_path / "b"))
    reg.publish(tiny_artifact(tmp_path / "c"))
    assert version not in reg.versions()
    assert redis_conn.exists(*reg.version_keys(version)) == 0


def _tamper_float_with_recomputed_sha(conn, version):
    """The attack on main: change the weights and write their new sha256 into the manifest."""
    key = f"vq:models:v:{version}:float"
    weights = bytearray(zlib.decompress(conn.get(key)))
    weights[-1] ^= 0xFF
    conn.set(key, zlib.compress(bytes(weights)))
    mkey = f"vq:models:v:{version}:manifest"
    manifest = json.loads(conn.get(mkey))
    manifest["files"]["weights.safetensors"]["sha256"] = hashlib.sha256(weights).hexdigest()
    conn.set(mkey, json.dumps(manifest))


def test_fetch_requires_a_valid_signature_before_writing_anything(tmp_path, redis_conn, unsigned_env):
    private, public = generate_keypair(tmp_path / "keys")
    other_private, other_public = generate_keypair(tmp_path / "other")
    trusted = parse_public_keys(str(public))
    reg = ModelRegistry(redis_conn)
    cache = tmp_path / "cache"

    unsigned = reg.publish(tiny_artifact(tmp_path / "u"), promote=False)
    with pytest.raises(SignatureError, match="is not signed"):
        reg.fetch(unsigned, cache, trusted_keys=trusted)
    assert not (cache / unsigned).exists()

    by_other = reg.publish(tiny_artifact(tmp_path / "o"), promote=False, sign_key=other_private)
    with pytest.raises(SignatureError, match="no valid signature from a trusted key"):
        reg.fetch(by_other, cache, trusted_keys=trusted)
    # During a rotation a worker trusts both keys.
    both = parse_public_keys(f"{public},{other_public}")
    assert reg.fetch(by_other, cache, trusted_keys=both).is_dir()

    tampered = reg.publish(tiny_artifact(tmp_path / "t"), promote=False, sign_key=private)
    assert reg.fetch(tampered, tmp_path / "before", trusted_keys=trusted).is_dir()
    _tamper_float_with_recomputed_sha(redis_conn, tampered)
    reg.fetch(tampered, tmp_path / "unpinned", include_float=True)  # checksums alone no longer catch it
    with pytest.raises(SignatureError, match="no valid signature"):
        reg.fetch(tampered, cache, trusted_keys=trusted)
    assert not (cache / tampered).exists()

    # A signed manifest replayed under another version name is not that version.
    good = reg.publish(tiny_artifact(tmp_path / "g"), promote=False, sign_key=private)
    redis_conn.set("vq:models:v:replayed-1:manifest", redis_conn.get(f"vq:models:v:{good}:manifest"))
    redis_conn.set("vq:models:v:replayed-1:signature", reg.signature(good))
    redis_conn.zadd(reg.versions_key, {"replayed-1": 0})
    with pytest.raises(ValueError, match="holds the manifest of"):
        reg.fetch("replayed-1", cache, trusted_keys=trusted)

    # A pinned local artifact (VQ_MODEL_PATH) is held to the same key: it must carry manifest.sig.
    local = Settings(model_path=tmp_path / "g", model_pubkeys=trusted)
    with pytest.raises(SignatureError, match="is not signed"):
        current_artifact(local, None)
    fetched = reg.fetch(good, tmp_path / "signed-copy", trusted_keys=trusted)
    assert current_artifact(Settings(model_path=fetched, model_pubkeys=trusted), None) == fetched


def test_worker_pinning_a_key_refuses_tampered_and_unsigned_versions_and_keeps_serving(
        tmp_path, redis_url, redis_conn, unsigned_env):
    private, public = generate_keypair(tmp_path / "keys")
    reg = ModelRegistry(redis_conn)
    v1 = reg.publish(tiny_artifact(tmp_path / "v1"), sign_key=private)
    port = free_port()
    proc = start_worker(redis_url, unsigned_env, "w-signed", VQ_MODEL_CACHE=str(tmp_path / "cache"),
                        VQ_SWAP_POLL_S="0.5", VQ_METRICS_PORT=str(port), VQ_MODEL_PUBKEY=str(public))
    out = OutputTail(proc)
    refused = 'vq_model_swaps_total{outcome="refused"}'
    try:
        assert served_by(redis_conn, 0, timeout=120) == v1

        # 1. A signed version whose weights are swapped in Redis, sha256 recomputed in the manifest.
        v2 = reg.publish(tiny_artifact(tmp_path / "v2"), promote=False, sign_key=private)
        _tamper_float_with_recomputed_sha(redis_conn, v2)
        reg.promote(v2)
        wait_for(lambda: metric_value(port, refused) == 1.0, timeout=60, what="v2 refused")
        assert served_by(redis_conn, 1) == v1

        # 2. An unsigned publish by anyone who can write Redis.
        v3 = reg.publish(tiny_artifact(tmp_path / "v3"))
        wait_for(lambda: metric_value(port, refused) == 2.0, timeout=60, what="v3 refused")
        assert served_by(redis_conn, 2) == v1
        log = out.text()
        assert "model refused" in log and "is not signed" in log and "no valid signature from a trusted key" in log

        # 3. A properly signed version is taken: the pin refuses only what it should.
        v4 = reg.publish(tiny_artifact(tmp_path / "v4"), sign_key=private)
        wait_for(lambda: served_by(redis_conn, 3) == v4, timeout=60, what="v4 serving")
        assert metric_value(port, refused) == 2.0
        assert not any((tmp_path / "cache" / v).exists() for v in (v2, v3))  # refused before any write
    finally:
        stop_worker(proc)
    assert os.path.isdir(tmp_path / "cache" / v4)
