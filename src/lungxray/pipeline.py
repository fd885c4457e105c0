"""The stages wired together: scan -> split -> tune -> train -> evaluate -> save.

Each stage is a function the CLI (and any script) calls; ``run`` chains them and writes the run
folder (artifact names and writes: ``runfolder``). Settings arrive as the user gave them and each
stage resolves them against the model's recipe with ``config.resolve_train`` (idempotent, so a
stage called by ``run`` sees the same values as one called alone); ``train`` and ``bundle`` get
them filled. The test split is touched once, by ``evaluate_split``, after the model is final.
Cross-validation is ``cv.py``.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lungxray import __version__, runfolder
from lungxray.bundle import Predictor, attach_metrics, save_bundle
from lungxray.card import model_card, write_card
from lungxray.config import (
    DataConfig,
    Preprocessing,
    SplitConfig,
    TrainConfig,
    TuneConfig,
    resolve_train,
    resolve_tune,
    trial_settings,
)
from lungxray.data import Dataset, load_dataset
from lungxray.errors import DataError, MissingInputError
from lungxray.evaluate import (
    calibrate,
    compute_metrics,
    confusion_figure,
    coverage_figure,
    curves_figure,
    expected_calibration_error,
    log_loss_at,
    ood_summary,
    save_figure,
    softmax,
)
from lungxray.infer import Images, predict_logits, set_threads
from lungxray.models import get_spec
from lungxray.ood import fit_ood, ood_fields
from lungxray.progress import note, stage
from lungxray.splits import Split, make_split
from lungxray.train import FitResult, fit, resolve_device, world


def jsonable(obj):
    """Settings as JSON values (Paths as strings), for config.json, run.json and cv.json."""
    import json

    return json.loads(json.dumps(obj, default=str))


def settings(
    model_name: str, train_cfg: TrainConfig, tune_cfg: TuneConfig | None = None, final_epochs: int | None = None
) -> tuple[TrainConfig, TrainConfig, TuneConfig]:
    """Resolved (trial, final, tune) settings: the trials' training, the final training (its own
    ``final_epochs`` when given) and the search, each filled from the model's recipe. Raises for
    an unknown model or a missing GPU, so a command fails before it scans the data."""
    recipe = get_spec(model_name).recipe
    resolve_device(train_cfg.device)
    tune_cfg = tune_cfg or TuneConfig()
    tune_cfg = resolve_tune(tune_cfg, recipe)
    trial_cfg = trial_settings(resolve_train(train_cfg, recipe), tune_cfg)
    final_cfg = resolve_train(
        replace(train_cfg, epochs=final_epochs) if final_epochs is not None else train_cfg, recipe
    )
    return trial_cfg, final_cfg, tune_cfg


def fingerprint(data: Path, data_cfg: DataConfig, model_name: str | None, **parts) -> dict:
    """What a run or cv folder is made from: the data, its preprocessing and selection, the model,
    and ``parts`` (the split of a run; the folds and seed of a cv)."""
    import os

    # Preprocessing options only when set, so folders made before they existed keep their fingerprint.
    prep = data_cfg.preprocessing
    options = {"crop_borders": prep.crop_borders, "equalize": prep.equalize, "dicom_keep": prep.dicom_keep}
    options = {k: v for k, v in options.items() if v not in (False, "none", ())}
    if not data_cfg.dicom_patients:
        options["dicom_patients"] = False
    return jsonable({"data": os.path.realpath(data), "model": model_name, "img_size": prep.img_size,
                     "groups": data_cfg.groups, "exclude": data_cfg.exclude, **options, **parts})  # fmt: skip


def prepare(
    data: Path,
    data_cfg: DataConfig,
    split_cfg: SplitConfig,
    out: Path | None = None,
    progress: bool = True,
    model_name: str | None = None,
) -> tuple[Dataset, Split]:
    """Scan and split; with ``out``, write scan.json and splits.json there, after checking that
    ``out`` was not made from other data, split or model (``runfolder.check_fingerprint``)."""
    made_from = fingerprint(data, data_cfg, model_name, split=asdict(split_cfg))
    if out is not None:
        runfolder.check_fingerprint(out, made_from)  # before the scan: fail fast
    stage(f"scanning {data}", progress)
    ds = load_dataset(data, data_cfg, progress=progress)
    split = make_split(ds, split_cfg)
    note(f"{len(ds.samples)} images ({', '.join(f'{c} {n}' for c, n in ds.counts().items())}), "
         f"{len(ds.skipped)} skipped; split {split.mode}: " + ", ".join(f"{k} {v}" for k, v in split.sizes().items()),
         progress)  # fmt: skip
    if out is not None:
        if any(s.patient for s in ds.samples):
            ds.rekey_patients(runfolder.secret_key(out / runfolder.PATIENT_KEY))
        runfolder.record_fingerprint(out, made_from)
        runfolder.write_json(out, runfolder.SCAN, ds.summary())
        runfolder.write_json(out, runfolder.SPLITS, split.to_json(ds))
    return ds, split


def tensors(ds: Dataset, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, 1, H, W) float in [0, 1], y (N,) int64) for the samples ``idx``."""
    return Images(ds.images, idx), torch.from_numpy(ds.labels[idx])


