"""Label doubt: confident learning on the new labels before a fine-tune (`continual.update`).

Why: a reviewer's slip is learned like any other label, and when the new holdout carries the same
kind of slip the gate cannot see it. Confident learning (Northcutt et al., the `cleanlab` package)
flags the labels that disagree with what the data says, from probabilities that never saw them:

  1. features: the current model's penultimate features (the head's input) of each newly labelled
     frame, preprocessed exactly as the worker does (`continual.fewshot.features_and_logits`);
  2. out-of-sample probabilities: a standardised multinomial logistic regression, K stratified folds
     (`cross_val_predict`): each frame's probabilities come from a model fitted on the other folds;
  3. `cleanlab.filter.find_label_issues` on (labels, probabilities).

A class with fewer than K new labels is not judged (a fold would miss it). Flagged frames are not
deleted: the store marks them (`label_doubt`), the updater holds them out of training and of the new
holdout, the report lists them, and `python -m continual.review export --doubtful` re-exports them.
A person's next label settles the doubt (the same label again: confirmed, never doubted again).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from .store import Doubt, SampleStore

log = structlog.get_logger("visionqueue.doubt")

FOLDS = 5
# Much stronger than sklearn's default C=1: a few hundred frames against 512 features overfit, and an
# overfitted fold echoes its training labels, wrong ones included. On deploy/label_doubt_bench.py's
# features C=0.01 / 0.1 / 1 gave precision 0.22 / 0.19 / 0.17 at the same recall (~0.76).
C = 0.01


@dataclass
class DoubtResult:
    flagged: list[int] = field(default_factory=list)  # indices into the input, most doubtful first
    suggested: list[str] = field(default_factory=list)  # the out-of-sample most likely class of each flagged one
    quality: list[float] = field(default_factory=list)  # cleanlab's label quality score (self-confidence), 0-1
    judged: int = 0  # frames whose class had enough labels to judge
    skipped_classes: list[str] = field(default_factory=list)


def find_doubtful(features: np.ndarray, labels: Sequence[str], folds: int = FOLDS, seed: int = 0,
                  c: float = C) -> DoubtResult:
    """The labels confident learning doubts, given one feature vector per frame."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if folds < 2:
        raise ValueError(f"label doubt needs at least 2 folds, got {folds}")
    names, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    judged_names = [str(n) for n, k in zip(names, counts, strict=True) if k >= folds]
    result = DoubtResult(skipped_classes=[str(n) for n, k in zip(names, counts, strict=True) if k < folds])
    if len(judged_names) < 2:
        return result
    index = {n: i for i, n in enumerate(judged_names)}
    rows = np.array([i for i, lab in enumerate(labels) if lab in index])
    y = np.array([index[labels[i]] for i in rows])
    x = np.asarray(features, dtype=np.float64)[rows]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    probs = cross_val_predict(model, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                              method="predict_proba")
    # n_jobs=1: no worker processes inside an updater (or a test) for a few hundred rows.
    issues = find_label_issues(y, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(y, probs)
    result.judged = len(rows)
    result.flagged = [int(rows[i]) for i in issues]
    result.suggested = [judged_names[int(np.argmax(probs[i]))] for i in issues]
    result.quality = [float(quality[i]) for i in issues]
    return result


def features_of(current: Path, manifest: dict[str, Any], root: Path, paths: Sequence[str]) -> np.ndarray:
    """The current float model's penultimate features of images under `root` (relative paths)."""
    from trainer.data import Sample
    from worker.artifact import load_float_model

    from .fewshot import features_and_logits

    model = load_float_model(current, manifest).eval()  # eval: BN running statistics, no dropout
    feats, _ = features_and_logits(model, root, [Sample(p, 0, "") for p in paths], manifest)
    return feats


def doubt_new_labels(store: SampleStore, current: Path, manifest: dict[str, Any], run: str,
                     folds: int = FOLDS, seed: int = 0) -> dict[str, Any]:
    """Mark the doubtful ones among the store's new labels (they leave `store.new_labels()`); a summary
    for the update's report."""
    candidates = store.new_labels()
    root = store.root / "images"
    summary: dict[str, Any] = {"enabled": True, "checked": len(candidates), "judged": 0, "flagged": 0,
                               "frames": [], "skipped_classes": []}
    if len(candidates) < 2 * folds:
        summary["skipped_classes"] = sorted({s.label or "" for s in candidates})
    else:
        feats = features_of(current, manifest, root, [s.path.relative_to(root).as_posix() for s in candidates])
        found = find_doubtful(feats, [s.label or "" for s in candidates], folds, seed)
        confirmed = store.confirmed_after_doubt()  # a person already kept these labels after a doubt
        doubts = [Doubt(candidates[i].frame_id, candidates[i].label or "", sug, q, run)
                  for i, sug, q in zip(found.flagged, found.suggested, found.quality, strict=True)
                  if candidates[i].frame_id not in confirmed]
        store.mark_doubtful(doubts)
        summary.update(judged=found.judged, flagged=len(doubts), skipped_classes=found.skipped_classes,
                       frames=[{"frame_id": d.frame_id, "label": d.label, "suggested": d.suggested,
                                "label_quality": round(d.quality or 0.0, 4)} for d in doubts])
    summary["held_out"] = len(store.doubts())  # this run's flags and earlier ones still awaiting review
    log.info("label doubt", checked=summary["checked"], judged=summary["judged"], flagged=summary["flagged"],
             held_out=summary["held_out"], skipped_classes=summary["skipped_classes"])
    return summary
