"""What one update trains, validates and is judged on (continual/dataset.py)."""

from __future__ import annotations

from helpers import CLASSES, jpeg

from continual.dataset import build_update_data
from continual.store import SampleStore
from trainer.data import REPLAY, Sample, Split, save_split


def base_split(tmp_path, n_val=100, n_test=30):
    root = tmp_path / "base-data"
    root.mkdir()
    parts = {"train": 60, "val": n_val, "test": n_test}
    samples = {part: [Sample(f"{part}/{i}.jpg", i % len(CLASSES), f"{part}{i:04d}") for i in range(n)]
               for part, n in parts.items()}
    split = Split(root, list(CLASSES), 0, (0.6, 0.2, 0.2), samples)
    save_split(split, tmp_path / "split.json")
    return split


def test_the_original_holdout_is_every_original_image_the_update_neither_trains_nor_validates_on(tmp_path):
    base = base_split(tmp_path)
    with SampleStore(tmp_path / "store") as store:
        rows = [{"frame_id": f"f{i}", "sha256": store.put_image(jpeg(32, 24, seed=i), ".jpg"), "ext": ".jpg",
                 "station": "cam", "ts": float(i), "split": "train"} for i in range(20)]
        store.add(rows)
        store.set_labels({r["frame_id"]: CLASSES[i % len(CLASSES)] for i, r in enumerate(rows)}, "review")
        data = build_update_data(tmp_path / "run", store, list(CLASSES), tmp_path / "split.json", replay=24)

    def paths(samples):
        return {s.path for s in samples}

    val_base = {p for p in paths(data.split["val"]) if p.startswith("base/")}
    holdout = paths(data.original_holdout)
    # the update validates on a class-balanced slice of the original val split (64 of its 100 images here):
    # the rest of it joins the original test split in the holdout
    assert len(val_base) == 64 and val_base <= {f"base/{s.path}" for s in base["val"]}
    assert holdout == {f"base/{s.path}" for s in base["test"]} | ({f"base/{s.path}" for s in base["val"]} - val_base)
    assert not holdout & val_base
    assert not holdout & (paths(data.split["train"]) | paths(data.split[REPLAY]))
    assert data.counts["original_holdout"] == len(data.original_holdout) == len(holdout)


def test_a_large_original_val_split_leaves_most_of_itself_to_the_holdout(tmp_path):
    base_split(tmp_path, n_val=200, n_test=30)
    with SampleStore(tmp_path / "store") as store:
        data = build_update_data(tmp_path / "run", store, list(CLASSES), tmp_path / "split.json", replay=24)
    val_base = [s for s in data.split["val"] if s.path.startswith("base/")]
    assert len(val_base) == 64  # no new labels: the slice's floor
    assert len(data.original_holdout) == 30 + 200 - 64
