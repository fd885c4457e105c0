"""Metrics, confidence intervals and calibration.

``compute_metrics`` turns labels and probabilities into the ``metrics.json`` schema that other
tools read: loss, accuracy, per-class precision/recall (sensitivity)/specificity/F1/AUROC,
macro-F1, macro AUROC, balanced accuracy, confusion matrix, what always answering the majority
class scores (``majority_baseline``), a 95% interval per headline metric (exact binomial intervals
for proportions of images, ``proportion_ci``; a seeded percentile bootstrap for the others,
``bootstrap_ci``), each AUROC read against chance (``against_chance``), and the expected
calibration error. Temperature scaling
(``fit_temperature``, ``calibrate``) and what the out-of-distribution flag does on labelled images
(``ood_summary``) live here too. The figures drawn from these numbers are ``plots``. Works on numpy
arrays; holds no training code and imports no torch.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

BOOTSTRAP_RESAMPLES = 2000


def _auroc(y_true: np.ndarray, scores: np.ndarray, label: int) -> float | None:
    """One-vs-rest ROC AUC of ``label``; None when the data hold only one side."""
    positive = y_true == label
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, scores))


def _resampled_metrics(
    y_true: np.ndarray, probs: np.ndarray, present: list[int], idx: np.ndarray
) -> dict[str, np.ndarray]:
    """Headline metrics of every bootstrap resample at once: ``idx`` (B, N) -> {name: (B,)}.

    Vectorised over resamples (one confusion-matrix bincount, one rank pass per class): a
    per-resample sklearn call would take ~1 s per thousand resamples and metric.
    """
    from scipy.stats import rankdata

    n_res, n = idx.shape
    n_classes = probs.shape[1]
    y = y_true[idx]  # (B, N)
    pred = probs.argmax(axis=1)[idx]
    flat = (np.arange(n_res)[:, None] * n_classes + y) * n_classes + pred
    cm = np.bincount(flat.ravel(), minlength=n_res * n_classes * n_classes).reshape(n_res, n_classes, n_classes)
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(float)  # (B, C)
    actual, predicted = cm.sum(axis=2), cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / actual
        specificity = (n - actual - predicted + tp) / (n - actual)
        f1 = np.where(
            2 * tp + (predicted - tp) + (actual - tp) > 0, 2 * tp / (2 * tp + (predicted - tp) + (actual - tp)), 0.0
        )
        auroc = np.full((n_res, n_classes), np.nan)
        for c in range(n_classes):
            ranks = rankdata(probs[:, c][idx], axis=1)  # ties get their average rank
            pos = y == c
            n_pos = pos.sum(axis=1)
            n_neg = n - n_pos
            auroc[:, c] = ((ranks * pos).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    out = {"accuracy": tp.sum(axis=1) / n, "macro_f1": f1[:, present].mean(axis=1)}
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without some class: its recall is NaN
        out["balanced_accuracy"] = np.nanmean(recall[:, present], axis=1)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no class with both sides
        out["macro_auroc"] = np.nanmean(auroc[:, present], axis=1)
    for c in present:
        out[f"recall/{c}"], out[f"specificity/{c}"], out[f"auroc/{c}"] = recall[:, c], specificity[:, c], auroc[:, c]
    return out


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, list[float] | None]:
    """Percentile-bootstrap intervals of the headline metrics, resampling images with replacement.

    scipy.stats.bootstrap draws the resamples (seeded) and takes the percentiles; the metrics
    come from ``_resampled_metrics``. Keys: accuracy, macro_f1, macro_auroc, and
    recall/<class>, specificity/<class>, auroc/<class>. None where a resample lacks a class.
    """
    from scipy.stats import DegenerateDataWarning, bootstrap

    present = sorted(set(y_true.tolist()))
    names = list(_resampled_metrics(y_true, probs, present, np.arange(len(y_true))[None]))

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1, len(y_true))
        values = _resampled_metrics(y_true, probs, present, idx)
        return np.stack([values[k] for k in names])  # (metrics, B)

    with warnings.catch_warnings():
        # scipy warns when a metric is undefined in some resamples; those intervals become None.
        warnings.simplefilter("ignore", DegenerateDataWarning)
        result = bootstrap(
            (np.arange(len(y_true)),),
            statistic,
            vectorized=True,
            n_resamples=resamples,
            confidence_level=confidence,
            method="percentile",
            rng=seed,
            batch=max(1, 20_000_000 // max(1, len(y_true))),
        )
    low, high = result.confidence_interval
    readable = {f"{k.split('/')[0]}/{classes[int(k.split('/')[1])]}" if "/" in k else k: i for i, k in enumerate(names)}
    return {
        k: None if not (np.isfinite(low[i]) and np.isfinite(high[i])) else [float(low[i]), float(high[i])]
        for k, i in readable.items()
    }


ECE_BINS = 15


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> list[tuple[float, float, float]]:
    """(mean confidence, accuracy, share of images) of each non-empty equal-width confidence bin,
    confidence being the top probability."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    which = np.minimum((confidence * bins).astype(int), bins - 1)  # (N,) bin of each image
    return [
        (float(confidence[which == b].mean()), float(correct[which == b].mean()), float((which == b).mean()))
        for b in range(bins)
        if (which == b).any()
    ]


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the gap between confidence and accuracy, averaged over the confidence bins weighted by
    how many images fall in each (Guo et al., 2017)."""
    return float(
        sum(share * abs(accuracy - confidence) for confidence, accuracy, share in reliability_bins(y_true, probs, bins))
    )


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


TEMPERATURE_BOUNDS = (0.05, 20.0)  # the search range of fit_temperature
MIN_CALIBRATION_IMAGES = 20
MIN_LOG_LOSS_GAIN = 0.02  # temperature scaling must cut the validation log-loss by 2% to be applied


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature T in TEMPERATURE_BOUNDS that minimises the log-loss of softmax(logits / T)
    (Guo et al., 2017).

    One scalar, fitted on validation logits. A bounded 1-D search over log T is all it takes;
    calibration libraries (netcal) would bring a second deep-learning stack for these lines.
    """
    from scipy.optimize import minimize_scalar

    low, high = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    best = minimize_scalar(
        lambda log_t: log_loss_at(logits, y_true, float(np.exp(log_t))), bounds=(low, high), method="bounded"
    )
    return float(np.exp(best.x))


