"""trainer data: synthetic set, folder scan (corrupt, grayscale, RGBA, other formats), checks, split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from trainer import synth
from trainer.data import (
    DataError,
    EvalDataset,
    TrainDataset,
    check_dataset,
    load_split,
    make_split,
    save_split,
    scan_folder,
)
from trainer.recipe import train_transform


def _png(rng: np.random.Generator, shape: tuple[int, ...] = (20, 24, 3)) -> bytes:
    return cv2.imencode(".png", rng.integers(0, 256, shape, dtype=np.uint8))[1].tobytes()


def _jpg(rng: np.random.Generator, shape: tuple[int, ...] = (30, 40, 3)) -> bytes:
    return cv2.imencode(".jpg", rng.integers(0, 256, shape, dtype=np.uint8))[1].tobytes()


def _folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, n in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / name / f"{i:03d}.png").write_bytes(_png(rng))
    return root


def test_synth_is_deterministic_by_seed_and_condition(tmp_path: Path) -> None:
    a = synth.generate(tmp_path / "a", 8, seed=3, defect_rate=0.5)
    synth.generate(tmp_path / "b", 8, seed=3, defect_rate=0.5)
    synth.generate(tmp_path / "c", 8, seed=4, defect_rate=0.5)
    synth.generate(tmp_path / "d", 8, seed=3, defect_rate=0.5, condition="night")
    assert a == {"ok": 4, "scratch": 2, "dent": 1, "stain": 1}
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*") if p.suffix != ".json")
    assert len(files) == 8
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    same_seed_other_condition = [(tmp_path / "d" / rel) for rel in files]
    assert all(p.exists() for p in same_seed_other_condition), "labels depend only on seed, n and defect rate"
    assert any((tmp_path / "a" / rel).read_bytes() != (tmp_path / "d" / rel).read_bytes() for rel in files)
    def contents(d: Path) -> set[tuple[str, bytes]]:
        return {(p.name, p.read_bytes()) for p in d.rglob("*.*") if p.suffix != ".json"}

    assert contents(tmp_path / "a") == contents(tmp_path / "b")
    assert contents(tmp_path / "a") != contents(tmp_path / "c")
    meta = json.loads((tmp_path / "a" / "synth.json").read_text())
    assert meta["seed"] == 3 and meta["good_class"] == "ok"


def test_synth_class_counts_follow_defect_rate() -> None:
    labels = synth.class_sequence(2000, 0.6, seed=0)
    assert Counter(labels) == {"ok": 800, "scratch": 400, "dent": 400, "stain": 400}
    with pytest.raises(ValueError):
        synth.class_sequence(10, 1.5, seed=0)


def test_scan_skips_corrupt_files_and_converts_gray_rgba_bmp(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = _folder(tmp_path / "data", {"ok": 4, "bad": 3})
    jpg = _jpg(rng)
    (root / "ok" / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "ok" / "header-only.jpg").write_bytes(jpg[:20])
    (root / "ok" / "empty.png").write_bytes(b"")
    (root / "bad" / "notes.jpg").write_bytes(b"this is not an image")
    (root / "bad" / "gray.png").write_bytes(_png(rng, (20, 24)))
    (root / "bad" / "rgba.png").write_bytes(_png(rng, (20, 24, 4)))
    (root / "bad" / "other.bmp").write_bytes(cv2.imencode(".bmp", rng.integers(0, 256, (18, 22, 3), np.uint8))[1]
                                             .tobytes())
    (root / "bad" / ".hidden.png").write_bytes(b"ignored")

    scan = scan_folder(root)

    assert sorted(p for p, _ in scan.unreadable) == [
        "bad/notes.jpg", "ok/empty.png", "ok/header-only.jpg", "ok/truncated.jpg"]
    assert scan.classes == ["bad", "ok"]
    paths = {s.path for s in scan.samples}
    assert {"bad/gray.png", "bad/rgba.png", "bad/other.bmp"} <= paths
    report = check_dataset(scan)
    assert any("4 unreadable files skipped" in w and "ok/truncated.jpg" in w for w in report.warnings)
    converted = [s for s in scan.samples if s.path in ("bad/gray.png", "bad/rgba.png", "bad/other.bmp")]
    for image, label in EvalDataset(root, converted, (16, 16)):
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8 and label == 0
    train = TrainDataset(root, converted, (16, 16), train_transform((16, 16), (0.5,) * 3, (0.5,) * 3))
    tensor, _ = train[0]
    assert tuple(tensor.shape) == (3, 16, 16)


def test_split_is_stratified_reproducible_and_never_leaks_duplicates(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", {"a": 30, "b": 15, "c": 10})
    rng = np.random.default_rng(9)
    dup = _png(rng)
    for i in range(3):  # the same picture three times in one class
        (root / "a" / f"dup{i}.png").write_bytes(dup)
    conflict = _png(rng)  # the same picture under two classes: a label conflict, dropped
    (root / "b" / "conflict.png").write_bytes(conflict)
    (root / "c" / "conflict.png").write_bytes(conflict)

    scan = scan_folder(root)
    assert scan.conflicts == ["b/conflict.png", "c/conflict.png"]
    assert scan.duplicates == 2
    split = make_split(scan, seed=5)

    counts = split.counts()
    # 31 distinct in a (30 + one duplicated picture): 19/6/6 groups, the duplicate group adds 2 files
    distinct = {part: {s.sha256 for s in split[part] if s.label == 0} for part in ("train", "val", "test")}
    assert [len(distinct[p]) for p in ("train", "val", "test")] == [19, 6, 6]
    assert (counts["train"]["b"], counts["val"]["b"], counts["test"]["b"]) == (9, 3, 3)
    assert (counts["train"]["c"], counts["val"]["c"], counts["test"]["c"]) == (6, 2, 2)
    hashes = {part: {s.sha256 for s in split[part]} for part in ("train", "val", "test")}
    assert not hashes["train"] & hashes["val"] and not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]
    dup_parts = [part for part in ("train", "val", "test") for s in split[part] if s.path.startswith("a/dup")]
    assert len(dup_parts) == 3 and len(set(dup_parts)) == 1

    again = make_split(scan_folder(root), seed=5)
    assert again.parts == split.parts
    other = make_split(scan, seed=6)
    assert other.parts != split.parts
    save_split(split, tmp_path / "split.json")
    loaded = load_split(tmp_path / "split.json")
    assert loaded.parts == split.parts and loaded.classes == split.classes and loaded.root == root.resolve()


def test_checks_report_imbalance_and_too_small_classes(tmp_path: Path) -> None:
    scan = scan_folder(_folder(tmp_path / "imb", {"ok": 40, "rare": 10}))
    report = check_dataset(scan)
    assert report.imbalance == 4.0 and not report.errors
    assert any("beyond 1:3" in w and "--focal-loss" in w and "--balanced-sampling" in w for w in report.warnings)

    small = check_dataset(scan_folder(_folder(tmp_path / "small", {"ok": 10, "tiny": 2})))
    assert small.errors and "tiny (2)" in small.errors[0]


def test_scan_with_model_classes_refuses_unknown_folders(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"ok": 3, "new": 3})
    with pytest.raises(DataError, match="new"):
        scan_folder(root, class_names=["ok", "scratch"])
    scan = scan_folder(root, class_names=["new", "ok", "scratch"])
    assert scan.counts() == {"new": 3, "ok": 3, "scratch": 0}


def test_a_fine_tune_rehearses_a_fresh_balanced_replay_draw_each_epoch(tmp_path: Path) -> None:
    from trainer.config import TrainConfig
    from trainer.data import REPLAY, Sample, Split
    from trainer.train import Data, train_loader

    new = [Sample(f"new/{i}.png", 1, f"n{i}") for i in range(5)]
    # imbalanced buffer: 30 of class 0, 6 each of classes 1-3
    replay = [Sample(f"old/{i}.png", 0 if i < 30 else 1 + (i - 30) % 3, f"o{i}") for i in range(48)]
    split = Split(tmp_path, ["a", "b", "c", "d"], 0, (0.0, 0.0, 0.0), {"train": new, REPLAY: replay, "val": [],
                                                                        "test": []})
    assert split.fit_samples() == new + replay  # what int8 calibration sees
    data = Data(split, TrainDataset(tmp_path, split.fit_samples(), (8, 8), lambda t: t), None)
    config = TrainConfig(out=tmp_path, replay_per_epoch=12, batch_size=4)

    seen: set[int] = set()
    draws = []
    for epoch in range(1, 6):
        indices = data.epoch_indices(config, epoch)
        assert indices is not None and indices[:5] == list(range(5))  # every new sample, every epoch
        drawn = indices[5:]
        assert len(drawn) == len(set(drawn)) == 12 and all(5 <= i < 53 for i in drawn)
        assert Counter(data.train_set.samples[i].label for i in drawn) == {0: 3, 1: 3, 2: 3, 3: 3}
        assert data.epoch_indices(config, epoch) == indices  # a pure function of (seed, epoch)
        draws.append(drawn)
        seen |= set(drawn)
    assert len({tuple(d) for d in draws}) == 5 and len(seen) > 24  # fresh draws cover more than one epoch's
    assert len(train_loader(data, config, 1)) == 4  # 17 in batches of 4: a last batch of one is dropped (BN)
    assert data.epoch_indices(TrainConfig(out=tmp_path), 1) is None  # default: the whole buffer
    assert data.epoch_indices(TrainConfig(out=tmp_path, replay_per_epoch=48), 1) is None
