"""The stages wired together: scan -> split -> tune -> train -> evaluate -> save, and cross-validation.

Each stage is a function the CLI (and any script) calls; ``run`` chains them and writes the run
folder. The test split is touched once, by ``evaluate_split``, after the model is final.
``cross_validate`` trains one model per fold and scores the pooled out-of-fold predictions.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from lungxray import __version__
from lungxray.bundle import Predictor, attach_metrics, save_bundle
from lungxray.config import DataConfig, SplitConfig, TrainConfig, TuneConfig
from lungxray.data import Dataset, DataError, load_dataset
from lungxray.evaluate import (compute_metrics, expected_calibration_error, fit_temperature, plot_confusion_matrix,
                               plot_curves, softmax, write_metrics)
from lungxray.models import get_spec
from lungxray.splits import Split, make_folds, make_split
from lungxray.train import FitResult, fit, predict_logits, set_threads, to_tensor


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return path


def _jsonable(obj):
    """Paths as strings, so settings can go into config.json and run.json."""
    return json.loads(json.dumps(obj, default=str))


def training_recipe(model_name: str, cfg: TrainConfig) -> dict:
    """What training actually used: ``cfg`` with the model's recipe filled in where ``cfg`` is unset."""
    from lungxray.train import augment_config

    recipe = get_spec(model_name).recipe
    augment = augment_config(cfg, recipe.augment)
    return {"optimizer": cfg.optimizer or recipe.optimizer, "schedule": cfg.schedule or recipe.schedule,
            "augment": asdict(augment) if augment else None}


def prepare(data: Path, data_cfg: DataConfig, split_cfg: SplitConfig, out: Path | None = None,
            progress: bool = True) -> tuple[Dataset, Split]:
    """Scan and split; with ``out``, write scan.json and splits.json there."""
    ds = load_dataset(data, data_cfg, progress=progress)
    split = make_split(ds, split_cfg)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "scan.json", ds.summary())
        _write_json(out / "splits.json", split.to_json(ds))
    return ds, split


def tensors(ds: Dataset, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, 1, H, W) float in [0, 1], y (N,) int64) for the samples ``idx``."""
    return to_tensor(ds.images[idx]), torch.from_numpy(ds.labels[idx])


def tune_stage(ds: Dataset, split: Split, model_name: str, tune_cfg: TuneConfig, train_cfg: TrainConfig,
               out: Path, progress: bool = True):
    """Optuna search on train/val; writes best_params.json and trials.json to ``out``."""
    from lungxray.tune import tune

    storage = tune_cfg.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    result = tune(model_name, tensors(ds, split.train), tensors(ds, split.val), len(ds.classes),
                  tune_cfg, train_cfg, storage, progress=progress)
    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               **t.user_attrs} for t in result.study.trials]
    _write_json(out / "trials.json", trials)
    _write_json(out / "best_params.json", {"model": model_name, "params": result.best_params,
                                            "objective": train_cfg.select_by, "value": result.best_value,
                                            "trial": result.best_trial, "storage": storage})
    return result


def train_stage(ds: Dataset, split: Split, model_name: str, params: dict, train_cfg: TrainConfig,
                data_cfg: DataConfig, out: Path, *, force: bool = False, progress: bool = True,
                trained: FitResult | None = None) -> tuple[FitResult, Path]:
    """Final training on train (watching val); writes history.json, curves.png and model/.

    ``trained``: a run of exactly this training (the best trial, same settings and seed) whose
    model is saved instead of training it a second time.
    """
    result = trained or fit(model_name, params, tensors(ds, split.train), tensors(ds, split.val),
                            len(ds.classes), train_cfg, progress=progress)
    calibration = calibrate(result.model, *tensors(ds, split.val))
    history = result.history_dict()
    _write_json(out / "history.json", {"best_epoch": result.best_epoch, **history})
    plot_curves(history, out / "curves.png", result.best_epoch)
    config = {
        "classes": ds.classes,
        "model": {"name": model_name, "hyperparameters": params,
                  "input_shape": [1, data_cfg.img_size, data_cfg.img_size]},
        "preprocessing": {"img_size": data_cfg.img_size, "color": "grayscale", "resize": "bilinear",
                          "scale": "pixel / 255", "jpeg_reduced_decoding": True},
        "training": {**_jsonable(asdict(train_cfg)), **training_recipe(model_name, train_cfg),
                     "best_epoch": result.best_epoch,
                     "epochs_run": len(result.history), "split_seed": split.seed, "split_mode": split.mode,
                     "from_best_trial": trained is not None,
                     "split_sizes": split.sizes(), "torch_version": torch.__version__},
        "calibration": calibration,
    }
    folder = save_bundle(out / "model", result.model, config, overwrite=force)
    return result, folder


def _labels_for(predictor: Predictor, ds: Dataset, idx: np.ndarray) -> np.ndarray:
    """Integer labels of samples ``idx`` in the model's class order; unknown classes are an error."""
    index = {c: i for i, c in enumerate(predictor.classes_)}
    unknown = sorted(set(ds.classes) - set(index))
    if unknown:
        raise DataError(f"{ds.root} has class folder(s) the model does not know: {', '.join(unknown)}; "
                        f"the model knows {', '.join(predictor.classes_)} (folder names are matched "
                        "after normalising, e.g. 'Viral Pneumonia' -> viral_pneumonia)")
    if ds.images.shape[1] != predictor.img_size_:
        raise ValueError(f"images were preprocessed at {ds.images.shape[1]} px but the model expects "
                         f"{predictor.img_size_} px; load the data with img_size={predictor.img_size_}")
    return np.array([index[ds.samples[i].label] for i in idx], dtype=np.int64)


