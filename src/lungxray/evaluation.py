"""Scoring a saved bundle on labelled images: the test split of a run, an external folder, or any
dataset given to ``lungxray evaluate`` / ``audit``.

Holds the images a bundle may be scored on (less those it was trained or validated on, recognised
by content), metrics.json and predictions.json with their plots, the shortcut audit, and the
external folders of a run. Imports no training code; metrics themselves are ``metrics.py``'s,
figures ``plots.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lungxray import runfolder
from lungxray.config import DataConfig, Manifest
from lungxray.data import Dataset, load_dataset
from lungxray.errors import DataError, MissingInputError
from lungxray.metrics import compute_metrics, expected_calibration_error, log_loss_at, ood_summary, softmax
from lungxray.ood import ood_fields
from lungxray.plots import confusion_figure, coverage_figure, save_figure
from lungxray.predictor import Predictor
from lungxray.progress import stage


@dataclass(frozen=True)
class Scoring:
    """What ``lungxray evaluate`` and ``audit`` are given: a bundle, a labelled dataset, where to
    write, and which of its images to score."""

    model: Path | Predictor
    """The bundle's folder, or one already loaded."""
    data: Path | list[Path]
    """A folder, a CSV manifest, or a list of them (one dataset, each a site)."""
    dataset: DataConfig = field(default_factory=DataConfig)
    """How to read ``data``; its preprocessing is replaced by the bundle's."""
    out: Path | None = None
    splits: Path | None = None
    """A run's splits.json: score only its test images (None: every image)."""
    include_seen: bool = False
    """Keep the images the model was trained or validated on (not a test)."""
    force: bool = False
    progress: bool = True


def model_and_data(scoring: Scoring) -> tuple[Predictor, Dataset, np.ndarray, dict]:
    """The verified bundle, ``scoring.data`` preprocessed as the bundle was trained, the indices to
    score and what the bundle has seen among them.

    The indices are every image, or the test images named in ``scoring.splits``, less the images
    the model was trained or validated on (recognised by content hash, whatever their path) unless
    ``include_seen``. The dict says how many were seen and which."""
    model = scoring.model
    predictor = model if isinstance(model, Predictor) else Predictor(model)  # verified and loaded once
    as_trained = replace(scoring.dataset, preprocessing=predictor.preprocessing_)  # as in training
    ds = load_dataset(scoring.data, as_trained, progress=scoring.progress, min_classes=1)
    idx = np.arange(len(ds.samples))
    if scoring.splits is not None:
        idx = _test_indices(ds, scoring.splits, scoring.data)
    seen = [i for i in idx if ds.samples[i].sha256 in predictor.seen_]
    report = {
        "n_images": int(len(idx)),
        "n_seen": len(seen),
        "included": scoring.include_seen,
        "known": bool(predictor.seen_),  # False: a bundle from before lungxray recorded what it saw
        "paths": [str(ds.samples[i].path) for i in seen],
    }
    if seen and not scoring.include_seen:
        if len(seen) == len(idx):
            raise DataError(
                f"all {len(idx)} images in {scoring.data} were used to train or validate the model: nothing to test on",
                hint="score other images, or pass --include-seen to score these anyway (not a test)",
            )
        idx = np.setdiff1d(idx, seen)
    return predictor, ds, idx, report


def _test_indices(ds: Dataset, splits: Path, data: Path) -> np.ndarray:
    """The indices of the test images named in a run's splits.json."""
    if not splits.is_file():
        raise MissingInputError(f"{splits} not found", hint="pass the splits.json of the run that trained the model")
    test = set(runfolder.read_json(splits.parent, splits.name)["test"])
    idx = np.array([i for i, s in enumerate(ds.samples) if str(s.path) in test], dtype=np.int64)
    if len(idx) == 0:
        raise DataError(f"none of the test images in {splits} is in {data}",
                        hint="pass the dataset folder the run was made from")  # fmt: skip
    return idx


def labels_for(predictor: Predictor, ds: Dataset, idx: np.ndarray) -> np.ndarray:
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
    """The shortcut audit (``saliency.audit``) of samples ``idx``; writes audit.json (with ``extra``
    added) to ``out``."""
    from lungxray.saliency import audit

    report = audit(predictor, ds.images[idx], labels_for(predictor, ds, idx)) | (extra or {})
    runfolder.write_json(out, runfolder.AUDIT, report)
    return report


