"""Label doubt (continual.doubt): confident learning finds flipped labels; the store and review carry them."""

from __future__ import annotations

import json

import numpy as np
from helpers import jpeg

from continual import review
from continual.doubt import find_doubtful
from continual.store import Doubt, SampleStore


def blobs(n_per_class: int, flip_share: float, seed: int) -> tuple[np.ndarray, list[str], set[int]]:
    """Three well-separated Gaussian blobs in 32 dimensions, `flip_share` of the labels changed to another class."""
    rng = np.random.default_rng(seed)
    names = ["ok", "dent", "stain"]
    centres = rng.normal(0, 1, (3, 32)) * 3
    x = np.concatenate([centres[k] + rng.normal(0, 1, (n_per_class, 32)) for k in range(3)])
    labels = [names[k] for k in range(3) for _ in range(n_per_class)]
    flipped = set(rng.choice(len(labels), int(flip_share * len(labels)), replace=False).tolist())
    for i in flipped:
        labels[i] = names[(names.index(labels[i]) + 1 + int(rng.integers(2))) % 3]
    return x, labels, flipped


def test_flipped_labels_are_found_with_high_precision_and_recall():
    x, labels, flipped = blobs(80, 0.10, seed=0)
    result = find_doubtful(x, labels)
    flagged = set(result.flagged)
    precision = len(flagged & flipped) / len(flagged)
    recall = len(flagged & flipped) / len(flipped)
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)
    assert result.judged == len(labels) and result.skipped_classes == []
    # Suggestions name a class; quality scores are most doubtful first.
    assert set(result.suggested) <= {"ok", "dent", "stain"}
    assert result.quality == sorted(result.quality)


def test_clean_labels_are_hardly_doubted_and_tiny_classes_are_not_judged():
    x, labels, _ = blobs(60, 0.0, seed=1)
    labels[:3] = ["crack"] * 3  # fewer than the 5 folds: cannot be held out of a fold, so not judged
    result = find_doubtful(x, labels)
    assert len(result.flagged) <= 2, result.flagged
    assert result.skipped_classes == ["crack"] and result.judged == len(labels) - 3
    assert all(i >= 3 for i in result.flagged)


def test_doubtful_frames_are_re_exported_and_settled_by_the_next_import(tmp_path):
    store_dir = tmp_path / "store"
    with SampleStore(store_dir) as store:
        store.add([{"frame_id": f"f{i}", "sha256": store.put_image(jpeg(16, 16, seed=i), "jpg"), "ext": "jpg",
                    "station": "cam", "ts": float(i), "split": "train"} for i in range(3)])
        store.set_labels({"f0": "ok", "f1": "crack", "f2": "ok"}, "alice")
        store.mark_doubtful([Doubt("f0", "ok", "dent", 0.05, "20260101T000000Z"),
                             Doubt("f1", "crack", "ok", 0.1, "20260101T000000Z")])
    out = tmp_path / "again"
    assert review.main(["--store", str(store_dir), "export", "--doubtful", "--out", str(out),
                        "--classes", "ok,dent"]) == 0
    index = json.loads((out / "_export.json").read_text())
    assert {v["frame_id"]: (v["label"], v["suggested"]) for v in index.values()} == {
        "f0": ("ok", "dent"), "f1": ("crack", "ok")}
    assert (out / "crack").is_dir()  # a doubted label's class gets its folder even if the model lacks it
    (out / "_unlabeled" / "f0.jpg").rename(out / "dent" / "f0.jpg")  # the reviewer corrects f0, leaves f1
    assert review.main(["--store", str(store_dir), "import", str(out)]) == 0
    with SampleStore(store_dir) as store:
        assert [d.frame_id for d in store.doubts()] == ["f1"]
        assert store.get("f0").label == "dent" and store.label_history("f0")[-1].previous == "ok"
        assert {s.frame_id for s in store.new_labels()} == {"f0", "f2"}