def audit_split(predictor: Predictor, ds: Dataset, idx: np.ndarray, out: Path) -> dict:
    """The shortcut audit (``explain.audit``) of samples ``idx``; writes audit.json to ``out``."""
    from lungxray.explain import audit

    report = audit(predictor, ds.images[idx], _labels_for(predictor, ds, idx))
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "audit.json", report)
    return report


MIN_CALIBRATION_IMAGES = 20


def calibrate(model: torch.nn.Module, x_val: torch.Tensor, y_val: torch.Tensor) -> dict:
    """Temperature scaling fitted on the validation split, with the validation ECE before and after.

    Below MIN_CALIBRATION_IMAGES validation images one fitted scalar follows the noise (seen: 5
    images gave T = 0.23 and a worse test ECE), so the temperature stays 1 and says why.
    """
    logits = predict_logits(model, x_val).double().numpy()
    y = y_val.numpy()
    if len(y) < MIN_CALIBRATION_IMAGES:
        return {"method": "none", "temperature": 1.0, "n": int(len(y)),
                "reason": f"fewer than {MIN_CALIBRATION_IMAGES} validation images"}
    temperature = fit_temperature(logits, y)
    return {"method": "temperature scaling", "fitted_on": "validation", "n": int(len(y)),
            "temperature": temperature,
            "val_ece_before": expected_calibration_error(y, softmax(logits)),
            "val_ece_after": expected_calibration_error(y, softmax(logits, temperature))}


def evaluate_split(predictor: Predictor, ds: Dataset, idx: np.ndarray, out: Path) -> dict:
    """Evaluate a loaded bundle on samples ``idx`` of ``ds``; writes metrics.json, predictions.json
    (every image's probabilities, temperature-scaled and not) and the confusion-matrix plot."""
    y = _labels_for(predictor, ds, idx)
    logits = predictor.predict_logits(ds.images[idx]).astype(np.float64)
    probs, raw = softmax(logits, predictor.temperature_), softmax(logits)
    metrics = compute_metrics(y, probs, predictor.classes_)
    metrics["calibration"] = {"temperature": predictor.temperature_, "ece": metrics["ece"],
                              "ece_uncalibrated": expected_calibration_error(y, raw)}
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "predictions.json", {
        "classes": predictor.classes_, "temperature": predictor.temperature_,
        "images": [{"path": str(ds.samples[i].path), "label": ds.samples[i].label,
                    "probabilities": [float(v) for v in probs[k]],
                    "uncalibrated": [float(v) for v in raw[k]]} for k, i in enumerate(idx)]})
    write_metrics(metrics, out / "metrics.json")
    plot_confusion_matrix(metrics, out / "confusion_matrix.png")
    return metrics