def log_loss_at(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Log-loss of softmax(logits / temperature) against integer labels."""
    return float(log_loss(y_true, softmax(logits, temperature), labels=np.arange(logits.shape[1])))


def cross_validated_log_loss(logits: np.ndarray, y_true: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Mean log-loss of each validation image under a temperature fitted on the other folds.

    The gain of temperature scaling measured on images the temperature was not fitted on: on 32
    validation images with one error, the folds without it fit a sharpening T that the held-out
    error then pays for, which the in-sample log-loss never shows.
    """
    from sklearn.model_selection import KFold

    losses = np.zeros(len(y_true))
    split = KFold(n_splits=min(folds, len(y_true)), shuffle=True, random_state=seed)
    for fit_idx, held in split.split(logits):
        t = fit_temperature(logits[fit_idx], y_true[fit_idx])
        p = softmax(logits[held], t)[np.arange(len(held)), y_true[held]]
        losses[held] = -np.log(np.clip(p, np.finfo(float).eps, 1))
    return float(losses.mean())


def fit_class_bias(logits: np.ndarray, y_true: np.ndarray) -> list[float] | None:
    """Per-class offsets b added to the logits so that the class-balanced log-loss on ``logits``
    (N, C) is lowest: a prior correction, fitted on images of a site the model did not train on
    (``--val-by site``) rather than taken from the training mix. Only the classes present in
    ``y_true`` take part (the loss reads their columns alone, so what the model gives an absent
    class never shifts them); their offsets sum to 0, so the order of the classes does not matter
    and an absent class keeps its place against them, with offset 0. A small ridge keeps them
    finite. None with fewer than 2 classes."""
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    logits, y_true = np.asarray(logits, dtype=np.float64), np.asarray(y_true)
    present = np.unique(y_true)
    if len(present) < 2:
        return None
    z0 = logits[:, present]
    y = np.searchsorted(present, y_true)  # each label's column among the present classes
    weight = 1.0 / (len(present) * np.bincount(y)[y])  # each class weighs alike

    def loss(v: np.ndarray) -> float:
        b = v - v.mean()
        z = z0 + b
        return float(np.sum(weight * (logsumexp(z, axis=1) - z[np.arange(len(z)), y])) + 1e-3 * b @ b)

    v = minimize(loss, np.zeros(len(present)), method="L-BFGS-B").x
    bias = np.zeros(logits.shape[1])
    bias[present] = v - v.mean()
    return [float(x) for x in bias]


def calibration_verdict(
    temperature: float, losses: dict, errors: int, unit: tuple = ("image", "images"), extreme: str = "100%"
) -> str | None:
    """Why the fitted temperature must not be used, or None when it may. ``losses``: the validation
    log-loss ``before`` scaling, ``fitted`` (in sample), ``held_out`` (cross-validated) and at the
    better search ``bound`` (matching the fit's: the optimum runs into a bound). ``errors``: the
    validation ``unit`` (singular, plural) decided wrongly; a finding's are entries, pushed to "0 or 1"."""
    low, high = TEMPERATURE_BOUNDS
    if losses["bound"] <= losses["fitted"] * (1 + 1e-6) + 1e-12:
        return (
            f"the fitted temperature {temperature:.3g} sits on the search bound ({low}-{high}): the "
            f"validation {unit[1]} do not pin it down"
        )
    if temperature < 1 and errors == 0:
        return (
            f"no validation {unit[0]} is misclassified, which is no evidence that the model is under-confident; "
            f"sharpening (T = {temperature:.3g}) would only push every answer towards {extreme}"
        )
    if losses["held_out"] > losses["before"] * (1 - MIN_LOG_LOSS_GAIN):
        return (
            f"fitted on part of the validation {unit[1]} and scored on the rest, it changes the log-loss from "
            f"{losses['before']:.4f} to {losses['held_out']:.4f}, not a gain of {MIN_LOG_LOSS_GAIN:.0%}"
        )
    return None


def calibrate(logits: np.ndarray, y_true: np.ndarray) -> dict:
    """Temperature scaling fitted on validation ``logits`` (N, C) and labels, applied only when it
    cannot make things worse: the ``calibration`` entry of a bundle's config.json.

    The fitted T is used only when it lowers the validation log-loss by MIN_LOG_LOSS_GAIN measured
    out of sample (``cross_validated_log_loss``), is not on a search bound, and does not sharpen a
    model that made no validation error; otherwise T = 1 and ``reason`` says why: a few dozen
    validation images (the demo MLP's 32) can drive T anywhere from 0.05 to 0.6 from one machine to
    the next, each making the test log-loss worse. Below MIN_CALIBRATION_IMAGES validation images
    nothing is fitted.
    """
    logits = np.asarray(logits, dtype=np.float64)
    n = int(len(y_true))
    if n < MIN_CALIBRATION_IMAGES:
        return {
            "method": "none",
            "temperature": 1.0,
            "applied": False,
            "n": n,
            "reason": f"fewer than {MIN_CALIBRATION_IMAGES} validation images",
        }
    fitted = fit_temperature(logits, y_true)
    losses = {
        "before": log_loss_at(logits, y_true),
        "fitted": log_loss_at(logits, y_true, fitted),
        "held_out": cross_validated_log_loss(logits, y_true),
        "bound": min(log_loss_at(logits, y_true, t) for t in TEMPERATURE_BOUNDS),
    }
    reason = calibration_verdict(fitted, losses, int((logits.argmax(axis=1) != y_true).sum()))
    before, held_out = losses["before"], losses["held_out"]
    temperature = fitted if reason is None else 1.0
    return {
        "method": "temperature scaling" if reason is None else "none",
        "fitted_on": "validation",
        "n": n,
        "temperature": temperature,
        "fitted_temperature": fitted,
        "applied": reason is None,
        "reason": reason
        or f"lowers the validation log-loss from {before:.4f} to {held_out:.4f} (fitted on other folds of it)",
        "val_loss_before": before,
        "val_loss_after": log_loss_at(logits, y_true, temperature),
        "val_loss_cross_validated": held_out,
        "val_ece_before": expected_calibration_error(y_true, softmax(logits)),
        "val_ece_after": expected_calibration_error(y_true, softmax(logits, temperature)),
    }


def compute_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict:
    """``metrics.json`` content for integer labels ``y_true`` (N,) and probabilities ``probs`` (N, C).

    Macro-F1 and macro AUROC average over the classes present in ``y_true`` (a dataset from
    another hospital may hold only some of the model's classes); an absent class gets no AUROC
    (None). The confusion matrix always has every class. ``ci95`` comes from ``resamples``
    bootstrap resamples drawn with ``seed`` (0 resamples: no intervals).
    """
    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    present = sorted(set(y_true.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    negatives = len(y_true) - cm.sum(axis=1)
    true_negatives = negatives - (cm.sum(axis=0) - np.diag(cm))
    auroc = [_auroc(y_true, probs[:, i], i) for i in labels]
    defined = [a for a in auroc if a is not None]
    metrics = {
        "classes": list(classes),
        "n": int(len(y_true)),
        "loss": float(log_loss(y_true, probs, labels=labels)),  # sklearn clips at the dtype's epsilon
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "macro_auroc": float(np.mean(defined)) if defined else None,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "specificity": float(true_negatives[i] / negatives[i]) if negatives[i] else None,
                "f1": float(f1[i]),
                "auroc": auroc[i],
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
        "ece": expected_calibration_error(y_true, probs),
    }
    metrics["balanced_accuracy"] = float(np.mean([recall[i] for i in present]))
    metrics["baseline"] = majority_baseline(y_true, classes)
    if resamples:
        intervals = bootstrap_ci(y_true, probs, list(classes), resamples=resamples, seed=seed)
        intervals |= _exact_intervals(cm, classes)
        metrics["ci95"] = intervals
        metrics["bootstrap"] = {"method": "percentile", "resamples": resamples, "seed": seed, "unit": "image"}
        metrics["intervals"] = INTERVALS
        for i, name in enumerate(classes):
            metrics["per_class"][name]["auroc_vs_chance"] = against_chance(auroc[i], intervals.get(f"auroc/{name}"))
    return metrics


# What each interval in ci95 is: counts of images get exact binomial intervals, which never collapse
# to a point at 0 of n or n of n as a bootstrap's do; the other figures get the bootstrap's.
INTERVALS = {
    "accuracy, recall/<class>, specificity/<class>": "Clopper-Pearson exact (binomial)",
    "macro_f1, balanced_accuracy, macro_auroc, auroc/<class>": "percentile bootstrap over images",
}


def proportion_ci(k: int, n: int, confidence: float = 0.95) -> list[float] | None:
    """Exact (Clopper-Pearson) interval of the proportion ``k`` of ``n``; None for n = 0."""
    from scipy.stats import binomtest

    if n == 0:
        return None
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return [float(ci.low), float(ci.high)]


def _exact_intervals(cm: np.ndarray, classes: list[str]) -> dict[str, list[float] | None]:
    """Exact intervals of accuracy and of each class's recall and specificity, from the confusion matrix."""
    n = int(cm.sum())
    out = {"accuracy": proportion_ci(int(np.trace(cm)), n)}
    for i, name in enumerate(classes):
        actual, predicted, tp = int(cm[i].sum()), int(cm[:, i].sum()), int(cm[i, i])
        negatives = n - actual
        out[f"recall/{name}"] = proportion_ci(tp, actual) if actual else None
        out[f"specificity/{name}"] = proportion_ci(negatives - (predicted - tp), negatives) if negatives else None
    return out


def majority_baseline(y_true: np.ndarray, classes: list[str]) -> dict:
    """What answering the most frequent class for every image scores: the figures a model's must
    beat to say anything (accuracy on an imbalanced set, macro-F1, balanced accuracy, and AUROC 0.5)."""
    present = sorted(set(y_true.tolist()))
    majority = int(np.bincount(y_true, minlength=len(classes)).argmax())
    constant = np.full_like(y_true, majority)
    return {
        "majority_class": classes[majority],
        "accuracy": float(np.mean(y_true == majority)),
        "balanced_accuracy": 1.0 / len(present),
        "macro_f1": float(f1_score(y_true, constant, labels=present, average="macro", zero_division=0)),
        "auroc": 0.5,
    }


def against_chance(auroc: float | None, ci: list[float] | None) -> str | None:
    """An AUROC read against 0.5 through its interval: "better than chance" only when the whole
    interval lies above 0.5; "no better than chance" when it includes 0.5; None without both."""
    if auroc is None or ci is None:
        return None
    if ci[0] > 0.5:
        return "better than chance"
    if ci[1] < 0.5:
        return "worse than chance"
    return "no better than chance"


def ood_summary(y_true: np.ndarray, probs: np.ndarray, scores: np.ndarray | None, classes: list[str]) -> dict | None:
    """What the out-of-distribution flag does on labelled images: how many it flags (per class),
    the metrics on the images it accepts, next to all of them, and accuracy against coverage as its
    threshold moves (images sorted by score, the most typical first). None without scores."""
    if scores is None or len(scores) == 0:
        return None
    flagged = scores > 1.0
    correct = probs.argmax(axis=1) == y_true
    order = np.argsort(scores, kind="stable")
    kept = np.arange(1, len(order) + 1)
    accuracy_at = np.cumsum(correct[order]) / kept
    accepted = ~flagged
    return {
        "threshold": 1.0,
        "n_flagged": int(flagged.sum()),
        "share_flagged": float(flagged.mean()) if len(flagged) else None,
        "share_flagged_per_class": {
            name: float(flagged[y_true == i].mean()) for i, name in enumerate(classes) if (y_true == i).any()
        },
        "wrong_caught": int((flagged & ~correct).sum()),
        "n_wrong": int((~correct).sum()),
        "accepted": (
            compute_metrics(y_true[accepted], probs[accepted], classes, resamples=0) if accepted.any() else None
        ),
        "coverage_curve": {
            "coverage": (kept / len(order)).round(4).tolist(),
            "accuracy": accuracy_at.round(4).tolist(),
            "score": scores[order].round(4).tolist(),
        },
    }
