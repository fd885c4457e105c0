"""Calibration of a multi-label model, fitted on the validation split after training: a temperature
per finding (its probability sigmoid(logit / T)) and a decision threshold per finding.

Each finding's temperature follows ``metrics.calibrate``'s rule for a single-label model, on that
finding's known validation entries: fitted by the binary log-loss, used only when it lowers the
log-loss measured out of sample by ``MIN_LOG_LOSS_GAIN``, is not on a search bound and does not
sharpen a finding the model decided right everywhere; otherwise T = 1. Thresholds are chosen on the
calibrated probabilities (``metrics_multilabel.choose_thresholds``), the ones a served prediction
compares with them. ``calibrate_multilabel`` gives what a bundle's config.json stores. Works on
numpy arrays; holds no training code and imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.special import expit

from lungxray.metrics import MIN_CALIBRATION_IMAGES, TEMPERATURE_BOUNDS, calibration_verdict
from lungxray.metrics_multilabel import choose_thresholds

# A threshold stays inside (0, 1), where a bundle's config.json must hold it: the ROC point
# chosen may sit at a probability that float64 rounds to 0 or 1.
THRESHOLD_MARGIN = 1e-6


def binary_log_loss(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean log-loss of sigmoid(logits / temperature) against 0/1 targets ``y`` (n,), computed from
    the logits (log(1 + e^z) - y z) so that a confident logit costs what it should, not log(eps)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_binary_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T in ``TEMPERATURE_BOUNDS`` that minimises ``binary_log_loss`` (a bounded search over log T)."""
    from scipy.optimize import minimize_scalar

    low, high = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    best = minimize_scalar(
        lambda log_t: binary_log_loss(logits, y, float(np.exp(log_t))), bounds=(low, high), method="bounded"
    )
    return float(np.exp(best.x))


def cross_validated_binary_log_loss(logits: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Mean log-loss of each entry under a temperature fitted on the other folds (``metrics.
    cross_validated_log_loss`` for one finding)."""
    from sklearn.model_selection import KFold

    losses = np.zeros(len(y))
    split = KFold(n_splits=min(folds, len(y)), shuffle=True, random_state=seed)
    for fit_idx, held in split.split(logits):
        t = fit_binary_temperature(logits[fit_idx], y[fit_idx])
        z = logits[held] / t
        losses[held] = np.logaddexp(0.0, z) - y[held] * z
    return float(losses.mean())


def finding_temperature(logits: np.ndarray, y: np.ndarray) -> dict:
    """One finding's temperature from its known validation ``logits`` (n,) and 0/1 targets ``y``:
    {"temperature" (1.0 unless applied), "applied", "reason", "n", and the log-losses it rests on}."""
    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(y)
    if n < MIN_CALIBRATION_IMAGES:
        reason = f"fewer than {MIN_CALIBRATION_IMAGES} known validation entries"
        return {"temperature": 1.0, "applied": False, "n": n, "reason": reason}
    fitted = fit_binary_temperature(logits, y)
    losses = {
        "before": binary_log_loss(logits, y),
        "fitted": binary_log_loss(logits, y, fitted),
        "held_out": cross_validated_binary_log_loss(logits, y),
        "bound": min(binary_log_loss(logits, y, t) for t in TEMPERATURE_BOUNDS),
    }
    wrong = int(((expit(logits) >= 0.5) != (y == 1)).sum())
    reason = calibration_verdict(fitted, losses, wrong, ("entry", "entries"), "0 or 1")
    temperature = fitted if reason is None else 1.0
    before, held_out = losses["before"], losses["held_out"]
    gain = f"lowers the validation log-loss from {before:.4f} to {held_out:.4f} (fitted on other folds of it)"
    return {
        "temperature": temperature,
        "fitted_temperature": fitted,
        "applied": reason is None,
        "n": n,
        "reason": reason or gain,
        "val_loss_before": losses["before"],
        "val_loss_after": binary_log_loss(logits, y, temperature),
        "val_loss_cross_validated": losses["held_out"],
    }


def calibrate_multilabel(
    val_logits: np.ndarray,
    y_val: np.ndarray,
    findings: list[str],
    prevalence: Mapping[str, float] | None = None,
    rule: str = "youden",
) -> dict:
    """Per-finding temperatures and thresholds fitted on validation logits (N, F) and targets
    ``y_val`` (N, F; 1, 0, NaN unknown), findings in output order.

    Returns {"method", "fitted_on", "temperatures": {finding: T}, "thresholds": {finding: t},
    "threshold_rule", "reason" (one line), "per_finding": {finding: the temperature's decision
    (``finding_temperature``) and the threshold's (``choose_thresholds``)}}. ``prevalence``: each
    finding's training prevalence, the threshold of a finding whose known validation entries lack
    a positive or a negative (else 0.5). Every threshold lies in (0, 1), every temperature in
    ``TEMPERATURE_BOUNDS`` or is 1.0.
    """
    logits, y = np.asarray(val_logits, dtype=np.float64), np.asarray(y_val, dtype=np.float64)
    if logits.shape != y.shape or logits.ndim != 2 or logits.shape[1] != len(findings):
        raise ValueError(f"logits {logits.shape} and targets {y.shape} must both be (N, {len(findings)})")
    per_finding = {}
    for f, name in enumerate(findings):
        known = ~np.isnan(y[:, f])
        per_finding[name] = finding_temperature(logits[known, f], y[known, f])
    temperatures = {name: float(entry["temperature"]) for name, entry in per_finding.items()}
    probs = expit(logits / np.array([temperatures[name] for name in findings]))  # (N, F) as served
    chosen = choose_thresholds(y, probs, list(findings), rule=rule, prevalence=prevalence)
    thresholds = {}
    for name in findings:
        thresholds[name] = float(np.clip(chosen[name]["threshold"], THRESHOLD_MARGIN, 1 - THRESHOLD_MARGIN))
        per_finding[name]["threshold"] = {**chosen[name], "threshold": thresholds[name]}
    applied = sum(entry["applied"] for entry in per_finding.values())
    return {
        "method": "temperature scaling per finding" if applied else "none",
        "fitted_on": "validation",
        "temperatures": temperatures,
        "thresholds": thresholds,
        "threshold_rule": rule,
        "reason": f"temperature applied to {applied} of {len(findings)} findings, each only where it lowers that "
        f"finding's validation log-loss measured out of sample; thresholds by {rule} on the calibrated probabilities",
        "per_finding": per_finding,
    }


def prevalence(targets: np.ndarray, findings: list[str]) -> dict[str, float]:
    """Each finding's share of positives among its known (non-NaN) entries of ``targets`` (N, F);
    0.5 for a finding with none known."""
    known = (~np.isnan(targets)).sum(axis=0)
    shares = np.where(known > 0, np.nansum(targets, axis=0) / np.maximum(known, 1), 0.5)
    return {name: float(v) for name, v in zip(findings, shares, strict=True)}