def run(data: Path, out: Path, model_name: str, data_cfg: DataConfig, split_cfg: SplitConfig,
        tune_cfg: TuneConfig, trial_cfg: TrainConfig, final_cfg: TrainConfig, *, force: bool = False,
        progress: bool = True) -> dict:
    """The whole job; returns (and writes to run.json) a summary with the test metrics and artifacts."""
    if (out / "model").exists() and not force:
        raise FileExistsError(f"{out / 'model'} already holds a model; pass --force to replace it "
                              "(the study resumes), or choose another --out")
    set_threads(final_cfg.threads)
    clock = _Clock()
    ds, split = prepare(data, data_cfg, split_cfg, out, progress)
    clock.lap("scan_and_split_s")
    tuned = tune_stage(ds, split, model_name, tune_cfg, trial_cfg, out, progress)
    clock.lap("tune_s")
    # The final training repeats the best trial exactly when the settings match (same data, seed,
    # epochs, patience): then the trial's model is the final model and is not trained twice.
    same = tuned.best_fit if replace(trial_cfg, threads=0) == replace(final_cfg, threads=0) else None
    fitted, model_dir = train_stage(ds, split, model_name, tuned.best_params, final_cfg, data_cfg,
                                    out, force=force, progress=progress, trained=same)
    clock.lap("train_s")
    predictor = Predictor(model_dir)
    metrics = evaluate_split(predictor, ds, split.test, out)  # the one read of the test split
    metrics["split"] = {"mode": split.mode, "seed": split.seed, **split.sizes(),
                        "test_duplicates_of_train": split.test_duplicates_of_train}
    write_metrics(metrics, out / "metrics.json")
    attach_metrics(model_dir, metrics)
    audited = audit_split(predictor, ds, split.test, out)  # the same images, lungs or borders hidden
    clock.lap("evaluate_s")
    from lungxray.report import write_report

    write_report(out)
    clock.lap("report_s")
    summary = {
        "lungxray_version": __version__, "data": str(data), "model": model_name, "seed": split_cfg.seed,
        "settings": _jsonable({"data": asdict(data_cfg), "split": asdict(split_cfg), "tune": asdict(tune_cfg),
                               "trial": asdict(trial_cfg), "final": asdict(final_cfg),
                               "recipe": training_recipe(model_name, final_cfg)}),
        "best_params": tuned.best_params, "trials_complete": tuned.n_complete,
        "trials_pruned": tuned.n_pruned, "best_epoch": fitted.best_epoch,
        "final_model": "best trial (same training settings)" if same is not None else "retrained",
        "test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"], "n_test": metrics["n"],
        "audit": {name: view["accuracy"] for name, view in audited["views"].items()} | {"chance": audited["chance"]["accuracy"]},
        "duplicate_groups": len(ds.duplicate_groups), "skipped": len(ds.skipped), "timings": clock.laps,
        "artifacts": {name: str(out / file) for name, file in ARTIFACTS.items()}
        | {"study": tune_cfg.storage or str(out / "study.db")},
    }
    _write_json(out / "run.json", summary)
    return summary


CV_METRICS = ("accuracy", "macro_f1", "macro_auroc")


def _fold_values(metrics: dict) -> dict[str, float | None]:
    """The cross-validated figures of one metrics dict, flat: accuracy, ..., recall/<class>, ..."""
    values = {k: metrics[k] for k in CV_METRICS}
    for name, m in metrics["per_class"].items():
        if m["support"]:
            values |= {f"recall/{name}": m["recall"], f"specificity/{name}": m["specificity"],
                       f"auroc/{name}": m["auroc"]}
    return values


def _fold_model(ds: Dataset, fold: Split, index: int, model_name: str, params: dict | None,
                train_cfg: TrainConfig, tune_cfg: TuneConfig, trial_cfg: TrainConfig, out: Path,
                progress: bool) -> tuple[FitResult, dict]:
    """Fit one fold's model on its training part, with fixed ``params`` or tuned on its val part."""
    train, val = tensors(ds, fold.train), tensors(ds, fold.val)
    if params is not None:
        return fit(model_name, params, train, val, len(ds.classes), train_cfg, progress=progress), params
    from lungxray.tune import tune

    storage = tune_cfg.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    fold_tune = replace(tune_cfg, study_name=f"{tune_cfg.study_name}-fold{index + 1}")
    tuned = tune(model_name, train, val, len(ds.classes), fold_tune, trial_cfg, storage, progress=progress)
    same = tuned.best_fit if replace(trial_cfg, threads=0) == replace(train_cfg, threads=0) else None
    return same or fit(model_name, tuned.best_params, train, val, len(ds.classes), train_cfg,
                       progress=progress), tuned.best_params


