"""k-fold cross-validation: one model per fold, scored on the pooled out-of-fold predictions.

``cross_validate`` makes stratified, duplicate-grouped folds (``splits.make_folds``), fits each
fold's model with fixed hyperparameters or tunes it inside the fold's training part, and writes
cv.json (per fold, mean +- std over folds, pooled metrics with bootstrap CIs, every image's
out-of-fold probabilities), folds.json, scan.json and the report into the output folder.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import numpy as np
import torch

from lungxray import runfolder
from lungxray.data import Dataset, load_dataset
from lungxray.errors import ConfigError, ParamsError
from lungxray.evaluation import by_name
from lungxray.infer import predict_logits, set_threads
from lungxray.job import Job
from lungxray.learnable import trainable
from lungxray.metrics import compute_metrics, fit_class_bias
from lungxray.models import get_spec
from lungxray.pipeline import (
    Clock,
    check_content,
    fingerprint,
    fit_data,
    jsonable,
    scan_summary,
    search_settings,
    tensors,
)
from lungxray.plots import confusion_figure, save_figure
from lungxray.progress import note, stage
from lungxray.splits import Split, make_folds, multilabel_cv_folds, site_folds
from lungxray.train import FitResult, fit
from lungxray.version import __version__

CV_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")


def _fold_values(metrics: dict) -> dict[str, float | None]:
    """The cross-validated figures of one metrics dict, flat: accuracy, ..., recall/<class>, ...;
    of a multi-label one: macro and micro AUROC, then AUROC, average precision, sensitivity and
    specificity per finding."""
    if metrics.get("task") == "multilabel":
        values = {k: metrics[k] for k in ("macro_auroc", "micro_auroc")}
        for name, m in metrics["per_finding"].items():
            values |= {f"{k}/{name}": m[k] for k in ("auroc", "average_precision", "sensitivity", "specificity")}
        return values
    values = {k: metrics[k] for k in CV_METRICS}
    for name, m in metrics["per_class"].items():
        if m["support"]:
            values |= {
                f"recall/{name}": m["recall"],
                f"specificity/{name}": m["specificity"],
                f"auroc/{name}": m["auroc"],
            }
    return values


def _fold_model(job: Job, ds: Dataset, fold: Split, index: int, params: dict | None) -> tuple[FitResult, dict]:
    """Fit one fold's model on its training part, with fixed ``params`` or tuned on its val part
    (a study per fold, named after it)."""
    data = fit_data(ds, fold)
    if params is not None:
        return fit(job.model, params, data, job.final.for_params(params), progress=job.progress), params
    from lungxray.tune import tune

    storage = runfolder.study_storage(job.out, job.search.storage)
    fold_search = replace(job.search, study_name=f"{job.search.study_name}-fold{index + 1}")
    tuned = tune(job.model, data, fold_search, job.trial, storage, progress=job.progress)
    same = tuned.best_fit if replace(job.trial, threads=0) == replace(job.final, threads=0) else None
    cfg = job.final.for_params(tuned.best_params)
    return same or fit(job.model, tuned.best_params, data, cfg, progress=job.progress), tuned.best_params


def cross_validate(job: Job, params: dict | None = None) -> dict:
    """k-fold cross-validation; writes cv.json, folds.json, scan.json, cv_confusion_matrix.png and
    report.html to ``job.out``; returns cv.json's content.

    ``params``: fixed hyperparameters for every fold (None: the model's registered defaults);
    ``job.cv.tune`` instead tunes inside each fold's training part with ``job.search``. The seed
    (``job.seed``) seeds the folds, the training and the bootstrap. ``job.cv.repeats`` > 1 trains
    the same folds again with the training seeds seed + 1, seed + 2, ...: cv.json's
    ``seed_spread`` gives each metric's mean and std over those seeds, as one cv run is one draw.
    """
    if job.cv.tune and params is not None:
        raise ParamsError(
            "--tune and --params exclude each other",
            hint="tune inside each fold (--tune), or give fixed parameters (--params FILE)",
        )
    if not job.cv.tune and params is None:
        params = dict(get_spec(job.model).defaults)
    runfolder.refuse_to_replace(job.out, runfolder.CV, job.force, "a cross-validation")
    with runfolder.writer_lock(job.out, job.data):
        return _cross_validate(job, params)


def _cross_validate(job: Job, params: dict | None) -> dict:
    """``cross_validate`` under the folder's writer lock."""
    from lungxray.progress import bar as progress_bar

    out, seed = job.out, job.final.seed
    by_site = job.cv.by == "site"
    if job.split.val_by == "site" and not by_site:
        raise ConfigError("--val-by site validates on a site other than each fold's test", hint="add --by site")
    folds = {"folds": job.cv.folds}
    if by_site:
        folds = {"by": "site"} | ({"val_by": "site"} if job.split.val_by == "site" else {})
    made_from = fingerprint(job, seed=seed, **folds)
    runfolder.check_fingerprint(out, made_from)  # its studies (--tune) belong to these folds
    set_threads(job.final.threads)
    clock = Clock()
    stage(f"scanning {', '.join(map(str, job.data))}", job.progress)
    ds = trainable(load_dataset(job.data, job.dataset, progress=job.progress), job.progress)
    if ds.task == "multilabel" and by_site:
        raise ConfigError("cv --by site takes one label per film, for now", hint="use --folds K for multi-label data")
    parts = (
        site_folds(ds, seed, val_by=job.split.val_by)
        if by_site
        else multilabel_cv_folds(ds.targets, ds.groups, job.cv.folds, seed)
        if ds.task == "multilabel"
        else make_folds(ds.labels, ds.groups, job.cv.folds, seed)
    )
    content = check_content(job, ds, made_from)  # the same images as its studies (--tune) were made from
    if any(s.patient for s in ds.samples):  # folds.json names patients by this folder's own key
        ds.rekey_patients(runfolder.secret_key(out / runfolder.PATIENT_KEY))
    runfolder.record_fingerprint(out, made_from, content)
    scan = scan_summary(ds, seed, job.progress)
    runfolder.write_json(out, runfolder.SCAN, scan)
    runfolder.write_json(out, runfolder.FOLDS, [part.to_json(ds) for part in parts])
    runs = []
    repeats = job.cv.repeats
    how = "tuned inside each fold" if params is None else "fixed parameters"
    seeds = f", {repeats} training seeds" if repeats > 1 else ""
    stage(f"cross-validating: {len(parts)} folds of {job.model}, {how}{seeds}", job.progress)
    for r in progress_bar(range(repeats), desc="training seeds", unit="seed", disable=not job.progress or repeats == 1):
        runs.append(_folds_once(replace(job, train=replace(job.train, seed=seed + r)), ds, parts, params, r))
    clock.lap("folds_s")
    pooled = _pooled(ds, runs[0], seed, parts)
    if ds.task != "multilabel":
        save_figure(confusion_figure(pooled), out / runfolder.CV_CONFUSION)
    report = _report(job, ds, parts, runs, pooled, params) | {"confound": scan["confound"], "timings": clock.laps}
    runfolder.write_json(out, runfolder.CV, report)
    from lungxray.report import write_report

    stage("writing the report", job.progress)
    write_report(out)
    return report


def _report(job: Job, ds: Dataset, parts: list[Split], runs: list, pooled: dict, params: dict | None) -> dict:
    """cv.json's content but its timings."""
    probs, per_fold, n_params = runs[0]
    seed = job.final.seed
    fold_of = np.zeros(len(ds.samples), dtype=np.int64)
    for j, part in enumerate(parts):
        fold_of[part.test] = j + 1
    mean_probs = np.mean([run[0] for run in runs], axis=0)
    repeats = job.cv.repeats
    settings = {
        "data": asdict(job.dataset),
        # with fixed parameters, their batch size; tuned folds record theirs in per_fold
        "train": asdict(job.final.for_params(params)),
        "tune": search_settings(job.search) if params is None else None,
        "split": {"val_by": job.split.val_by},  # the one split setting a cv reads
    }
    targets = ds.targets  # built from the samples on each read: once, not per image
    out_of_fold = [
        {"path": str(s.path), "label": s.label, "fold": int(fold_of[k]), "probabilities": by_name(ds.classes, probs[k])}
        | ({"targets": {c: None if np.isnan(v) else int(v) for c, v in zip(ds.classes, targets[k], strict=True)}}
           if ds.task == "multilabel" else {})
        | ({"probabilities_mean_over_seeds": by_name(ds.classes, mean_probs[k])} if repeats > 1 else {})
        for k, s in enumerate(ds.samples)
    ]  # fmt: skip
    return {
        "lungxray_version": __version__,
        "data": job.data_named,
        "model": job.model,
        "folds": len(parts),
        "by": job.cv.by,
        "seed": seed,
        "repeats": repeats,
        "n_parameters": n_params,
        "groups": ds.group_sizes(),
        "excluded": ds.excluded,
        "tuned_in_each_fold": params is None,
        **({"task": "multilabel"} if ds.task == "multilabel" else {}),
        "settings": jsonable(settings),
        "summary": _cv_summary(per_fold, pooled),
        "pooled": pooled,
        "per_fold": per_fold,
        "seed_spread": _seed_spread(ds, runs, seed, parts) if repeats > 1 else None,
        "out_of_fold": out_of_fold,
    }


def _folds_once(
    job: Job, ds: Dataset, parts: list[Split], params: dict | None, repeat: int
) -> tuple[np.ndarray, list[dict], int]:
    """One model per fold with one training seed (``job.final.seed``): (out-of-fold probabilities
    (N, C), per-fold records, parameters of a fold's model)."""
    from lungxray.progress import bar as progress_bar

    probs = np.zeros((len(ds.samples), len(ds.classes)), dtype=np.float64)
    per_fold = []
    if repeat:  # a study per fold and training seed
        job = replace(job, search=replace(job.search, study_name=f"{job.search.study_name}-seed{job.final.seed}"))
    for i, fold in enumerate(progress_bar(parts, desc="folds", unit="fold", disable=not job.progress)):
        held_out = f" (test site {fold.site})" if fold.site is not None else ""
        seed = f", training seed {job.final.seed}" if job.cv.repeats > 1 else ""
        sizes = " / ".join(str(n) for n in fold.sizes().values())
        stage(f"fold {i + 1}/{len(parts)}{held_out}{seed}: train / val / test {sizes} images", job.progress)
        start = time.perf_counter()
        result, hp = _fold_model(job, ds, fold, i, params)
        fit_s = time.perf_counter() - start
        x_test = tensors(ds, fold.test)[0]
        start = time.perf_counter()
        logits = predict_logits(result.model, x_test).double()
        infer_s = time.perf_counter() - start
        probs[fold.test], fitted = _fold_scores(result, ds, fold, logits)
        trained = len(fold.train) * len(result.history) * job.final.members  # images through training
        per_fold.append(
            {
                "fold": i + 1,
                **({"site": fold.site, "left_out": fold.left_out} if fold.site is not None else {}),
                **fitted,
                **fold.sizes(),
                "training_seed": job.final.seed,
                "params": hp,
                "batch_size": job.final.for_params(hp).batch_size,
                "best_epoch": result.best_epoch,
                "member_best_epochs": result.member_epochs,
                "epochs_run": len(result.history),
                "fit_s": fit_s,
                "train_images_per_s": trained / fit_s if params is not None else None,
                "predict_images_per_s": len(fold.test) / infer_s,
                # a held-out site's figures are results on their own: with their intervals
                "metrics": _scored(ds, fold.test, probs[fold.test], fitted, job.seed if fold.site else None),
            }
        )
        figures = per_fold[-1]["metrics"]
        said = (f"macro AUROC {figures['macro_auroc'] or float('nan'):.4f}" if ds.task == "multilabel"
                else f"accuracy {figures['accuracy']:.4f}, macro-F1 {figures['macro_f1']:.4f}")  # fmt: skip
        note(f"fold {i + 1}/{len(parts)}: test {said} ({fit_s:.0f} s)", job.progress)
    return probs, per_fold, sum(p.numel() for p in result.model.parameters())


def _fold_scores(result: FitResult, ds: Dataset, fold: Split, logits: torch.Tensor) -> tuple[np.ndarray, dict]:
    """The fold's test probabilities from its model's ``logits``, and what was fitted on the fold's
    val part to make or read them: with ``--val-by site`` the class offsets; for a multi-label
    model (a sigmoid per finding) each finding's threshold (``choose_thresholds``)."""
    if ds.task == "multilabel":
        from lungxray.metrics_multilabel import choose_thresholds

        val = torch.sigmoid(predict_logits(result.model, tensors(ds, fold.val)[0]).double()).numpy()
        chosen = choose_thresholds(ds.targets[fold.val], val, ds.classes)
        return torch.sigmoid(logits).numpy(), {"thresholds": {c: e["threshold"] for c, e in chosen.items()}}
    bias = _class_bias(result, ds, fold)
    probs = torch.softmax(logits + torch.tensor(bias or 0.0, dtype=torch.float64), dim=1).numpy()
    return probs, ({"val_site": fold.val_site, "class_bias": bias} if fold.val_site is not None else {})


def _scored(ds: Dataset, idx: np.ndarray, probs: np.ndarray, fitted: dict, seed: int | None) -> dict:
    """The metrics of the images ``idx`` (probabilities ``probs``); with intervals when ``seed`` is given."""
    if ds.task == "multilabel":
        from lungxray.metrics_multilabel import compute_multilabel_metrics

        draws = {"seed": seed} if seed is not None else {"resamples": 0}
        return compute_multilabel_metrics(ds.targets[idx], probs, ds.classes, fitted["thresholds"], **draws)
    return compute_metrics(
        ds.labels[idx], probs, ds.classes, **({"seed": seed} if seed is not None else {"resamples": 0})
    )


def _pooled(ds: Dataset, run: tuple, seed: int, parts: list[Split]) -> dict:
    """The metrics of one training seed's out-of-fold probabilities, with intervals. A multi-label
    model's sensitivity and specificity there count each film's decision at the threshold its own
    fold chose (``_decided_by_folds``); AUROC and average precision need no threshold."""
    probs, per_fold, _ = run
    if ds.task != "multilabel":
        return _scored(ds, np.arange(len(ds.samples)), probs, {}, seed)
    mean = {"thresholds": {c: float(np.mean([f["thresholds"][c] for f in per_fold])) for c in ds.classes}}
    pooled = _scored(ds, np.arange(len(ds.samples)), probs, mean, seed)
    return _decided_by_folds(pooled, ds.targets, probs, [(part.test, f["thresholds"]) for part, f in
                                                        zip(parts, per_fold, strict=True)])  # fmt: skip


def _decided_by_folds(pooled: dict, targets: np.ndarray, probs: np.ndarray, folds: list) -> dict:
    """``pooled``'s sensitivity and specificity per finding (and their exact intervals) counted
    from the decisions the folds made, each film at its fold's threshold (``folds``: (test
    indices, thresholds) each); no single threshold made them, so none is given."""
    from lungxray.metrics import proportion_ci

    decided = np.zeros(probs.shape, dtype=bool)
    for idx, thresholds in folds:
        decided[idx] = probs[idx] >= np.array([thresholds[c] for c in pooled["findings"]])
    for f, name in enumerate(pooled["findings"]):
        known = ~np.isnan(targets[:, f])
        truth, said = targets[known, f] == 1, decided[known, f]
        tp, pos, tn, neg = int((truth & said).sum()), int(truth.sum()), int((~truth & ~said).sum()), int((~truth).sum())
        m = pooled["per_finding"][name]
        m |= {"sensitivity": tp / pos if pos else None, "specificity": tn / neg if neg else None, "threshold": None,
              "threshold_rule": "each fold's own, chosen on its validation part",
              "counts": {"true_positives": tp, "positives": pos, "true_negatives": tn, "negatives": neg}}  # fmt: skip
        if "ci95" in pooled:
            pooled["ci95"][f"sensitivity/{name}"] = proportion_ci(tp, pos)
            pooled["ci95"][f"specificity/{name}"] = proportion_ci(tn, neg)
    return pooled


def _class_bias(result: FitResult, ds: Dataset, fold: Split) -> list[float] | None:
    """With ``--val-by site``: the class offsets fitted on the fold's val site (as a run's bundle
    stores them), else None."""
    if fold.val_site is None:
        return None
    x_val, y_val = tensors(ds, fold.val)
    return fit_class_bias(predict_logits(result.model, x_val).double().numpy(), y_val.numpy())


def _seed_spread(ds: Dataset, runs: list[tuple[np.ndarray, list[dict], int]], seed: int, parts: list[Split]) -> dict:
    """Per metric over training seeds: mean and std of the fold-mean and of the pooled value, each
    seed's pooled value with its bootstrap CI."""
    spread = {}
    per_seed = []
    for run in runs:
        per_seed.append(_cv_summary(run[1], _pooled(ds, run, seed, parts)))
    for name in per_seed[0]:
        means = [s[name]["mean"] for s in per_seed if s[name]["mean"] is not None]
        pooled = [s[name]["pooled"] for s in per_seed if s[name]["pooled"] is not None]
        spread[name] = {
            "fold_mean": {"mean": float(np.mean(means)), "std": float(np.std(means, ddof=1))}
            if len(means) > 1
            else None,
            "pooled": {"mean": float(np.mean(pooled)), "std": float(np.std(pooled, ddof=1))}
            if len(pooled) > 1
            else None,
            "per_seed": [
                {
                    "training_seed": seed + r,
                    "fold_mean": s[name]["mean"],
                    "pooled": s[name]["pooled"],
                    "ci95": s[name]["ci95"],
                }
                for r, s in enumerate(per_seed)
            ],
        }
    return spread


def _cv_summary(per_fold: list[dict], pooled: dict) -> dict:
    """Per metric: mean and sample standard deviation over folds, pooled value and its 95% CI."""
    folds = [_fold_values(f["metrics"]) for f in per_fold]
    pooled_values = _fold_values(pooled)
    summary = {}
    for name in pooled_values:
        values = [f[name] for f in folds if f.get(name) is not None]
        summary[name] = {
            "mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "pooled": pooled_values[name],
            "ci95": pooled.get("ci95", {}).get(name),
        }
    return summary
