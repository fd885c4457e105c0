"""Metrics of a multi-label model: several findings per film, each a yes/no of its own.

``choose_thresholds`` picks each finding's decision threshold on validation (Youden's J);
``compute_multilabel_metrics`` turns targets (N, F) with NaN for unknown and probabilities (N, F)
into the multilabel ``metrics.json``: per finding AUROC (read against chance), average precision
beside its baseline (the prevalence), sensitivity and specificity at the threshold; macro and micro
AUROC; a 95% interval for each, in the conventions of ``metrics`` (exact binomial intervals for
proportions of images, a seeded percentile bootstrap over images for the rest).
``prevalence_table`` counts each finding's positives per part (split, site). An unknown entry is
left out of its finding's figures, never read as negative. Works on numpy arrays; holds no
training code, draws nothing (``plots``) and writes no HTML (``report_multilabel``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from lungxray.errors import ConfigError
from lungxray.metrics import BOOTSTRAP_RESAMPLES, against_chance, proportion_ci

# What each interval in ci95 is, as metrics.INTERVALS says it for a single-label model.
INTERVALS = {
    "sensitivity/<finding>, specificity/<finding>": "Clopper-Pearson exact (binomial)",
    "macro_auroc, micro_auroc, auroc/<finding>, average_precision/<finding>": "percentile bootstrap over images",
}
RULES = ("youden",)
# Resampled entries one pass of the bootstrap holds in memory (int32: 4 bytes each).
CHUNK_ENTRIES = 4_000_000
# The most known entries x resamples the bootstrap scores (about 2.5 s of one core): the full 2,000
# resamples up to 300,000 known entries (20,000 films x 14 findings, all known, are 280,000); fewer
# beyond, never under MIN_RESAMPLES, and metrics.json's "bootstrap" says so.
BOOTSTRAP_BUDGET = 600_000_000
MIN_RESAMPLES = 500


def choose_thresholds(
    y_val: np.ndarray,
    p_val: np.ndarray,
    findings: list[str],
    rule: str = "youden",
    prevalence: Mapping[str, float] | None = None,
) -> dict[str, dict]:
    """Each finding's decision threshold (positive when p >= threshold), chosen on the validation
    targets ``y_val`` (N, F; NaN unknown) and probabilities ``p_val`` (N, F).

    ``rule`` "youden": the threshold of the ROC point with the largest sensitivity + specificity
    - 1 over the known entries (of tied points, the highest threshold). A finding without a
    positive or without a negative among its known validation entries has no ROC curve: its
    threshold is its training ``prevalence`` when given, else 0.5, and ``reason`` says why.
    Returns finding -> {"threshold", "rule", "n_pos", "n_neg"} (+ "reason" for a fallback)."""
    if rule not in RULES:
        raise ConfigError(f"unknown threshold rule {rule!r}", hint=f"use one of: {', '.join(RULES)}")
    y_val, p_val = np.asarray(y_val, dtype=np.float64), np.asarray(p_val, dtype=np.float64)
    chosen = {}
    for f, name in enumerate(findings):
        known = ~np.isnan(y_val[:, f])
        truth, scores = y_val[known, f], p_val[known, f]
        n_pos = int((truth == 1).sum())
        entry = {"n_pos": n_pos, "n_neg": int(len(truth) - n_pos)}
        if n_pos and entry["n_neg"]:
            fpr, tpr, cut = roc_curve(truth, scores)
            best = 1 + int(np.argmax((tpr - fpr)[1:]))  # cut[0] is +inf: the point where nothing is positive
            chosen[name] = {"threshold": float(cut[best]), "rule": rule, **entry}
            continue
        missing = "positive" if not n_pos else "negative"
        # a prevalence of 0 or 1 (training saw one side only) would call the finding present on every
        # film or on none: 0.5 then
        given = prevalence is not None and name in prevalence and 0 < prevalence[name] < 1
        chosen[name] = {
            "threshold": float(prevalence[name]) if given else 0.5,
            "rule": "training prevalence" if given else "fixed 0.5",
            **entry,
            "reason": f"no {missing} among the {len(truth)} known validation entries: no ROC curve to choose on",
        }
    return chosen


def _threshold(value: float | dict) -> float:
    """A threshold given as a number (a bundle's config.json) or as ``choose_thresholds``' entry."""
    return float(value["threshold"] if isinstance(value, Mapping) else value)


def _finding(truth: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """The point figures of one finding on its known entries: targets ``truth`` (n,) 0/1."""
    n_pos = int((truth == 1).sum())
    n_neg = len(truth) - n_pos
    predicted = scores >= threshold
    tp, tn = int((predicted & (truth == 1)).sum()), int((~predicted & (truth == 0)).sum())
    prevalence = n_pos / len(truth) if len(truth) else None
    return {
        "n_known": int(len(truth)),
        "n_pos": n_pos,
        "prevalence": prevalence,
        "auroc": float(roc_auc_score(truth, scores)) if n_pos and n_neg else None,
        "average_precision": float(average_precision_score(truth, scores)) if n_pos else None,
        "average_precision_baseline": prevalence,
        "threshold": threshold,
        "sensitivity": tp / n_pos if n_pos else None,
        "specificity": tn / n_neg if n_neg else None,
        "counts": {"true_positives": tp, "positives": n_pos, "true_negatives": tn, "negatives": n_neg},
    }


def compute_multilabel_metrics(
    y: np.ndarray,
    probs: np.ndarray,
    findings: list[str],
    thresholds: Mapping[str, float | dict],
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict:
    """``metrics.json`` of a multi-label model for targets ``y`` (N, F; 1, 0, NaN unknown) and
    probabilities ``probs`` (N, F) under per-finding ``thresholds`` (finding -> number, or
    ``choose_thresholds``' entries).

    Each finding's figures read its known entries only. AUROC is None without both sides, average
    precision None without a positive; ``macro_auroc`` averages the defined AUROCs, ``micro_auroc``
    pools every known entry. ``ci95`` comes from ``resamples`` bootstrap resamples of the images
    drawn with ``seed`` (0: no intervals); sensitivity and specificity get exact intervals."""
    y, probs = np.asarray(y, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    if y.shape != probs.shape or y.ndim != 2 or y.shape[1] != len(findings):
        raise ValueError(f"targets {y.shape} and probabilities {probs.shape} must both be (N, {len(findings)})")
    known = ~np.isnan(y)
    per_finding = {}
    for f, name in enumerate(findings):
        per_finding[name] = _finding(y[known[:, f], f], probs[known[:, f], f], _threshold(thresholds[name]))
        if isinstance(thresholds[name], Mapping):
            per_finding[name]["threshold_rule"] = thresholds[name]["rule"]
    defined = [m["auroc"] for m in per_finding.values() if m["auroc"] is not None]
    pooled = y[known]
    # Pooled over findings, an AUROC rewards each finding's prevalence alone: its baseline is the
    # micro AUROC of answering every film with each finding's prevalence, not 0.5.
    shares = np.array([m["prevalence"] if m["prevalence"] is not None else 0.0 for m in per_finding.values()])
    micro_ok = 0 < pooled.sum() < len(pooled)
    micro_baseline = float(roc_auc_score(pooled, np.broadcast_to(shares, y.shape)[known])) if micro_ok else None
    metrics = {
        "task": "multilabel",
        "findings": list(findings),
        "n": int(len(y)),
        "per_finding": per_finding,
        "macro_auroc": float(np.mean(defined)) if defined else None,
        "micro_auroc": float(roc_auc_score(pooled, probs[known])) if micro_ok else None,
        "baseline": {
            "auroc": 0.5,
            "macro_auroc": 0.5,
            "micro_auroc": micro_baseline,
            "average_precision": {name: m["prevalence"] for name, m in per_finding.items()},
        },
    }
    if resamples:
        _add_intervals(metrics, y, probs, seed, resamples)
    return metrics


def _add_intervals(metrics: dict, y: np.ndarray, probs: np.ndarray, seed: int, resamples: int) -> None:
    """Fill ``ci95``, ``bootstrap``, ``intervals`` and each AUROC's reading against chance."""
    findings, per_finding = metrics["findings"], metrics["per_finding"]
    entries = int((~np.isnan(y)).sum())
    used = min(resamples, max(MIN_RESAMPLES, BOOTSTRAP_BUDGET // max(1, entries)))
    ci = bootstrap_ci(y, probs, findings, resamples=used, seed=seed)
    for name, m in per_finding.items():
        counts = m["counts"]
        ci[f"sensitivity/{name}"] = proportion_ci(counts["true_positives"], counts["positives"])
        ci[f"specificity/{name}"] = proportion_ci(counts["true_negatives"], counts["negatives"])
        m["auroc_vs_chance"] = against_chance(m["auroc"], ci.get(f"auroc/{name}"))
    metrics["macro_auroc_vs_chance"] = against_chance(metrics["macro_auroc"], ci.get("macro_auroc"))
    metrics["micro_auroc_vs_chance"] = against_prevalence(metrics["micro_auroc"], ci.get("micro_auroc"),
                                                          metrics["baseline"]["micro_auroc"])  # fmt: skip
    metrics["ci95"] = ci
    metrics["bootstrap"] = {"method": "percentile", "resamples": used, "seed": seed, "unit": "image"}
    if used < resamples:
        metrics["bootstrap"] |= {
            "requested": resamples,
            "reduced": f"{entries} known entries: {used} resamples keep the bootstrap near "
            f"{BOOTSTRAP_BUDGET:,} resampled entries",
        }
    metrics["intervals"] = INTERVALS


def against_prevalence(auroc: float | None, ci: list[float] | None, baseline: float | None) -> str | None:
    """A micro AUROC read through its interval against ``baseline``, what answering each finding's
    prevalence alone scores (``against_chance``'s words, with that baseline for 0.5)."""
    if auroc is None or ci is None or baseline is None:
        return None
    words = f"the findings' prevalences alone ({baseline:.2f})"
    if ci[0] > baseline:
        return f"better than {words}"
    return f"worse than {words}" if ci[1] < baseline else f"no better than {words}"


class Ranked(NamedTuple):
    """Known entries placed once against the distinct scores of their positives, u_0 < u_1 < ...
    (``n_groups`` of them), for ``ranked_figures`` to score under any resample: ``pos_rows`` the
    images of the positives, ``pos_group`` the u each has; ``neg_rows`` the images of the
    negatives, ``neg_bin`` their bin: 2k below u_k (and above u_(k-1)), 2k + 1 tied with u_k,
    2 n_groups above them all."""

    pos_rows: np.ndarray
    pos_group: np.ndarray
    neg_rows: np.ndarray
    neg_bin: np.ndarray
    n_groups: int


def rank_entries(rows: np.ndarray, truth: np.ndarray, scores: np.ndarray) -> Ranked:
    """A ``Ranked`` of the entries (image ``rows``, 0/1 ``truth``, ``scores``), each (n,)."""
    positive = truth == 1
    distinct, group = np.unique(scores[positive], return_inverse=True)
    negative = scores[~positive]
    below = np.searchsorted(distinct, negative)  # distinct positive scores under each negative
    tied = distinct[np.minimum(below, len(distinct) - 1)] == negative if len(distinct) else below < 0
    return Ranked(rows[positive], group, rows[~positive], 2 * below + tied, len(distinct))


def ranked_figures(pos_groups: np.ndarray, neg_bins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUROC, average precision), each (B,), under B resamples of the entries of a ``Ranked``:
    ``pos_groups`` (B, n_groups) how often the positives scored u_k are drawn, ``neg_bins``
    (B, 2 n_groups + 1) how often the negatives of each bin are; both int32.

    AUROC is the Mann-Whitney count (a tied negative counts half); average precision sklearn's sum
    over the distinct thresholds of the recall step times the precision there. Both equal
    sklearn's with the draws as ``sample_weight``, and read one number per distinct positive
    score, not one per entry."""
    neg_up_to = np.cumsum(neg_bins, axis=1, dtype=np.int32)  # counts: exact, and faster than floats
    neg_under, neg_tied = neg_up_to[:, 0:-1:2], neg_bins[:, 1::2]  # (B, n_groups)
    pos_under = np.cumsum(pos_groups, axis=1, dtype=np.int32) - pos_groups
    total_pos, total_neg = pos_groups.sum(axis=1), neg_up_to[:, -1]
    at_or_above = (total_pos + total_neg)[:, None] - neg_under - pos_under
    np.maximum(at_or_above, 1, out=at_or_above)  # 0 only where no positive of the group is drawn
    pairs = np.multiply(pos_groups, 2 * neg_under + neg_tied, dtype=np.int64).sum(axis=1)  # twice the pairs in order
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without one side: NaN
        auroc = pairs / (2.0 * total_pos * total_neg)
        precision = (total_pos[:, None] - pos_under) / at_or_above
        average_precision = (pos_groups * precision).sum(axis=1) / total_pos
    return auroc, average_precision


def _bins_matrix(ranked: list[Ranked], n: int):
    """(rows, N) sparse, and where each ``Ranked``'s rows begin: its 2 n_groups + 1 bins of
    negatives, then its n_groups of positives, each counting the images in it; its product with
    the draws (N, B) gives how often each bin is drawn."""
    from scipy.sparse import csr_matrix

    sizes = [3 * r.n_groups + 1 for r in ranked]
    offsets = np.cumsum([0] + sizes)
    bins = [np.r_[r.neg_bin, 2 * r.n_groups + 1 + r.pos_group] + o for r, o in zip(ranked, offsets, strict=False)]
    rows = [np.r_[r.neg_rows, r.pos_rows] for r in ranked]
    bins, rows = np.concatenate(bins), np.concatenate(rows)
    ones = np.ones(len(bins), dtype=np.int32)  # counts up to N x F: int32 holds them
    return csr_matrix((ones, (bins, rows)), shape=(offsets[-1], n)), offsets  # duplicates add up


class _Layout(NamedTuple):
    """What the bootstrap scores each resample on: each finding's ``Ranked`` then all known entries
    pooled (micro), ``bins`` their bins against the images (``_bins_matrix``) and where each one's
    rows begin, and the findings whose AUROC is defined on all the images (macro averages those)."""

    ranked: list[Ranked]
    bins: object
    offsets: np.ndarray
    defined: list[int]


def _layout(y: np.ndarray, probs: np.ndarray) -> _Layout:
    known = ~np.isnan(y)
    image = np.broadcast_to(np.arange(len(y))[:, None], y.shape)
    ranked = [rank_entries(image[known[:, f], f], y[known[:, f], f], probs[known[:, f], f]) for f in
              range(y.shape[1])]  # fmt: skip
    ranked.append(rank_entries(image[known], y[known], probs[known]))
    bins, offsets = _bins_matrix(ranked, len(y))
    defined = [f for f, r in enumerate(ranked[:-1]) if len(r.pos_rows) and len(r.neg_rows)]
    return _Layout(ranked, bins, offsets, defined)


def _resampled_figures(layout: _Layout, draws: np.ndarray) -> np.ndarray:
    """Every figure of each of B resamples: ``draws`` (N, B) int32, how often each image is drawn
    -> (2 F + 2, B): auroc and average precision of each finding in turn, macro and micro AUROC."""
    drawn = np.ascontiguousarray((layout.bins @ draws).T)  # (B, bins) how often each bin is drawn
    figures = []
    for r, o in zip(layout.ranked, layout.offsets, strict=False):
        negatives, positives = o + 2 * r.n_groups + 1, o + 3 * r.n_groups + 1
        figures.append(ranked_figures(drawn[:, negatives:positives], drawn[:, o:negatives]))
    *findings, (micro, _) = figures
    per_finding = np.concatenate(findings) if findings else np.empty((0, draws.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample in which no AUROC is defined
        macro = np.nanmean(per_finding[[2 * f for f in layout.defined]], axis=0)
    return np.vstack([per_finding, macro, micro])


def bootstrap_ci(
    y: np.ndarray, probs: np.ndarray, findings: list[str], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict[str, list[float] | None]:
    """Percentile-bootstrap 95% intervals of auroc/<finding>, average_precision/<finding>,
    macro_auroc and micro_auroc: ``resamples`` draws of the N images with replacement (an image
    brings all its findings along) from numpy's generator seeded with ``seed``; the macro AUROC of
    a resample averages the findings defined in it. None where some resample leaves a finding
    without one side (as ``metrics.bootstrap_ci``'s intervals are)."""
    n = len(y)
    layout = _layout(np.asarray(y, dtype=np.float64), np.asarray(probs, dtype=np.float64))
    names = [f"{k}/{name}" for name in findings for k in ("auroc", "average_precision")]
    names += ["macro_auroc", "micro_auroc"]
    values = np.empty((len(names), resamples))
    rng = np.random.default_rng(seed)
    step = max(1, CHUNK_ENTRIES // (n + layout.bins.shape[0]))  # resamples per pass
    for lo in range(0, resamples, step):
        b = min(step, resamples - lo)
        drawn = rng.integers(0, n, (b, n)) * b + np.arange(b)[:, None]
        draws = np.bincount(drawn.ravel(), minlength=n * b).reshape(n, b).astype(np.int32)  # (N, b)
        values[:, lo : lo + b] = _resampled_figures(layout, draws)
    low, high = np.percentile(values, [2.5, 97.5], axis=1)  # NaN where any resample is NaN
    return {
        k: [float(low[i]), float(high[i])] if np.isfinite(low[i]) and np.isfinite(high[i]) else None
        for i, k in enumerate(names)
    }


def prevalence_table(targets: np.ndarray, findings: list[str], parts: Mapping[str, np.ndarray]) -> dict:
    """Each finding's positives among its known entries in each part: ``parts`` maps a part's name
    (train / val / test, a site) to its rows of ``targets`` (N, F; NaN unknown), as indices or a
    boolean mask. Returns part -> finding -> {"positives", "known", "prevalence" (None when no
    entry is known)}."""
    targets = np.asarray(targets, dtype=np.float64)
    table = {}
    for part, rows in parts.items():
        y = targets[np.asarray(rows)]
        known = (~np.isnan(y)).sum(axis=0)
        positives = (y == 1).sum(axis=0)
        table[part] = {
            name: {
                "positives": int(positives[f]),
                "known": int(known[f]),
                "prevalence": float(positives[f] / known[f]) if known[f] else None,
            }
            for f, name in enumerate(findings)
        }
    return table
