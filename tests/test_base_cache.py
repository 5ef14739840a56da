"""The demo's base-model cache: keyed by what decides the model, restored with its split re-rooted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy import base_cache


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home" / ".cache"


def fake_run(run: Path, data_root: Path) -> None:
    (run / "artifact").mkdir(parents=True)
    (run / "artifact" / "manifest.json").write_text(json.dumps({"version": "v1"}))
    (run / "checkpoint.pt").write_bytes(b"x" * 100)
    (run / "result.json").write_text(json.dumps({"test_accuracy": 0.9}))
    (run / "split.json").write_text(json.dumps({"root": str(data_root), "splits": {}}))


def test_key_follows_the_recipe_and_the_data() -> None:
    a = base_cache.cache_key(["--epochs", "16"], {"set": ["default", 0, 1400]})
    assert a == base_cache.cache_key(["--epochs", "16"], {"set": ["default", 0, 1400]})
    assert a != base_cache.cache_key(["--epochs", "17"], {"set": ["default", 0, 1400]})
    assert a != base_cache.cache_key(["--epochs", "16"], {"set": ["default", 1, 1400]})


def test_round_trip_rewrites_the_split_root_and_drops_checkpoints(tmp_path: Path, cache_home: Path) -> None:
    fake_run(tmp_path / "first" / "run", tmp_path / "first" / "train")
    key = "k1"
    assert not base_cache.restore(key, tmp_path / "second" / "run", tmp_path / "second" / "train")

    kept = base_cache.store(key, tmp_path / "first" / "run")
    assert kept.parent == cache_home / "visionqueue" / "demo-base"
    assert not (kept / "checkpoint.pt").exists()
    assert [p.name for p in kept.parent.iterdir()] == [key]  # no temporary folder left behind

    target = tmp_path / "second" / "run"
    assert base_cache.restore(key, target, tmp_path / "second" / "train")
    assert json.loads((target / "split.json").read_text())["root"] == str((tmp_path / "second" / "train").resolve())
    assert json.loads((target / "artifact" / "manifest.json").read_text()) == {"version": "v1"}


def test_a_half_written_entry_is_not_a_hit(tmp_path: Path, cache_home: Path) -> None:
    (cache_home / "visionqueue" / "demo-base" / "k2" / "artifact").mkdir(parents=True)
    assert not base_cache.restore("k2", tmp_path / "run", tmp_path / "train")


def test_a_synthetic_set_is_rendered_once_then_restored_byte_for_byte(tmp_path: Path, cache_home: Path) -> None:
    from deploy.demo import synthesize

    sets = {"a": ("night", 2, 6), "b": ("default", 3, 4)}
    synthesize(tmp_path / "first", sets)
    cached = cache_home / "visionqueue" / "demo-data"
    assert sorted(p.name for p in cached.iterdir()) == sorted(base_cache.data_key(spec) for spec in sets.values())
    assert base_cache.data_key(["night", 2, 6]) != base_cache.data_key(["night", 2, 7])

    synthesize(tmp_path / "second", sets)  # restored: hard links to the cached files (same file system here)
    synthesize(tmp_path / "third", sets, use_cache=False)  # rendered again
    for name, spec in sets.items():
        restored = sorted(p.relative_to(tmp_path / "second") for p in (tmp_path / "second" / name).rglob("*.*"))
        assert len(restored) == spec[2] + 1  # the images and synth.json
        for rel in restored:
            assert (tmp_path / "second" / rel).stat().st_ino == (cached / base_cache.data_key(spec)
                                                                  / rel.relative_to(name)).stat().st_ino
            assert (tmp_path / "second" / rel).read_bytes() == (tmp_path / "third" / rel).read_bytes()