def evaluate_split(
    predictor: Predictor, ds: Dataset, idx: np.ndarray, out: Path, extra: dict | None = None, name: str = "test"
) -> dict:
    """Evaluate a loaded bundle on samples ``idx`` of ``ds``; writes metrics.json (with ``extra``
    added), predictions.json (every image's probabilities, temperature-scaled and not, its
    out-of-distribution score, its site and a manifest's other columns), the confusion-matrix plot
    and, for a bundle with the score, the coverage plot named ``name``, each once. Returns the
    metrics; their "ood" holds the flagged share and the metrics on the accepted images
    (``metrics.ood_summary``)."""
    y = labels_for(predictor, ds, idx)
    logits = predictor.predict_logits(ds.images[idx]).astype(np.float64)
    if predictor.class_bias_ is not None:  # the offsets fitted on a held-out site (--val-by site)
        logits = logits + predictor.class_bias_
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
    metrics |= per_site(ds, idx, y, probs, predictor.classes_) | (extra or {})
    images = [
        {"path": str(ds.samples[i].path), "label": ds.samples[i].label, "class": predictor.classes_[probs[k].argmax()],
         "probabilities": by_name(predictor.classes_, probs[k]), "uncalibrated": by_name(predictor.classes_, raw[k]),
         **ood_fields(None if scores is None else scores[k])}
        | ({"site": ds.samples[i].site} if ds.samples[i].site is not None else {})
        | ({"meta": ds.samples[i].meta} if ds.samples[i].meta else {})  # a manifest's other columns
        for k, i in enumerate(idx)
    ]  # fmt: skip
    predictions = {"classes": predictor.classes_, "temperature": predictor.temperature_, "images": images}
    runfolder.write_json(out, runfolder.PREDICTIONS, predictions)
    runfolder.write_json(out, runfolder.METRICS, metrics)
    save_figure(confusion_figure(metrics), out / runfolder.CONFUSION)
    if metrics["ood"] is not None:
        save_figure(coverage_figure({name: metrics["ood"]}), out / runfolder.COVERAGE)
    return metrics


def by_name(classes: list[str], row: np.ndarray) -> dict[str, float]:
    """One image's probabilities in the shape every output uses: class name -> probability."""
    return dict(zip(classes, map(float, row), strict=True))


def per_site(ds: Dataset, idx: np.ndarray, y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Where the scored images come from two sites or more: each site's metrics (with intervals)
    under "per_site", and "worst_site", the site of lowest balanced accuracy; else nothing."""
    sites = np.array([ds.samples[i].site or "" for i in idx], dtype=object)
    names = sorted(set(sites) - {""})
    if len(names) < 2:
        return {}
    figures = {site: compute_metrics(y[sites == site], probs[sites == site], classes) for site in names}
    worst = min(names, key=lambda site: figures[site]["balanced_accuracy"])
    return {"per_site": figures, "worst_site": worst}


def _roots(scoring: Scoring) -> list[Path]:
    """The dataset folders (or manifests) ``scoring`` reads."""
    return scoring.data if isinstance(scoring.data, list | tuple) else [scoring.data]


def _seen_extra(ds: Dataset, seen: dict) -> dict:
    """What metrics.json and audit.json say of the data and of the images left out as seen."""
    return {"data": str(ds.root), "seen_excluded": 0 if seen["included"] else seen["n_seen"], "seen_images": seen}


def _scored_by(predictor: Predictor) -> dict:
    """What metrics.json records of the model it scored, for ``lungxray report`` to find it and name
    it: its bundle's folder (absolute, to be found from anywhere), its name and training seed."""
    config = predictor.config_
    return {"scored_by": {"model_dir": str(predictor.folder.resolve()), "model": config["model"]["name"],
                          "seed": (config.get("training") or {}).get("seed")}}  # fmt: skip


def evaluate_bundle(scoring: Scoring) -> tuple[dict, dict]:
    """``lungxray evaluate``: metrics, predictions, audit and report of a bundle on a dataset, in
    ``scoring.out``. Returns (metrics, what the bundle had seen among the images)."""
    from lungxray.report import write_report

    with runfolder.writer_lock(scoring.out, _roots(scoring)):  # a bundle as --out: refused before its metrics
        runfolder.refuse_to_replace(scoring.out, runfolder.METRICS, scoring.force,
                                    "test metrics (a run's or an evaluation's)")  # fmt: skip
        predictor, ds, idx, seen = model_and_data(scoring)
        extra = _seen_extra(ds, seen)
        if predictor.task_ == "multilabel":  # per finding; no audit (it compares single-label accuracies)
            from lungxray.evaluation_multilabel import evaluate_multilabel

            metrics = evaluate_multilabel(predictor, ds, idx, scoring.out, extra | _scored_by(predictor))
        else:  # preprocessed as in training; the coverage plot named after the data folder
            metrics = evaluate_split(predictor, ds, idx, scoring.out, extra | _scored_by(predictor), name=ds.root.name)
            audit_split(predictor, ds, idx, scoring.out, extra)
        model_dir = scoring.model.folder if isinstance(scoring.model, Predictor) else scoring.model
        write_report(scoring.out, model_dir)
    return metrics, seen


def audit_bundle(scoring: Scoring) -> tuple[dict, dict]:
    """``lungxray audit``: the shortcut audit of a bundle on a dataset, in ``scoring.out``.
    Returns (audit.json's content, what the bundle had seen among the images)."""
    with runfolder.writer_lock(scoring.out, _roots(scoring)):
        runfolder.refuse_to_replace(scoring.out, runfolder.AUDIT, scoring.force, "an audit")
        predictor, ds, idx, seen = model_and_data(scoring)
        return audit_split(predictor, ds, idx, scoring.out, _seen_extra(ds, seen)), seen


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


def check_external_classes(folder: Path, classes: list[str]) -> None:
    """An external folder holds class folders, each one of ``classes`` (after normalising names)."""
    from lungxray.layout import discover

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
    # The run's --groups, --exclude and manifest options name DATA's files, not these.
    data_cfg = replace(data_cfg, groups=None, exclude=None, manifest=Manifest())
    for name, folder in folders.items():
        stage(f"evaluating on {name} ({folder})", progress)
        try:
            _, ds, idx, seen = model_and_data(Scoring(predictor, folder, data_cfg, progress=progress))
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
