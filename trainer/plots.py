"""PNG figures: training curves, confusion matrix, reliability diagram (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def training_curves(history: Sequence[dict[str, Any]], out: Path | str) -> Path:
    """Loss and accuracy per epoch (train and validation), and the learning rate."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(epochs, [h["train_loss"] for h in history], label="train")
    axes[0].plot(epochs, [h["val_loss"] for h in history], label="validation")
    axes[0].set_title("loss")
    axes[1].plot(epochs, [h["train_acc"] for h in history], label="train")
    axes[1].plot(epochs, [h["val_acc"] for h in history], label="validation")
    axes[1].set_title("accuracy")
    axes[2].plot(epochs, [h["lr"] for h in history], color="gray")
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def confusion(cm: Sequence[Sequence[int]], class_names: Sequence[str], out: Path | str, title: str = "") -> Path:
    m = np.asarray(cm)
    size = max(4.0, 0.7 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = m.max() if m.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > top / 2 else "black")
    ax.set_title(title or "confusion matrix")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def reliability_diagram(bins: Sequence[dict[str, Any]], bins_uncalibrated: Sequence[dict[str, Any]],
                        ece: float, ece_uncalibrated: float, temperature: float, out: Path | str) -> Path:
    """Accuracy against confidence per bin, before and after temperature scaling."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, table, title in ((axes[0], bins_uncalibrated, f"uncalibrated: ECE {ece_uncalibrated:.2%}"),
                             (axes[1], bins, f"T = {temperature:.3f}: ECE {ece:.2%}")):
        used = [b for b in table if b["count"]]
        centers = np.array([(b["lo"] + b["hi"]) / 2 for b in used])
        width = (table[0]["hi"] - table[0]["lo"]) * 0.95 if table else 0.1
        acc = np.array([b["accuracy"] for b in used])
        conf = np.array([b["confidence"] for b in used])
        ax.bar(centers, acc, width=width, edgecolor="black", alpha=0.75, label="accuracy")
        ax.bar(centers, np.abs(conf - acc), bottom=np.minimum(acc, conf), width=width, color="red", alpha=0.35,
               label="gap to mean confidence")
        for x, y, b in zip(centers, acc, used, strict=True):
            ax.text(x, min(y, 0.93) + 0.02, str(b["count"]), ha="center", fontsize=7)
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
