"""The stages wired together: scan -> split -> tune -> train -> evaluate -> save.

Each stage is a function the CLI (and any script) calls; ``run`` chains them and writes the run
folder. The test split is touched once, by ``evaluate_split``, after the model is final.
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
from lungxray.evaluate import compute_metrics, plot_confusion_matrix, plot_curves, write_metrics
from lungxray.splits import Split, make_split
from lungxray.train import FitResult, fit, set_threads, to_tensor


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return path


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
    history = result.history_dict()
    _write_json(out / "history.json", {"best_epoch": result.best_epoch, **history})
    plot_curves(history, out / "curves.png", result.best_epoch)
    config = {
        "classes": ds.classes,
        "model": {"name": model_name, "hyperparameters": params,
                  "input_shape": [1, data_cfg.img_size, data_cfg.img_size]},
        "preprocessing": {"img_size": data_cfg.img_size, "color": "grayscale", "resize": "bilinear",
                          "scale": "pixel / 255", "jpeg_reduced_decoding": True},
        "training": {**asdict(train_cfg), "best_epoch": result.best_epoch,
                     "epochs_run": len(result.history), "split_seed": split.seed, "split_mode": split.mode,
                     "from_best_trial": trained is not None,
                     "split_sizes": split.sizes(), "torch_version": torch.__version__},
    }
    folder = save_bundle(out / "model", result.model, config, overwrite=force)
    return result, folder


def evaluate_split(predictor: Predictor, ds: Dataset, idx: np.ndarray, out: Path) -> dict:
    """Evaluate a loaded bundle on samples ``idx`` of ``ds``; writes metrics.json and the plot."""
    index = {c: i for i, c in enumerate(predictor.classes_)}
    unknown = sorted(set(ds.classes) - set(index))
    if unknown:
        raise DataError(f"{ds.root} has class folder(s) the model does not know: {', '.join(unknown)}; "
                        f"the model knows {', '.join(predictor.classes_)} (folder names are matched "
                        "after normalising, e.g. 'Viral Pneumonia' -> viral_pneumonia)")
    if ds.images.shape[1] != predictor.img_size_:
        raise ValueError(f"images were preprocessed at {ds.images.shape[1]} px but the model expects "
                         f"{predictor.img_size_} px; load the data with img_size={predictor.img_size_}")
    y = np.array([index[ds.samples[i].label] for i in idx], dtype=np.int64)
    probs = predictor.predict_arrays(ds.images[idx])
    metrics = compute_metrics(y, probs, predictor.classes_)
    out.mkdir(parents=True, exist_ok=True)
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
    metrics = evaluate_split(Predictor(model_dir), ds, split.test, out)  # the one read of the test split
    metrics["split"] = {"mode": split.mode, "seed": split.seed, **split.sizes(),
                        "test_duplicates_of_train": split.test_duplicates_of_train}
    write_metrics(metrics, out / "metrics.json")
    attach_metrics(model_dir, metrics)
    clock.lap("evaluate_s")
    summary = {
        "lungxray_version": __version__, "data": str(data), "model": model_name, "seed": split_cfg.seed,
        "settings": {"data": {**asdict(data_cfg), "cache_dir": str(data_cfg.cache_dir)},
                     "split": asdict(split_cfg), "tune": asdict(tune_cfg), "trial": asdict(trial_cfg),
                     "final": asdict(final_cfg)},
        "best_params": tuned.best_params, "trials_complete": tuned.n_complete,
        "trials_pruned": tuned.n_pruned, "best_epoch": fitted.best_epoch,
        "final_model": "best trial (same training settings)" if same is not None else "retrained",
        "test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"], "n_test": metrics["n"],
        "duplicate_groups": len(ds.duplicate_groups), "skipped": len(ds.skipped), "timings": clock.laps,
        "artifacts": {name: str(out / file) for name, file in ARTIFACTS.items()}
        | {"study": tune_cfg.storage or str(out / "study.db")},
    }
    _write_json(out / "run.json", summary)
    return summary


ARTIFACTS = {"model": "model", "metrics": "metrics.json", "confusion_matrix": "confusion_matrix.png",
             "curves": "curves.png", "trials": "trials.json", "splits": "splits.json", "scan": "scan.json"}


class _Clock:
    """Seconds spent in each stage, in order."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self._last = now - self._last, now