def tune_stage(
    ds: Dataset,
    split: Split,
    model_name: str,
    tune_cfg: TuneConfig,
    train_cfg: TrainConfig,
    out: Path,
    progress: bool = True,
    data_cfg: DataConfig | None = None,
):
    """Optuna search on train/val (``tune_cfg.parallel`` worker processes when above 1); writes
    best_params.json and trials.json to ``out``. ``data_cfg``: the preprocessing the workers agree on."""
    from lungxray.tune import _summarise, as_seen, tune

    trial_cfg, _, tune_cfg = settings(model_name, train_cfg, tune_cfg)
    at_a_time = f"{tune_cfg.parallel} worker processes" if tune_cfg.parallel > 1 else f"{tune_cfg.jobs} at a time"
    stage(f"searching: {tune_cfg.trials} trials of {model_name}, {at_a_time}", progress)
    set_threads(trial_cfg.threads)
    storage = runfolder.study_storage(out, tune_cfg.storage)
    data = (tensors(ds, split.train), tensors(ds, split.val), len(ds.classes))
    if tune_cfg.parallel > 1 or tune_cfg.storage:
        # A study other workers may share (a database URL, or --parallel): this process runs as a
        # worker among them, with heartbeats, instead of assuming it is the study's only user.
        from lungxray import workers

        data_cfg = data_cfg or DataConfig(Preprocessing(img_size=ds.images.shape[1]))
        record = workers.agreement(ds, split, model_name, data_cfg, trial_cfg)
        if tune_cfg.parallel > 1:
            study = workers.run_parallel(storage, model_name, *data, tune_cfg, trial_cfg, record)
        else:
            study = workers.open_shared_study(storage, tune_cfg, trial_cfg, model_name, record)
            workers.run_worker(study, model_name, *data, tune_cfg, trial_cfg, lambda text: note(text, progress))
        result = _summarise(study)
    else:
        result = tune(model_name, *data, tune_cfg, trial_cfg, storage, progress=progress)
    trials = [
        # a pruned trial's value: the best figure it reached, which the search learnt from (Optuna's
        # own value for it is its last epoch's)
        {"number": t.number, "state": t.state.name, "value": as_seen(t).value, "params": t.params, **t.user_attrs}
        for t in result.study.trials
    ]
    runfolder.write_json(out, runfolder.TRIALS, trials)
    runfolder.write_json(
        out,
        runfolder.BEST_PARAMS,
        {
            "model": model_name,
            "params": result.best_params,
            "objective": trial_cfg.select_by,
            "value": result.best_value,
            "trial": result.best_trial,
            "storage": storage,
        },
    )
    return result


