"""Classification metrics from logits and labels (numpy only): what evaluation reports and training tracks."""

from __future__ import annotations

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
