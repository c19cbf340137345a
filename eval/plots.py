"""PNG plots for evaluation results (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix_png(cm: list[list[int]], classes: list[str], path: str | Path, title: str = "") -> None:
    plt = _plt()
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(classes), 1.0 + 0.6 * len(classes)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black",
                    fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def roc_png(probs: np.ndarray, labels: np.ndarray, classes: list[str], path: str | Path, title: str = "") -> None:
    from sklearn.metrics import auc, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for i, c in enumerate(classes):
        y = labels == i
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, probs[:, i])
            ax.plot(fpr, tpr, label=f"{c} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recall_png(results: dict, path: str | Path, title: str = "") -> None:
    plt = _plt()
    ks = [1, 5, 10]
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for direction in ("image_to_text", "text_to_image"):
        ax.plot(ks, [results[f"{direction}_r{k}"] for k in ks], marker="o", label=direction.replace("_", " "))
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_curves_png(curves: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> None:
    """One panel per run: loss against step (metrics.jsonl of train.clip / train.instruct)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], curves.items()):
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, lw=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
