"""A simulated reviewer — named as such everywhere it is used — for the demo and the tests.

It plays the person who sorts exported images into class folders, taking the answer from the
synthetic ground truth that simulated cameras put in each frame's `meta.truth`. Real deployments
have people do this step (`python -m continual.review export`, sort, `… import`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from continual.review import UNLABELED, export_folders, import_labels
from continual.store import SampleStore

NAME = "simulated-reviewer"


def review(store: SampleStore, workdir: Path, class_names: list[str], limit: int | None = None,
           relabel: Callable[[str], str] | None = None) -> dict:
    """Export unlabeled samples, sort them by `meta.truth` (optionally through `relabel`), import."""
    shutil.rmtree(workdir, ignore_errors=True)
    samples = store.unlabeled(limit)
    export_folders(samples, workdir, class_names)
    index = json.loads((workdir / "_export.json").read_text())
    truth = {s.frame_id: s.meta.get("truth") for s in samples}
    skipped = 0
    for name, info in index.items():
        label = truth.get(info["frame_id"])
        if not label:
            skipped += 1
            continue
        label = relabel(label) if relabel else label
        (workdir / label).mkdir(exist_ok=True)
        (workdir / UNLABELED / name).rename(workdir / label / name)
    report = import_labels(store, workdir, label_source=NAME)
    report["skipped_without_truth"] = skipped
    return report