def cross_validate(data: Path, out: Path, model_name: str, data_cfg: DataConfig, folds: int, seed: int,
                   train_cfg: TrainConfig, params: dict | None = None, tune_cfg: TuneConfig | None = None,
                   trial_cfg: TrainConfig | None = None, *, force: bool = False, progress: bool = True) -> dict:
    """k-fold cross-validation; writes cv.json (per fold, mean +- std, pooled out-of-fold metrics
    with bootstrap CIs), folds.json and cv_confusion_matrix.png to ``out``; returns cv.json's content.

    ``params``: fixed hyperparameters for every fold; None tunes inside each fold's training part.
    """
    from tqdm.auto import tqdm

    if (out / "cv.json").exists() and not force:
        raise FileExistsError(f"{out / 'cv.json'} already exists; pass --force to replace it, or choose another --out")
    set_threads(train_cfg.threads)
    clock = _Clock()
    ds = load_dataset(data, data_cfg, progress=progress)
    parts = make_folds(ds.labels, ds.groups, folds, seed)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "scan.json", ds.summary())
    _write_json(out / "folds.json", [part.to_json(ds) for part in parts])
    probs = np.zeros((len(ds.samples), len(ds.classes)), dtype=np.float64)
    per_fold = []
    for i, fold in enumerate(tqdm(parts, desc="folds", unit="fold", disable=not progress)):
        start = time.perf_counter()
        result, hp = _fold_model(ds, fold, i, model_name, params, train_cfg, tune_cfg or TuneConfig(),
                                 trial_cfg or train_cfg, out, progress)
        fit_s = time.perf_counter() - start
        x_test = tensors(ds, fold.test)[0]
        start = time.perf_counter()
        probs[fold.test] = torch.softmax(predict_logits(result.model, x_test).double(), dim=1).numpy()
        infer_s = time.perf_counter() - start
        metrics = compute_metrics(ds.labels[fold.test], probs[fold.test], ds.classes, resamples=0)
        trained = len(fold.train) * len(result.history)  # images through training, every epoch
        per_fold.append({"fold": i + 1, **fold.sizes(), "params": hp, "best_epoch": result.best_epoch,
                         "epochs_run": len(result.history), "fit_s": fit_s,
                         "train_images_per_s": trained / fit_s if params is not None else None,
                         "predict_images_per_s": len(fold.test) / infer_s, "metrics": metrics})
    clock.lap("folds_s")
    pooled = compute_metrics(ds.labels, probs, ds.classes, seed=seed)
    plot_confusion_matrix(pooled, out / "cv_confusion_matrix.png")
    summary = _cv_summary(per_fold, pooled)
    fold_of = np.zeros(len(ds.samples), dtype=np.int64)
    for j, part in enumerate(parts):
        fold_of[part.test] = j + 1
    n_params = sum(p.numel() for p in result.model.parameters())
    report = {"lungxray_version": __version__, "data": str(data), "model": model_name, "folds": folds,
              "seed": seed, "n_parameters": n_params, "tuned_in_each_fold": params is None,
              "settings": _jsonable({"data": asdict(data_cfg), "train": asdict(train_cfg),
                                     "recipe": training_recipe(model_name, train_cfg),
                                     "tune": asdict(tune_cfg) if params is None and tune_cfg else None}),
              "summary": summary, "pooled": pooled, "per_fold": per_fold,
              "out_of_fold": [{"path": str(s.path), "label": s.label, "fold": int(fold_of[k]),
                               "probabilities": dict(zip(ds.classes, map(float, probs[k])))}
                              for k, s in enumerate(ds.samples)],
              "timings": clock.laps}
    _write_json(out / "cv.json", report)
    from lungxray.report import write_report

    write_report(out)
    return report


def _cv_summary(per_fold: list[dict], pooled: dict) -> dict:
    """Per metric: mean and sample standard deviation over folds, pooled value and its 95% CI."""
    folds = [_fold_values(f["metrics"]) for f in per_fold]
    pooled_values = _fold_values(pooled)
    summary = {}
    for name in pooled_values:
        values = [f[name] for f in folds if f.get(name) is not None]
        summary[name] = {"mean": float(np.mean(values)) if values else None,
                         "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                         "pooled": pooled_values[name], "ci95": pooled.get("ci95", {}).get(name)}
    return summary


ARTIFACTS = {"report": "report.html", "model": "model", "metrics": "metrics.json",
             "confusion_matrix": "confusion_matrix.png", "curves": "curves.png", "audit": "audit.json",
             "trials": "trials.json", "splits": "splits.json", "scan": "scan.json"}


class _Clock:
    """Seconds spent in each stage, in order."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self._last = now - self._last, now