def train_stage(
    ds: Dataset,
    split: Split,
    model_name: str,
    params: dict,
    train_cfg: TrainConfig,
    data_cfg: DataConfig,
    out: Path,
    *,
    force: bool = False,
    progress: bool = True,
    trained: FitResult | None = None,
) -> tuple[FitResult, Path]:
    """Final training on train (watching val); writes history.json, curves.png and model/.

    ``trained``: a run of exactly this training (the best trial, same settings and seed) whose
    model is saved instead of training it a second time.
    """
    runfolder.refuse_to_replace(out, runfolder.MODEL, force, "a model")
    _, cfg, _ = settings(model_name, train_cfg)
    cfg = resolve_train(cfg, get_spec(model_name).recipe, params)  # the batch size the parameters set
    set_threads(cfg.threads)
    stage("training the final model" + (": the best trial's model, already trained" if trained else ""), progress)
    result = trained or fit(
        model_name, params, tensors(ds, split.train), tensors(ds, split.val), len(ds.classes), cfg, progress=progress
    )
    if world()[0] != 0:  # a distributed training's other processes: the first one writes
        return result, None
    x_val, y_val = tensors(ds, split.val)
    calibration = calibrate(predict_logits(result.model, x_val).double().numpy(), y_val.numpy())
    history = result.history_dict()
    runfolder.write_json(out, runfolder.HISTORY, {"best_epoch": result.best_epoch, **history})
    save_figure(curves_figure(history, result.best_epoch), out / runfolder.CURVES)
    config = {
        "classes": ds.classes,
        "model": {
            "name": model_name,
            "members": cfg.members,
            "hyperparameters": params,
            "input_shape": [1, data_cfg.preprocessing.img_size, data_cfg.preprocessing.img_size],
        },
        "preprocessing": data_cfg.preprocessing.to_json(),
        "training": {
            **jsonable(asdict(cfg)),
            "best_epoch": result.best_epoch,
            "member_best_epochs": result.member_epochs,
            "epochs_run": len(result.history),
            "split_seed": split.seed,
            "split_mode": split.mode,
            "from_best_trial": trained is not None,
            "split_sizes": split.sizes(),
            "torch_version": torch.__version__,
        },
        "calibration": calibration,
        "training_data": {"sources": data_cfg.sources},
    }
    seen = {part: [ds.samples[i].sha256 for i in idx] for part, idx in (("train", split.train), ("val", split.val))}
    ood = fit_ood(ds.images[split.train], ds.images[split.val])
    card = model_card(config | {"ood": ood.info}, ds.summary())  # run completes it once the test is read
    folder = save_bundle(out / runfolder.MODEL, result.model, config, seen=seen, ood=ood, card=card, overwrite=force)
    return result, folder


def training_params(model_name: str, source: Path | str | None, out: Path) -> dict:
    """The hyperparameters a final training uses: the model's registered ones (``source`` is
    'defaults'), a JSON file, or the run folder's best_params.json when ``source`` is None."""
    if str(source) == "defaults":
        return dict(get_spec(model_name).defaults)
    return runfolder.read_params(Path(source) if source is not None else Path(out) / runfolder.BEST_PARAMS)


def model_and_data(
    model: Path | Predictor,
    data: Path,
    data_cfg: DataConfig,
    splits: Path | None = None,
    progress: bool = True,
    include_seen: bool = False,
) -> tuple[Predictor, Dataset, np.ndarray, dict]:
    """The verified bundle (``model``: its folder, or one already loaded), ``data`` preprocessed as
    the bundle was trained, the indices to score and what the bundle has seen among them.

    The indices are every image, or the test images named in a run's ``splits`` (splits.json),
    less the images the model was trained or validated on (recognised by content hash, whatever
    their path) unless ``include_seen``. The dict says how many were seen and which."""
    predictor = model if isinstance(model, Predictor) else Predictor(model)  # verified and loaded once
    as_trained = replace(data_cfg, preprocessing=predictor.preprocessing_)  # as in training
    ds = load_dataset(data, as_trained, progress=progress, min_classes=1)
    idx = np.arange(len(ds.samples))
    if splits is not None:
        test = set(runfolder.read_json(splits.parent, splits.name)["test"]) if splits.is_file() else None
        if test is None:
            raise MissingInputError(
                f"{splits} not found", hint="pass the splits.json of the run that trained the model"
            )
        idx = np.array([i for i, s in enumerate(ds.samples) if str(s.path) in test], dtype=np.int64)
        if len(idx) == 0:
            raise DataError(
                f"none of the test images in {splits} is in {data}",
                hint="pass the dataset folder the run was made from",
            )
    seen = [i for i in idx if ds.samples[i].sha256 in predictor.seen_]
    report = {
        "n_images": int(len(idx)),
        "n_seen": len(seen),
        "included": include_seen,
        "known": bool(predictor.seen_),  # False: a bundle from before lungxray recorded what it saw
        "paths": [str(ds.samples[i].path) for i in seen],
    }
    if seen and not include_seen:
        if len(seen) == len(idx):
            raise DataError(
                f"all {len(idx)} images in {data} were used to train or validate the model: nothing to test on",
                hint="score other images, or pass --include-seen to score these anyway (not a test)",
            )
        idx = np.setdiff1d(idx, seen)
    return predictor, ds, idx, report


