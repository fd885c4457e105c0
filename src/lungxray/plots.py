"""Every figure lungxray draws, as matplotlib figures: the confusion matrix, the training curves, the
coverage of the out-of-distribution flag, the search history, the ROC curves, the reliability
diagram and a multi-label model's ROC panel per finding. ``save_figure`` writes one as a PNG file
in a run folder; ``figure_png`` gives its bytes for the report to embed.

Draws what it is given: the numbers (metrics, ECE) come from ``evaluate``, the page around the
figures from ``report``; the one computation here is where the reliability diagram puts its points
(``equal_count_bins``). Holds no training code.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from lungxray.metrics import ECE_BINS, expected_calibration_error


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG to ``path`` (atomically) and close it."""
    from lungxray.runfolder import atomic_path

    plt = _pyplot()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return Path(path)


def figure_png(fig, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes, the figure closed: what the report inlines."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def confusion_figure(metrics: dict, normalised: bool = False):
    """Annotated heatmap of counts, true class down, predicted class across; with ``normalised``, a
    second panel divides each row by its total (recall on the diagonal)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    n = len(metrics["classes"])
    cm = np.array(metrics["confusion_matrix"], dtype=float)
    panels = [(cm.astype(int), "counts", "d")]
    if normalised:
        rows = cm.sum(axis=1, keepdims=True)
        panels.append(
            (
                np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0),
                "row-normalised (recall on the diagonal)",
                ".2f",
            )
        )
    fig, axes = plt.subplots(1, len(panels), figsize=((1.6 + 1.2 * n) * len(panels), 1.2 + 1.2 * n), squeeze=False)
    for ax, (matrix, title, fmt) in zip(axes[0], panels, strict=True):
        ConfusionMatrixDisplay(matrix, display_labels=metrics["classes"]).plot(
            ax=ax, cmap="Blues", colorbar=False, xticks_rotation=30, values_format=fmt
        )
        ax.set_title(title)
    if not normalised:
        axes[0][0].set_title(
            f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} (n={metrics['n']})"
        )
    return fig


def curves_figure(history: dict[str, list[float]], best_epoch: int | None = None):
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
    return fig


def coverage_figure(summaries: dict[str, dict]):
    """Accuracy on the accepted images against the share accepted, as the out-of-distribution
    threshold moves; the model's threshold marked on each curve. ``summaries``: name ->
    ``metrics.ood_summary``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in summaries.items():
        curve = s["coverage_curve"]
        line = ax.plot(curve["coverage"], curve["accuracy"], label=name)[0]
        at = 1 - s["share_flagged"]
        if at > 0:
            k = max(0, int(round(at * len(curve["coverage"]))) - 1)
            ax.plot([curve["coverage"][k]], [curve["accuracy"][k]], "o", color=line.get_color())
    ax.set_xlabel("share of images accepted (most typical first)")
    ax.set_ylabel("accuracy on the accepted images")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    # two lines: on one, the title is wider than the figure and both its ends are cut off
    ax.set_title("Out-of-distribution flag: coverage against accuracy\n(dot: the model's threshold)")
    ax.legend(loc="lower left")
    return fig


def search_figure(trials: list[dict], best: dict | None):
    """Each finished trial's value by trial number, and the best so far (the lowest for a loss
    objective, the highest otherwise). ``trials``: trials.json; ``best``: best_params.json."""
    plt = _pyplot()
    done = [t for t in trials if t["value"] is not None]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    values = [t["value"] for t in done]
    ax.plot([t["number"] for t in done], values, "o", label="trial")
    best_so_far = (
        np.minimum.accumulate(values) if best and best.get("objective") == "val_loss" else np.maximum.accumulate(values)
    )
    ax.step([t["number"] for t in done], best_so_far, where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(best.get("objective", "objective") if best else "objective")
    ax.set_title("optimisation history")
    ax.legend()
    return fig


def roc_figure(y: np.ndarray, probs: np.ndarray, classes: list[str]):
    """One-vs-rest ROC curve of each class that has images on both sides, and the chance line."""
    from sklearn.metrics import RocCurveDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for i, name in enumerate(classes):
        if 0 < (y == i).sum() < len(y):
            RocCurveDisplay.from_predictions(y == i, probs[:, i], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], "k:", label="chance")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("one-vs-rest ROC: each class against the others")
    ax.legend(loc="lower right")
    return fig


# The fewest images behind a point of the reliability diagram: the accuracy of 30 images at 0.8
# is known to about +-0.07, of 5 images to +-0.2, and a line through such points zigzags.
MIN_BIN_IMAGES = 30


def equal_count_bins(
    y: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS, min_images: int = MIN_BIN_IMAGES
) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, images) of each bin of the reliability diagram, lowest confidence
    first, confidence being the top probability of ``probs`` (N, C).

    The images sorted by confidence are cut into bins of (nearly) equal count, as many as ``bins``
    but none with fewer than ``min_images`` (one bin when there are fewer in all): equal-width bins
    leave a handful of images in most bins of a confident model, and their accuracy jumps from 0
    to 1 on one image."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    order = np.argsort(confidence, kind="stable")
    k = max(1, min(bins, len(order) // min_images))
    return [
        (float(confidence[part].mean()), float(correct[part].mean()), len(part))
        for part in np.array_split(order, k)
        if len(part)
    ]


def reliability_figure(y: np.ndarray, labelled: dict[str, np.ndarray]):
    """Accuracy against confidence over ``equal_count_bins``, one line per set of probabilities
    (``labelled``: legend label -> (N, C) probabilities), each with its ECE, and the diagonal; the
    title says how many images each point stands for."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    diagonal = [0.0, 1.0]
    counts = []
    for label, p in labelled.items():
        points = equal_count_bins(y, p)
        counts = [n for _, _, n in points]
        ax.plot(
            [c for c, _, _ in points],
            [a for _, a, _ in points],
            "o-",
            label=f"{label}: ECE {expected_calibration_error(y, p):.3f}",
        )
    ax.plot(diagonal, diagonal, "k:", label="perfect calibration")
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    fewest, most = min(counts), max(counts)
    ax.set_title(
        f"reliability diagram: {len(counts)} bins of {fewest if fewest == most else f'{fewest}-{most}'} images"
    )
    ax.legend(loc="upper left", fontsize=8)
    return fig


def multilabel_roc_figure(y: np.ndarray, probs: np.ndarray, findings: list[str], columns: int = 4):
    """One small ROC panel per finding of a multi-label model, on that finding's known entries
    (``y`` (N, F) with NaN unknown, ``probs`` (N, F)), with its AUROC, its positives and the chance
    line; a finding without both sides among them says so in its panel."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    columns = max(1, min(columns, len(findings)))
    rows = -(-len(findings) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.6 * columns, 2.5 * rows), squeeze=False, sharex=True, sharey=True
    )
    for ax in axes.flat[len(findings) :]:
        ax.set_visible(False)
    for f, (name, ax) in enumerate(zip(findings, axes.flat, strict=False)):
        known = ~np.isnan(y[:, f])
        truth, scores = y[known, f], probs[known, f]
        n_pos = int((truth == 1).sum())
        ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
        if 0 < n_pos < len(truth):
            fpr, tpr, _ = roc_curve(truth, scores)
            ax.plot(fpr, tpr)
            ax.set_title(
                f"{name}\nAUROC {roc_auc_score(truth, scores):.3f}, {n_pos} of {len(truth)} positive", fontsize=8
            )
        else:
            ax.set_title(f"{name}\nno ROC: {n_pos} of {len(truth)} positive", fontsize=8)
        ax.set_aspect("equal")
        if f + columns >= len(findings):  # the lowest panel of its column
            ax.set_xlabel("1 - specificity", fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
    for ax in axes[:, 0]:
        ax.set_ylabel("sensitivity", fontsize=8)
    return fig
