"""A multi-label bundle scored on labelled images: ``evaluation.evaluate_split``'s counterpart for
models whose classes are findings, each film any number of them (``metrics_multilabel``).

Writes metrics.json (per finding: AUROC and average precision with their baselines, sensitivity
and specificity at the finding's threshold, intervals; macro and micro AUROC; the prevalence of
each finding per site) and predictions.json (each image's targets, probabilities before and after
the per-finding temperatures, the findings at or above their thresholds, its out-of-distribution
score). The single-label figures (accuracy, confusion matrix, coverage curve) have no meaning here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lungxray import runfolder
from lungxray.data import Dataset
from lungxray.errors import DataError
from lungxray.metrics_multilabel import compute_multilabel_metrics, prevalence_table
from lungxray.ood import ood_fields
from lungxray.predictor import Predictor


def targets_for(predictor: Predictor, ds: Dataset, idx: np.ndarray) -> np.ndarray:
    """The targets (len(idx), F) of samples ``idx`` in the model's finding order: a finding the
    data never names is negative throughout where a film's unnamed findings are negative (a label
    column, class folders), else unknown (NaN: a column per finding, none for it); a finding the
    model does not know is an error."""
    if ds.task != "multilabel":
        raise DataError(
            f"the model finds several findings per film, but {ds.root} was read with one label per film",
            hint="read it as the training data was: --layout, --label-sep or --finding-cols",
        )
    unknown = sorted(set(ds.classes) - set(predictor.classes_))
    if unknown:
        raise DataError(
            f"{ds.root} labels finding(s) the model does not know: {', '.join(unknown)}; "
            f"the model knows {', '.join(predictor.classes_)}",
            hint="drop or rename them with --map (e.g. --map 'Pleural Effusion=effusion'), as the training data was",
        )
    size = predictor.preprocessing_.img_size
    if ds.images.shape[1] != size:
        raise ValueError(f"images were preprocessed at {ds.images.shape[1]} px but the model expects {size} px")
    theirs = ds.targets[idx]
    unnamed = 0.0 if ds.unnamed_negative else np.nan
    y = np.full((len(idx), len(predictor.classes_)), unnamed, dtype=np.float32)
    for f, name in enumerate(predictor.classes_):
        if name in ds.classes:
            y[:, f] = theirs[:, ds.classes.index(name)]
    return y


def evaluate_multilabel(
    predictor: Predictor, ds: Dataset, idx: np.ndarray, out: Path, extra: dict | None = None, seed: int = 0
) -> dict:
    """Score samples ``idx`` of ``ds`` with the multi-label bundle ``predictor``; writes metrics.json
    (with ``extra`` added) and predictions.json to ``out``; returns the metrics."""
    y = targets_for(predictor, ds, idx)
    logits = predictor.predict_logits(ds.images[idx])  # one pass, read with and without the temperatures
    probs, raw = predictor.probabilities(logits), predictor.probabilities(logits, calibrated=False)
    scores = predictor.ood_scores(ds.images[idx])
    findings = list(predictor.classes_)
    metrics = compute_multilabel_metrics(y, probs, findings, predictor.thresholds_, seed=seed)
    extra = dict(extra or {})
    prevalence = extra.pop("prevalence", {})  # the caller's (per split), beside the sites' below
    sites = sorted({ds.samples[i].site for i in idx} - {None})
    if len(sites) > 1:
        where = np.array([ds.samples[i].site for i in idx], dtype=object)
        prevalence["per site"] = prevalence_table(y, findings, {s: where == s for s in sites})
    if prevalence:
        metrics["prevalence"] = prevalence
    flagged = None if scores is None else scores > 1.0
    metrics["ood"] = (
        None
        if flagged is None
        else {"threshold": 1.0, "n_flagged": int(flagged.sum()), "share_flagged": float(flagged.mean())}
    )
    metrics["calibration"] = {
        "temperatures": dict(zip(findings, map(float, predictor.temperatures_), strict=True)),
        "thresholds": predictor.thresholds_,
    }
    metrics |= extra
    runfolder.write_json(out, runfolder.PREDICTIONS, _predictions(predictor, ds, idx, (y, probs, raw), scores))
    runfolder.write_json(out, runfolder.METRICS, metrics)
    return metrics


def _predictions(predictor: Predictor, ds: Dataset, idx: np.ndarray, scored: tuple, scores) -> dict:
    """predictions.json: per image its targets ({finding: 1, 0 or None}), its probabilities as
    served and before the temperatures, and the answer ``Predictor.describe`` gives."""
    y, probs, raw = scored
    findings = list(predictor.classes_)
    images = []
    for k, i in enumerate(idx):
        sample = ds.samples[i]
        answer = predictor.describe(probs[k], None if scores is None else float(scores[k]))
        images.append(
            {"path": str(sample.path), "label": sample.label,
             "targets": {f: None if np.isnan(v) else int(v) for f, v in zip(findings, y[k], strict=True)},
             "probabilities": answer["probabilities"], "findings": answer["findings"], "class": answer["class"],
             "uncalibrated": dict(zip(findings, map(float, raw[k]), strict=True)),
             **ood_fields(None if scores is None else scores[k])}
            | ({"site": sample.site} if sample.site is not None else {})
            | ({"meta": sample.meta} if sample.meta else {})
        )  # fmt: skip
    return {"task": "multilabel", "classes": findings, "thresholds": predictor.thresholds_, "images": images}


def score_test_split(predictor: Predictor, ds: Dataset, split, out: Path, extra: dict, seed: int) -> dict:
    """``run``'s one read of a multi-label test split (``evaluate_multilabel``), with each finding's
    prevalence per part of the split beside it. The shortcut audit, which compares single-label
    accuracies, is not made for findings yet, and metrics.json says so."""
    parts = {"train": split.train, "val": split.val, "test": split.test}
    extra = extra | {"audit": "not made: the shortcut audit compares single-label accuracies",
                     "prevalence": {"per split": prevalence_table(ds.targets, ds.classes, parts)}}  # fmt: skip
    return evaluate_multilabel(predictor, ds, split.test, out, extra, seed=seed)