def _labels_for(predictor: Predictor, ds: Dataset, idx: np.ndarray) -> np.ndarray:
    """Integer labels of samples ``idx`` in the model's class order; unknown classes are an error."""
    index = {c: i for i, c in enumerate(predictor.classes_)}
    unknown = sorted(set(ds.classes) - set(index))
    if unknown:
        raise DataError(
            f"{ds.root} has class folder(s) the model does not know: {', '.join(unknown)}; "
            f"the model knows {', '.join(predictor.classes_)}",
            hint="folder names are matched after normalising, e.g. 'Viral Pneumonia' -> "
            "viral_pneumonia; rename or remove the other folders",
        )
    size = predictor.preprocessing_.img_size
    if ds.images.shape[1] != size:
        raise ValueError(
            f"images were preprocessed at {ds.images.shape[1]} px but the model expects "
            f"{size} px; load the data with img_size={size}"
        )
    return np.array([index[ds.samples[i].label] for i in idx], dtype=np.int64)


def audit_split(predictor: Predictor, ds: Dataset, idx: np.ndarray, out: Path, extra: dict | None = None) -> dict:
    """The shortcut audit (``explain.audit``) of samples ``idx``; writes audit.json (with ``extra``
    added) to ``out``."""
    from lungxray.explain import audit

    report = audit(predictor, ds.images[idx], _labels_for(predictor, ds, idx)) | (extra or {})
    runfolder.write_json(out, runfolder.AUDIT, report)
    return report


def evaluate_split(
    predictor: Predictor, ds: Dataset, idx: np.ndarray, out: Path, extra: dict | None = None, name: str = "test"
) -> dict:
    """Evaluate a loaded bundle on samples ``idx`` of ``ds``; writes metrics.json (with ``extra``
    added), predictions.json (every image's probabilities, temperature-scaled and not, and its
    out-of-distribution score), the confusion-matrix plot and, for a bundle with the score, the
    coverage plot, each once. Returns the metrics; their "ood" holds the flagged share and the
    metrics on the accepted images (``evaluate.ood_summary``)."""
    y = _labels_for(predictor, ds, idx)
    logits = predictor.predict_logits(ds.images[idx]).astype(np.float64)
    probs, raw = softmax(logits, predictor.temperature_), softmax(logits)
    scores = predictor.ood_scores(ds.images[idx])
    metrics = compute_metrics(y, probs, predictor.classes_)
    metrics["ood"] = ood_summary(y, probs, scores, predictor.classes_)
    fitted = predictor.config_.get("calibration", {})
    metrics["calibration"] = {
        "temperature": predictor.temperature_,
        "applied": bool(fitted.get("applied", predictor.temperature_ != 1.0)),
        "decision": fitted.get("reason"),
        "ece": metrics["ece"],
        "ece_uncalibrated": expected_calibration_error(y, raw),
        "loss": metrics["loss"],
        "loss_uncalibrated": log_loss_at(logits, y),
    }
    metrics |= extra or {}
    runfolder.write_json(
        out,
        runfolder.PREDICTIONS,
        {
            "classes": predictor.classes_,
            "temperature": predictor.temperature_,
            "images": [
                {
                    "path": str(ds.samples[i].path),
                    "label": ds.samples[i].label,
                    "probabilities": [float(v) for v in probs[k]],
                    "uncalibrated": [float(v) for v in raw[k]],
                    **ood_fields(None if scores is None else scores[k]),
                }
                for k, i in enumerate(idx)
            ],
        },
    )
    runfolder.write_json(out, runfolder.METRICS, metrics)
    save_figure(confusion_figure(metrics), out / runfolder.CONFUSION)
    if metrics["ood"] is not None:
        save_figure(coverage_figure({name: metrics["ood"]}), out / runfolder.COVERAGE)
    return metrics


@dataclass
class RunResult:
    """What ``run`` wrote: the content of run.json and of metrics.json."""

    summary: dict
    metrics: dict


