"""Classification metrics from logits and labels (numpy only): what evaluation reports and training tracks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

ECE_BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def per_class(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])} for i, name in enumerate(class_names)}


def macro_f1(cm: np.ndarray) -> float:
    """Mean F1 over the classes that occur (in labels or predictions)."""
    rows = per_class(cm, [str(i) for i in range(len(cm))])
    present = [i for i in range(len(cm)) if cm[i].sum() + cm[:, i].sum() > 0]
    return float(np.mean([rows[str(i)]["f1"] for i in present])) if present else 0.0


def good_class_rates(cm: np.ndarray, good: int) -> dict[str, float | None]:
    """For a designated good class (e.g. `ok`):

    false_alarm_rate: good parts flagged as any defect, over all good parts;
    miss_rate: defective parts passed as good, over all defective parts.
    """
    good_total = cm[good].sum()
    defect_total = cm.sum() - good_total
    false_alarms = good_total - cm[good, good]
    misses = cm[:, good].sum() - cm[good, good]
    return {
        "false_alarm_rate": float(false_alarms / good_total) if good_total else None,
        "miss_rate": float(misses / defect_total) if defect_total else None,
        "good_support": int(good_total),
        "defect_support": int(defect_total),
    }


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """Expected calibration error (top-1 confidence vs. accuracy, equal-width bins) and the bin table."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    table = []
    ece = 0.0
    n = len(labels)
    for b in range(bins):
        mask = idx == b
        count = int(mask.sum())
        if count:
            acc, mean_conf = float(correct[mask].mean()), float(conf[mask].mean())
            ece += count / n * abs(acc - mean_conf)
        else:
            acc = mean_conf = None
        table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count,
                      "accuracy": acc, "confidence": mean_conf})
    return {"ece": float(ece), "bins": table}


def summarize(logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str], temperature: float = 1.0,
              good_class: str | None = None) -> dict[str, Any]:
    """Everything the evaluation report holds, from one set of logits."""
    num = len(class_names)
    labels = np.asarray(labels, dtype=np.int64)
    preds = logits.argmax(axis=1)
    cm = confusion_matrix(labels, preds, num)
    raw = reliability(softmax(logits), labels)
    cal = reliability(softmax(logits, temperature), labels)
    out: dict[str, Any] = {
        "n": len(labels),
        "accuracy": float((preds == labels).mean()) if len(labels) else 0.0,
        "macro_f1": macro_f1(cm),
        "per_class": per_class(cm, class_names),
        "confusion_matrix": cm.tolist(),
        "temperature": float(temperature),
        "nll_uncalibrated": nll(logits, labels),
        "nll": nll(logits, labels, temperature),
        "ece_uncalibrated": raw["ece"],
        "ece": cal["ece"],
        "reliability": cal["bins"],
        "reliability_uncalibrated": raw["bins"],
    }
    if good_class is not None and good_class in class_names:
        out["good_class"] = good_class
        out.update(good_class_rates(cm, list(class_names).index(good_class)))
    return out


TARGET_DEFECT_RECALL = 0.95  # the inspection case: miss at most one defective part in twenty


def defect_scores(probs: np.ndarray, good: int) -> np.ndarray:
    """The defect score of each row: 1 - P(good), i.e. the probability of any defect class."""
    return 1.0 - np.asarray(probs, dtype=np.float64)[:, good]


def pick_threshold(scores: np.ndarray, is_defect: np.ndarray,
                   target_recall: float = TARGET_DEFECT_RECALL) -> dict[str, Any]:
    """The operating threshold t (a part is flagged defective when its score >= t) with the lowest
    false-alarm rate among those keeping defect recall >= `target_recall`.

    Raising t only removes flags, so the false-alarm rate falls with t while recall falls too: the
    answer is the largest t that still flags ceil(target · defects) defective parts. Every t between
    that defect's score and the next lower score gives the same counts on these samples; the midpoint
    is returned, so a small shift in scores (int8 serving, TTA) does not cross a sample's score.
    Without defective samples recall is undefined and `threshold` is None.
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_defect = np.asarray(is_defect, dtype=bool)
    if scores.shape != is_defect.shape or scores.ndim != 1:
        raise ValueError("scores and is_defect must be 1-D arrays of the same length")
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    n_defect, n_good = int(is_defect.sum()), int((~is_defect).sum())
    out: dict[str, Any] = {"threshold": None, "target_recall": float(target_recall), "defect_support": n_defect,
                           "good_support": n_good, "defect_recall": None, "false_alarm_rate": None}
    if n_defect == 0:
        out["reason"] = "no defective parts to measure recall on"
        return out
    # the number of defects that must be flagged; the tolerance keeps 0.95 · 20 at 19, not 20
    need = max(1, math.ceil(target_recall * n_defect - 1e-9))
    kth = float(np.sort(scores[is_defect])[::-1][need - 1])
    below = scores[scores < kth]
    threshold = (kth + float(below.max())) / 2 if len(below) else kth
    flagged = scores >= threshold
    out.update(threshold=threshold, defect_recall=float(flagged[is_defect].mean()),
               false_alarm_rate=float(flagged[~is_defect].mean()) if n_good else None)
    return out


def thresholded_predictions(probs: np.ndarray, good: int, threshold: float) -> np.ndarray:
    """Class decisions at an operating threshold: the good class unless 1 - P(good) >= threshold,
    else the most probable defect class (so the class agrees with the defect decision)."""
    probs = np.asarray(probs, dtype=np.float64)
    masked = probs.copy()
    masked[:, good] = -np.inf
    return np.where(defect_scores(probs, good) >= threshold, masked.argmax(axis=1), good)


def operating_point(probs: np.ndarray, labels: np.ndarray, good: int, threshold: float) -> dict[str, Any]:
    """Accuracy, defect recall, false-alarm rate on good parts and macro-F1 at `threshold`."""
    labels = np.asarray(labels, dtype=np.int64)
    num = np.asarray(probs).shape[1]
    preds = thresholded_predictions(probs, good, threshold)
    cm = confusion_matrix(labels, preds, num)
    rates = good_class_rates(cm, good)
    return {"threshold": float(threshold), "n": len(labels),
            "accuracy": float((preds == labels).mean()) if len(labels) else 0.0,
            "defect_recall": None if rates["miss_rate"] is None else 1.0 - rates["miss_rate"],
            "false_alarm_rate": rates["false_alarm_rate"], "macro_f1": macro_f1(cm),
            "good_support": rates["good_support"], "defect_support": rates["defect_support"]}
