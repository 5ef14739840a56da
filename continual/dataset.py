"""The data one update trains and judges on, as a trainer split over a run-local root.

    RUN/data/base  -> the original training data (its split.json: CONTINUAL_BASE_SPLIT / --base-split)
    RUN/data/store -> the sample store's images

- train: new labels from the store's train share (80 %, by content hash)
- replay: a class-balanced buffer from earlier data (the original train split and store samples used
  by earlier updates), so the model learns the new conditions without forgetting the old ones. The
  trainer rehearses a fresh class-balanced draw of it each epoch (--replay-per-epoch), beside every
  new sample.
- val: the rest of the new train-share labels + a class-balanced slice of the original val split
  (early stopping and temperature scaling see both worlds).
- test: the original holdout + the new holdout; the gate reads them separately. The original holdout
  is the original test split, plus the original val images this update does not validate on, plus
  the holdout labels of earlier updates: every original image that neither model trained on and this
  update's checkpoint choice did not see. The gate allows a 1-point drop there; on the demo's 280
  test images alone, a 3-image wobble refused 2 of 20 candidates that were better on unseen frames
  (README, "The demo"), and the unused val images nearly double the count. They did choose the
  current model's checkpoint once, which can only favour it: the check stays conservative.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from trainer.data import REPLAY, Sample, Split, balanced_subset, load_split, save_split
from worker.artifact import class_name_problem

from .store import SampleStore, StoredSample

VAL_PCT = 20
log = structlog.get_logger("continual.dataset")


@dataclass
class UpdateData:
    split: Split
    classes: list[str]
    new_classes: list[str]
    original_holdout: list[Sample]
    new_holdout: list[Sample]
    stations: dict[str, str] = field(default_factory=dict)  # sample path -> station
    new_frame_ids: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (frame id, why): left out, not trained on


def _balanced(samples: Sequence[Sample], n: int, seed: int) -> list[Sample]:
    return balanced_subset(samples, n, seed, label=lambda s: s.label)


def _is_val(sha256: str) -> bool:
    return int(hashlib.sha256(("val:" + sha256).encode()).hexdigest()[:8], 16) % 100 < VAL_PCT


def build_update_data(run: Path, store: SampleStore, current_classes: list[str], base_split: Path | None,
                      replay: int, seed: int = 0) -> UpdateData:
    skipped: list[tuple[str, str]] = []
    known = set(current_classes)
    new = _usable(store.new_labels(), known, skipped)  # doubted labels (continual.doubt) wait for review
    # The replay pool is large and only a draw of it is read: its files are checked when drawn (below).
    earlier = _usable(store.used_labels("train"), known, skipped, read=False)
    new_classes = sorted({s.label for s in new if s.label not in current_classes})
    classes = list(current_classes) + new_classes
    index = {name: i for i, name in enumerate(classes)}

    root = run / "data"
    root.mkdir(parents=True, exist_ok=True)
    _link(root / "store", store.root / "images")
    base = load_split(base_split) if base_split else None
    if base is not None:
        _link(root / "base", base.root)

    def from_base(samples: Sequence[Sample]) -> list[Sample]:
        assert base is not None
        return [Sample(f"base/{s.path}", index[base.classes[s.label]], s.sha256) for s in samples
                if base.classes[s.label] in index]

    stations: dict[str, str] = {}

    def store_path(s: StoredSample) -> str:
        return f"store/{s.path.relative_to(store.root / 'images').as_posix()}"

    def from_store(samples: Sequence[StoredSample]) -> list[Sample]:
        out = []
        for s in samples:
            path = store_path(s)
            stations[path] = s.station
            out.append(Sample(path, index[s.label], s.sha256))
        return out

    new_train = [s for s in new if s.split == "train" and not _is_val(s.sha256)]
    new_val = [s for s in new if s.split == "train" and _is_val(s.sha256)]
    new_hold = [s for s in new if s.split == "holdout"]
    old_hold = _usable(store.used_labels("holdout"), known, skipped)

    replay_pool = from_store(earlier) + (from_base(base["train"]) if base else [])
    train = from_store(new_train)
    pooled = {store_path(s): s for s in earlier}
    replayed = _balanced(replay_pool, replay, seed)
    drawn = {r.path for r in replayed} & pooled.keys()  # the pool's files are read only once drawn
    unreadable = {path for path in drawn if not _usable([pooled[path]], known, skipped)}
    replayed = [r for r in replayed if r.path not in unreadable]
    if skipped:
        log.warning("store samples left out of this update", count=len(skipped),
                    first=[f"{fid}: {why}" for fid, why in skipped[:5]])
    base_val = from_base(base["val"]) if base else []
    val_slice = _balanced(base_val, max(len(new_val), 64), seed)  # empty without a base split
    val = from_store(new_val) + val_slice
    in_val = {s.path for s in val_slice}
    unused_val = [s for s in base_val if s.path not in in_val]
    original_holdout = (from_base(base["test"]) if base else []) + unused_val + from_store(old_hold)
    new_holdout = from_store(new_hold)
    split = Split(root, classes, seed, (0.0, 0.0, 0.0),
                  {"train": train, REPLAY: replayed, "val": val, "test": original_holdout + new_holdout})
    save_split(split, run / "split.json")
    return UpdateData(
        split=split, classes=classes, new_classes=new_classes, original_holdout=original_holdout,
        new_holdout=new_holdout, stations=stations, new_frame_ids=[s.frame_id for s in new],
        counts={"new_labels": len(new), "new_train": len(new_train), "new_val": len(new_val),
                "new_holdout": len(new_hold), "replay": len(replayed), "val": len(val),
                "original_holdout": len(original_holdout), "skipped": len(skipped)},
        skipped=skipped,
    )


def _usable(samples: Sequence[StoredSample], known: set[str], skipped: list[tuple[str, str]],
            read: bool = True) -> list[StoredSample]:
    """The samples an update can train or judge on; the rest are added to `skipped` with the reason.

    One bad sample must not stop every scheduled update: a new label that cannot name a class (stored
    before review checked labels; the model's own classes pass whatever their names), or an image file
    that is gone, or (`read`) changed since it was stored: its sha256 no longer matches (a disk error,
    a hand edit).
    """
    usable = []
    for s in samples:
        problem = None if s.label in known else class_name_problem(s.label)
        if problem is None and not read and not s.path.is_file():
            problem = f"its image {s.path} is gone"
        elif problem is None and read:
            try:
                if hashlib.sha256(s.path.read_bytes()).hexdigest() != s.sha256:
                    problem = f"its image {s.path} changed since it was stored (sha256)"
            except OSError as exc:
                problem = f"its image {s.path} cannot be read ({exc.strerror or exc})"
        if problem is None:
            usable.append(s)
        else:
            skipped.append((s.frame_id, problem))
    return usable


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(target).resolve(), target_is_directory=True)