def run(
    data: Path,
    out: Path,
    model_name: str,
    data_cfg: DataConfig,
    split_cfg: SplitConfig,
    tune_cfg: TuneConfig,
    train_cfg: TrainConfig,
    *,
    final_epochs: int | None = None,
    external: list[Path] | tuple = (),
    force: bool = False,
    progress: bool = True,
) -> RunResult:
    """The whole job; writes the run folder and run.json (settings, timings, headline figures).

    ``train_cfg`` trains the trials and, with ``final_epochs`` epochs when given, the final model.
    ``external``: dataset folders from elsewhere (other hospitals) the final model is evaluated on
    after the internal test (``external_stage``). One process writes ``out`` at a time
    (``runfolder.writer_lock``).
    """
    runfolder.refuse_to_replace(out, runfolder.MODEL, force, "a model (the study resumes with --force)")
    external = external_names(external)  # a missing folder fails before the scan
    with runfolder.writer_lock(out):
        return _run(
            data, out, model_name, data_cfg, split_cfg, tune_cfg, train_cfg, final_epochs, external, force, progress
        )


def external_names(folders: list[Path] | tuple) -> dict[str, Path]:
    """A distinct name per external folder (its own name; -2, -3, ... for repeats); a folder that
    does not exist is an error."""
    names: dict[str, Path] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise MissingInputError(
                f"--external {folder}: no such folder", hint="pass a folder of class sub-folders, as for DATA"
            )
        base = folder.resolve().name or "external"
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}-{k}"
        names[name] = folder
    return names


def _check_external_classes(folder: Path, classes: list[str]) -> None:
    """An external folder holds class folders, each one of ``classes`` (after normalising names)."""
    from lungxray.data import discover

    _, files, _ = discover(folder, same_classes=False)
    unknown = sorted({label for _, label, _ in files} - set(classes))
    if not files or unknown:
        raise DataError(
            f"--external {folder}: "
            + (f"class folder(s) {', '.join(unknown)} are not among the model's" if unknown else "no images found")
            + f" ({', '.join(classes)})",
            hint="an external folder holds some or all of DATA's class folders (names are matched after "
            "normalising, e.g. 'Viral Pneumonia' = viral_pneumonia)",
        )


def external_stage(
    predictor: Predictor, data_cfg: DataConfig, folders: dict[str, Path], out: Path, progress: bool = True
) -> dict[str, dict]:
    """Evaluate the bundle on each external folder (its classes: some or all of the model's), less
    any image it was trained or validated on; writes OUT/external/NAME/ (metrics.json with the
    out-of-distribution summary, predictions.json, the plots). Returns name -> headline figures."""
    results = {}
    # The run's --groups and --exclude name DATA's files, not these.
    data_cfg = replace(data_cfg, groups=None, exclude=None)
    for name, folder in folders.items():
        stage(f"evaluating on {name} ({folder})", progress)
        try:
            _, ds, idx, seen = model_and_data(predictor, folder, data_cfg, progress=progress)
        except DataError as exc:  # e.g. every image was trained on: said in run.json, the run goes on
            results[name] = {"data": str(folder), "error": str(exc)}
            continue
        target = out / runfolder.EXTERNAL / name
        metrics = evaluate_split(predictor, ds, idx, target, {"data": str(folder), "seen": seen}, name=name)
        ood = metrics["ood"]
        results[name] = {
            "data": str(folder),
            "n": metrics["n"],
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "recall": {c: m["recall"] for c, m in metrics["per_class"].items() if m["support"]},
            "share_flagged": ood["share_flagged"] if ood else None,
            "metrics": str(target / runfolder.METRICS),
        }
    return results


