"""Metrics and plots: loss, accuracy, per-class precision/recall/F1, macro-F1, confusion matrix.

``compute_metrics`` turns labels and probabilities into the ``metrics.json`` schema that other
tools read; ``plot_confusion_matrix`` and ``plot_curves`` write the PNGs. Holds no training code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, log_loss, precision_recall_fscore_support


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """``metrics.json`` content for integer labels ``y_true`` (N,) and probabilities ``probs`` (N, C).

    Macro-F1 averages over the classes present in ``y_true`` (a dataset from another hospital may
    hold only some of the model's classes); the confusion matrix always has every class.
    """
    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    present = sorted(set(y_true.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    return {
        "classes": list(classes),
        "n": int(len(y_true)),
        "loss": float(log_loss(y_true, np.clip(probs, 1e-7, 1.0), labels=labels)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def write_metrics(metrics: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(metrics, indent=2) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(metrics: dict, path: Path) -> None:
    """Annotated heatmap of counts, true class down, predicted class across."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(metrics["classes"]), 1.2 + 1.2 * len(metrics["classes"])))
    ConfusionMatrixDisplay(np.array(metrics["confusion_matrix"]), display_labels=metrics["classes"]).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=30)
    ax.set_title(f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} (n={metrics['n']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(history: dict[str, list[float]], path: Path, best_epoch: int | None = None) -> None:
    """Train/val loss and accuracy per epoch, the kept epoch marked."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = history["epoch"]
    for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.plot(epochs, history[f"train_{key}"], label=f"train {key}")
        ax.plot(epochs, history[f"val_{key}"], label=f"val {key}")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", label=f"kept epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