def _run(
    data, out, model_name, data_cfg, split_cfg, tune_cfg, train_cfg, final_epochs, external, force, progress
) -> RunResult:
    """``run``'s stages, under the folder's writer lock."""
    trial_cfg, final_cfg, tune_cfg = settings(model_name, train_cfg, tune_cfg, final_epochs)  # before the scan
    if tune_cfg.storage:
        from lungxray.workers import check_storage

        check_storage(tune_cfg.storage)
    set_threads(final_cfg.threads)
    clock = Clock()
    ds, split = prepare(data, data_cfg, split_cfg, out, progress, model_name)
    for folder in external.values():  # before the search: an external set the model cannot score fails now
        _check_external_classes(folder, ds.classes)
    # torch's optimisers import torch._dynamo on first use (1.3-1.6 s here): a cost of the process, not
    # of the search, so it is paid here and counted with the scan, as bench/search_bench.py's Keras
    # reference imports its framework before its search is timed
    importlib.import_module("torch._dynamo")
    clock.lap("scan_and_split_s")
    tuned = tune_stage(ds, split, model_name, tune_cfg, trial_cfg, out, progress, data_cfg)
    clock.lap("tune_s")
    # The final training repeats the best trial exactly when the settings match (same data, seed,
    # epochs, patience): then the trial's model is the final model and is not trained twice.
    repeats_best_trial = replace(trial_cfg, threads=0) == replace(final_cfg, threads=0)
    same = tuned.best_fit if repeats_best_trial else None
    cfg = final_cfg
    if repeats_best_trial and same is None:
        # The best trial ran in an earlier process (a resumed study): train it again on the threads a
        # trial had, since another thread count gives other floats (seen: test accuracy 0.9219
        # instead of the trial's 0.9375 on a rerun of the demo).
        cfg = replace(final_cfg, threads=max(1, torch.get_num_threads() // tune_cfg.jobs))
    fitted, model_dir = train_stage(
        ds, split, model_name, tuned.best_params, cfg, data_cfg, out, force=force, progress=progress, trained=same
    )
    set_threads(final_cfg.threads)
    clock.lap("train_s")
    predictor = Predictor(model_dir)
    split_info = {
        "mode": split.mode,
        "seed": split.seed,
        **split.sizes(),
        "test_duplicates_of_train": split.test_duplicates_of_train,
    }
    stage(f"evaluating on the test split ({len(split.test)} images)", progress)
    metrics = evaluate_split(predictor, ds, split.test, out, {"split": split_info})  # the one read of the test split
    attach_metrics(model_dir, metrics)
    audited = audit_split(predictor, ds, split.test, out)  # the same images, lungs or borders hidden
    clock.lap("evaluate_s")
    elsewhere = external_stage(predictor, data_cfg, external, out, progress) if external else {}
    if external:
        clock.lap("external_s")
    scored_elsewhere = {
        name: runfolder.read_json(Path(r["metrics"]).parent, runfolder.METRICS) for name, r in elsewhere.items()
        if "metrics" in r
    }  # fmt: skip
    write_card(model_dir, model_card(predictor.config_, ds.summary(), metrics, scored_elsewhere, audited))
    from lungxray.report import write_report

    stage("writing the report", progress)
    write_report(out)
    clock.lap("report_s")
    summary = {
        "lungxray_version": __version__,
        "data": str(data),
        "model": model_name,
        "seed": split_cfg.seed,
        "settings": jsonable(
            {
                "data": asdict(data_cfg),
                "split": asdict(split_cfg),
                "tune": asdict(tune_cfg),
                "trial": asdict(trial_cfg),
                "final": asdict(resolve_train(final_cfg, get_spec(model_name).recipe, tuned.best_params)),
            }
        ),
        "best_params": tuned.best_params,
        "trials_complete": tuned.n_complete,
        "trials_pruned": tuned.n_pruned,
        "best_epoch": fitted.best_epoch,
        "final_model": "best trial (same training settings)"
        if same is not None
        else "best trial retrained (resumed study)"
        if repeats_best_trial
        else "retrained",
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "n_test": metrics["n"],
        "test_share_flagged": metrics["ood"]["share_flagged"] if metrics["ood"] else None,
        "external": elsewhere,
        "audit": {name: view["accuracy"] for name, view in audited["views"].items()}
        | {"chance": audited["chance"]["accuracy"]},
        "duplicate_groups": len(ds.duplicate_groups),
        "groups": ds.group_sizes(),
        "excluded": ds.excluded,
        "skipped": len(ds.skipped),
        "timings": clock.laps,
        "artifacts": {name: str(out / file) for name, file in runfolder.RUN_ARTIFACTS.items()}
        | {"study": tune_cfg.storage or str(out / runfolder.STUDY)},
    }
    runfolder.write_json(out, runfolder.RUN, summary)
    return RunResult(summary, metrics)


class Clock:
    """Seconds spent in each stage, in order."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self._last = now - self._last, now
