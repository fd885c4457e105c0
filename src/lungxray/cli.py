"""Command line: one subcommand per stage, each a thin call into the library.

``lungxray run`` does everything; ``scan``, ``tune``, ``train``, ``evaluate`` and ``predict`` run
one stage each; ``cv`` cross-validates; ``explain`` and ``audit`` show where a model looks. Errors the user can fix are printed as one line (exit code 2), not as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from lungxray import __version__
from lungxray.config import (AugmentConfig, ConfigError, DataConfig, SplitConfig, TrainConfig, TuneConfig,
                             default_cache_dir)


def _data_args(p: argparse.ArgumentParser, img_size: bool = True) -> None:
    p.add_argument("data", type=Path, help="dataset folder: one sub-folder per class, or train/ test/ [val/] "
                                           "folders that each hold class folders")
    if img_size:  # evaluate takes the size from the model bundle instead
        p.add_argument("--img-size", type=int, default=128, help="side of the square grayscale input (default 128)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"preprocessed-image cache (default {default_cache_dir()}, or $LUNGXRAY_CACHE)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default: one per core)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _model_data_args(p: argparse.ArgumentParser, verb: str) -> None:
    """MODEL, DATA (preprocessed at the model's size) and --splits, for the commands that score a bundle."""
    p.add_argument("model_dir", metavar="MODEL", type=Path, help="model bundle folder (RUN/model)")
    _data_args(p, img_size=False)
    p.add_argument("--splits", type=Path, default=None,
                   help=f"splits.json of a run: {verb} only its test images (default: every image in DATA)")


def _split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=["random", "folders"], default="random",
                   help="random: stratified, duplicate-grouped train/val/test (default); folders: the "
                        "dataset's own train/ and test/ folders, val carved out of train")
    p.add_argument("--val-fraction", type=float, default=0.10, help="validation share (default 0.10)")
    p.add_argument("--test-fraction", type=float, default=0.20, help="test share (default 0.20)")
    p.add_argument("--drop-test-duplicates", action="store_true",
                   help="with --split folders: drop test images that duplicate a training image")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the search and training (default 0)")


def _train_args(p: argparse.ArgumentParser, epochs_flag: str) -> None:
    p.add_argument("--model", default="cnn",
                   help="registered model: cnn (small MONAI CNN, default), resnet18, densenet121, or mlp "
                        "(the tutorial's)")
    p.add_argument(epochs_flag, dest="epochs", type=int, default=None,
                   help="epochs per training run (default: the model's, 64 for mlp, 30 for cnn)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="mini-batch size where the hyperparameters set none (default: the model's, 8 for mlp)")
    p.add_argument("--patience", type=int, default=16,
                   help="stop a training run after this many epochs without a better validation "
                        "figure; 0 never stops early (default 16)")
    p.add_argument("--objective", choices=["val_loss", "val_accuracy"], default="val_loss",
                   help="validation figure that picks the kept epoch and the best trial (default val_loss)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: one per core)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA with mixed precision when a GPU is there, else CPU (default)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default=None,
                   help="learning rate over a run (default: the model's, cosine for CNNs, constant for mlp)")
    p.add_argument("--class-weighted", action="store_true", help="weight the loss by inverse class frequency")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="share of each target spread over all classes (default 0: off)")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="validate and keep an exponential moving average of the weights with this decay, "
                        "e.g. 0.999; it warms up as (1+n)/(10+n) over the first updates (default 0: off)")
    p.add_argument("--keep", choices=["best", "last"], default="best",
                   help="weights a run returns: the best validation epoch, or the last (no early "
                        "stopping) (default best)")
    p.add_argument("--init-weights", type=Path, default=None,
                   help="start from a local weights file (.safetensors, or a torch state dict read with "
                        "weights_only=True) instead of random weights")
    g = p.add_argument_group("augmentation of training batches (default: on for CNNs, off for mlp)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="turn augmentation on or off")
    defaults = AugmentConfig()
    for flag, field, what in (("--rotate", "rotation", "degrees either way"), ("--shift", "shift", "share of the side"),
                              ("--zoom", "scale", "share in or out"), ("--brightness", "brightness", "added to [0, 1] pixels"),
                              ("--contrast", "contrast", "share")):
        g.add_argument(flag, type=float, default=getattr(defaults, field),
                       help=f"{what} (default {getattr(defaults, field):g})")
    g.add_argument("--hflip", action="store_true", help="mirror half the images left-right (off: anatomy is not symmetric)")


def _tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=int, default=16, help="trials in the study (default 16)")
    p.add_argument("--sampler", choices=["gp", "tpe", "random"], default="gp",
                   help="gp: Gaussian-process Bayesian optimisation (default); tpe; random")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median",
                   help="stop hopeless trials early (default median); none also turns --patience off "
                        "inside trials")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite file OUT/study.db)")
    p.add_argument("--study-name", default="lungxray", help="study name inside the storage")
    p.add_argument("--jobs", type=int, default=0,
                   help="trials trained side by side (default: the model's, 2 for mlp, 1 for CNNs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungxray", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lungxray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("scan", help="list classes, counts, unusable files and duplicates")
    _data_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("run", help="scan, split, tune, train, evaluate and save: the whole job")
    _data_args(p), _split_args(p), _tune_args(p)
    _train_args(p, "--epochs")
    p.add_argument("--final-epochs", type=int, default=None, help="epochs of the final training (default: --epochs)")
    p.add_argument("--out", type=Path, required=True, help="run folder for the model, metrics, plots and study")
    p.add_argument("--force", action="store_true", help="replace a model already in OUT")

    p = sub.add_parser("tune", help="hyperparameter search on train/val; writes OUT/best_params.json")
    _data_args(p), _split_args(p), _tune_args(p)
    _train_args(p, "--epochs")
    p.add_argument("--out", type=Path, required=True, help="run folder (study, splits, best_params.json)")

    p = sub.add_parser("train", help="train with the best (or given) hyperparameters; writes OUT/model/")
    _data_args(p), _split_args(p)
    _train_args(p, "--epochs")
    p.add_argument("--params", type=Path, default=None,
                   help="JSON of hyperparameters, or 'defaults' for the model's registered ones "
                        "(default OUT/best_params.json from `tune`)")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--force", action="store_true", help="replace a model already in OUT")

    p = sub.add_parser("evaluate", help="metrics, audit and report of a model on a labelled dataset")
    _model_data_args(p, "evaluate")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for metrics.json, predictions.json, audit.json, the plots and report.html")

    p = sub.add_parser("cv", help="k-fold cross-validation: mean +- std over folds and bootstrap CIs; writes OUT/cv.json")
    _data_args(p)
    _train_args(p, "--epochs")
    p.add_argument("--folds", type=int, default=5, help="folds, stratified and grouped by duplicate group (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds, training and bootstrap (default 0)")
    p.add_argument("--params", type=Path, default=None,
                   help="JSON of fixed hyperparameters for every fold (default: the model's defaults)")
    p.add_argument("--tune", action="store_true",
                   help="tune inside each fold's training part instead of using fixed hyperparameters")
    _tune_args(p)
    p.add_argument("--out", type=Path, required=True, help="folder for cv.json, folds.json and the plot")
    p.add_argument("--force", action="store_true", help="replace a cv.json already in OUT")

    p = sub.add_parser("report", help="write RUN/report.html from what run, evaluate or cv left in RUN")
    p.add_argument("run_dir", metavar="RUN", type=Path, help="folder written by run, evaluate --out or cv --out")
    p.add_argument("--model", dest="model_dir", type=Path, default=None,
                   help="model bundle that explains the errors in the gallery (default RUN/model)")

    p = sub.add_parser("explain", help="probabilities and a Grad-CAM (CNN) or gradient (MLP) overlay per image")
    p.add_argument("model_dir", metavar="MODEL", type=Path, help="model bundle folder (RUN/model)")
    p.add_argument("images", metavar="IMAGE", type=Path, nargs="+", help="image files")
    p.add_argument("--out", type=Path, required=True, help="folder for the overlay PNGs and explain.json")

    p = sub.add_parser("audit", help="shortcut check: scores with the lungs hidden and with the borders hidden")
    _model_data_args(p, "audit")
    p.add_argument("--out", type=Path, required=True, help="folder for audit.json")

    p = sub.add_parser("export", help="add model.onnx to a bundle (checked against PyTorch)")
    p.add_argument("model_dir", metavar="MODEL", type=Path, help="model bundle folder (RUN/model)")
    p.add_argument("--onnx", action="store_true", required=True, help="export to ONNX (the only format so far)")

    p = sub.add_parser("serve", help="web service and upload page for a model (FastAPI + uvicorn)")
    p.add_argument("model_dir", metavar="MODEL", type=Path, help="model bundle folder (RUN/model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                   help="auto: ONNX Runtime when the bundle has model.onnx (default)")

    p = sub.add_parser("predict", help="class and probabilities for each image")
    p.add_argument("model_dir", metavar="MODEL", type=Path, help="model bundle folder (RUN/model)")
    p.add_argument("images", metavar="IMAGE", type=Path, nargs="+", help="image files")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    return parser


def _data_cfg(args, img_size: int | None = None) -> DataConfig:
    kw = {"img_size": img_size or args.img_size, "workers": args.workers}
    if args.cache_dir is not None:
        kw["cache_dir"] = args.cache_dir
    return DataConfig(**kw)


def _split_cfg(args) -> SplitConfig:
    return SplitConfig(mode=args.split, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                       drop_test_duplicates=args.drop_test_duplicates, seed=args.seed)


def _augment(args, recipe_augments: bool) -> AugmentConfig | bool:
    on = args.augment if args.augment is not None else recipe_augments
    if not on:
        return False
    return AugmentConfig(rotation=args.rotate, shift=args.shift, scale=args.zoom, brightness=args.brightness,
                         contrast=args.contrast, hflip=args.hflip)


def _train_cfg(args, epochs: int | None, in_trials: bool = False) -> TrainConfig:
    from lungxray.models import get_spec
    from lungxray.train import resolve_device

    recipe = get_spec(args.model).recipe
    resolve_device(args.device)  # a missing GPU is an error now, not after the scan
    # Inside trials, early stopping on patience is part of pruning: --pruner none turns it off.
    patience = 0 if in_trials and args.pruner == "none" else args.patience
    epochs = next((e for e in (epochs, args.epochs) if e is not None), recipe.epochs)
    batch_size = recipe.batch_size if args.batch_size is None else args.batch_size
    return TrainConfig(epochs=epochs, batch_size=batch_size,
                       seed=args.seed, threads=args.threads, patience=patience, select_by=args.objective,
                       schedule=args.schedule, augment=_augment(args, recipe.augment),
                       class_weighted=args.class_weighted, device=args.device, init_weights=args.init_weights,
                       label_smoothing=args.label_smoothing, ema=args.ema, keep=args.keep)


def _tune_cfg(args) -> TuneConfig:
    return TuneConfig(trials=args.trials, sampler=args.sampler, pruner=args.pruner, storage=args.storage,
                      study_name=args.study_name, jobs=args.jobs)


def _print_scan(summary: dict) -> None:
    import os

    rel = lambda path: os.path.relpath(path, summary["root"])  # noqa: E731
    print(f"{summary['root']}: {summary['layout']} layout, {summary['n_images']} usable images")
    for name, n in summary["counts"].items():
        print(f"  {name:<24} {n}")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} file(s):")
        for s in summary["skipped"]:
            print(f"  {rel(s['path'])}: {s['reason']}")
    print(f"{len(summary['duplicate_groups'])} duplicate group(s) (identical or near-identical images):")
    for group in summary["duplicate_groups"]:
        print("  " + "  ==  ".join(map(rel, group)))
    if summary["layout"] == "split":
        print(f"{len(summary['cross_split_duplicates'])} duplicate pair(s) straddle two split folders")


def _ci(metrics: dict, name: str) -> str:
    interval = metrics.get("ci95", {}).get(name)
    return f" (95% CI {interval[0]:.4f}-{interval[1]:.4f})" if interval else ""


def cmd_scan(args) -> int:
    from lungxray.data import load_dataset

    summary = load_dataset(args.data, _data_cfg(args), progress=not args.quiet and not args.json).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_scan(summary)
    return 0


def cmd_run(args) -> int:
    from lungxray import pipeline

    summary = pipeline.run(args.data, args.out, args.model, _data_cfg(args), _split_cfg(args), _tune_cfg(args),
                           _train_cfg(args, args.epochs, in_trials=True),
                           _train_cfg(args, args.final_epochs if args.final_epochs is not None else args.epochs),
                           force=args.force, progress=not args.quiet)
    metrics = json.loads(Path(summary["artifacts"]["metrics"]).read_text())
    split = metrics["split"]
    print(f"best hyperparameters: {json.dumps(summary['best_params'])}")
    print(f"trials: {summary['trials_complete']} ran to the end, {summary['trials_pruned']} stopped early")
    leaked = split["test_duplicates_of_train"]
    duplicates = (f"{leaked} test images copy a training image: optimistic, see --drop-test-duplicates"
                  if leaked else f"{summary['duplicate_groups']} duplicate groups kept whole")
    print(f"test accuracy {summary['test_accuracy']:.4f}{_ci(metrics, 'accuracy')}, macro-F1 "
          f"{summary['test_macro_f1']:.4f}{_ci(metrics, 'macro_f1')} on {summary['n_test']} held-out images "
          f"({split['mode']} split, seed {split['seed']}, {duplicates})")
    print("artifacts:")
    for name, path in summary["artifacts"].items():
        print(f"  {name:<17} {path}")
    return 0


def cmd_tune(args) -> int:
    from lungxray import pipeline

    ds, split = pipeline.prepare(args.data, _data_cfg(args), _split_cfg(args), args.out, not args.quiet)
    result = pipeline.tune_stage(ds, split, args.model, _tune_cfg(args), _train_cfg(args, args.epochs, True),
                                 args.out, progress=not args.quiet)
    print(f"best trial {result.best_trial}: {args.objective} {result.best_value:.4f}, "
          f"params {json.dumps(result.best_params)}")
    print(f"written: {args.out / 'best_params.json'}, {args.out / 'trials.json'}")
    return 0


def cmd_train(args) -> int:
    from lungxray import pipeline

    from lungxray.models import get_spec

    params_file = args.params or args.out / "best_params.json"
    if str(params_file) == "defaults":
        params = dict(get_spec(args.model).defaults)
    elif not params_file.is_file():
        raise FileNotFoundError(f"{params_file} not found; run `lungxray tune` first, or pass --params FILE "
                                "or --params defaults")
    else:
        params = _read_params(params_file)
    data_cfg = _data_cfg(args)
    ds, split = pipeline.prepare(args.data, data_cfg, _split_cfg(args), args.out, not args.quiet)
    result, folder = pipeline.train_stage(ds, split, args.model, params, _train_cfg(args, args.epochs),
                                          data_cfg, args.out, force=args.force, progress=not args.quiet)
    print(f"kept epoch {result.best_epoch}: val accuracy {result.best.val_accuracy:.4f}, "
          f"val loss {result.best.val_loss:.4f}")
    print(f"written: {folder}, {args.out / 'curves.png'}, {args.out / 'history.json'}")
    return 0


def _model_and_data(args):
    """The loaded bundle, DATA preprocessed as the bundle expects, and the indices to score
    (all images, or the test images named in --splits)."""
    import numpy as np

    from lungxray.bundle import Predictor
    from lungxray.data import load_dataset

    predictor = Predictor(args.model_dir)  # verified and loaded once
    ds = load_dataset(args.data, _data_cfg(args, predictor.img_size_), progress=not args.quiet, min_classes=1)
    idx = np.arange(len(ds.samples))
    if args.splits is not None:
        test = set(json.loads(args.splits.read_text())["test"])
        idx = np.array([i for i, s in enumerate(ds.samples) if str(s.path) in test], dtype=np.int64)
        if len(idx) == 0:
            raise ValueError(f"none of the test images in {args.splits} is in {args.data}; "
                             "pass the dataset folder the run was made from")
    return predictor, ds, idx


def cmd_evaluate(args) -> int:
    from lungxray import pipeline

    predictor, ds, idx = _model_and_data(args)
    from lungxray.report import write_report

    metrics = pipeline.evaluate_split(predictor, ds, idx, args.out)  # preprocessed as in training
    pipeline.audit_split(predictor, ds, idx, args.out)
    write_report(args.out, args.model_dir)
    auroc = "n/a" if metrics["macro_auroc"] is None else f"{metrics['macro_auroc']:.4f}"
    print(f"accuracy {metrics['accuracy']:.4f}{_ci(metrics, 'accuracy')}, macro-F1 {metrics['macro_f1']:.4f}"
          f"{_ci(metrics, 'macro_f1')}, macro AUROC {auroc}, loss {metrics['loss']:.4f} on {metrics['n']} images")
    print(f"written: {args.out / 'report.html'}, {args.out / 'metrics.json'}, {args.out / 'audit.json'}, "
          f"{args.out / 'confusion_matrix.png'}")
    return 0


def _read_params(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass a JSON file of hyperparameters "
                                "(best_params.json of a run, or a plain {name: value} object)")
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    return params.get("params", params)  # best_params.json wraps them; a plain dict works too


def cmd_cv(args) -> int:
    from lungxray import pipeline
    from lungxray.models import get_spec

    spec = get_spec(args.model)
    if args.tune and args.params:
        raise ValueError("--tune and --params exclude each other: tune inside each fold, or give fixed parameters")
    params = None if args.tune else (_read_params(args.params) if args.params else dict(spec.defaults))
    train_cfg = _train_cfg(args, args.epochs)
    report = pipeline.cross_validate(args.data, args.out, args.model, _data_cfg(args), args.folds, args.seed,
                                     train_cfg, params, _tune_cfg(args), _train_cfg(args, args.epochs, True),
                                     force=args.force, progress=not args.quiet)
    print(f"{args.model}, {args.folds}-fold cross-validation on {report['pooled']['n']} images "
          f"(folds grouped by duplicate group, seed {args.seed}"
          f"{', tuned in each fold' if args.tune else ''}):")
    print(f"  {'metric':<28} {'mean +- std over folds':>24} {'pooled':>8}  95% CI (bootstrap)")
    for name, row in report["summary"].items():
        spread = (f"{row['mean']:.4f} +- {row['std']:.4f}" if row["std"] is not None
                  else "n/a" if row["mean"] is None else f"{row['mean']:.4f}")
        pooled = "n/a" if row["pooled"] is None else f"{row['pooled']:.4f}"
        ci = "n/a" if row["ci95"] is None else f"[{row['ci95'][0]:.4f}, {row['ci95'][1]:.4f}]"
        print(f"  {name:<28} {spread:>24} {pooled:>8}  {ci}")
    print(f"written: {args.out / 'report.html'}, {args.out / 'cv.json'}, {args.out / 'folds.json'}, "
          f"{args.out / 'cv_confusion_matrix.png'}")
    return 0


def cmd_report(args) -> int:
    from lungxray.report import write_report

    print(f"written: {write_report(args.run_dir, args.model_dir)}")
    return 0


def cmd_explain(args) -> int:
    from lungxray.bundle import Predictor
    from lungxray.explain import explain_files

    results = explain_files(Predictor(args.model_dir), args.images, args.out)
    _print_predictions(results)
    print(f"written: {args.out / 'explain.json'}")
    return 1 if any("error" in r for r in results) else 0


def _print_predictions(results: list[dict]) -> None:
    """One line per image: its class and probabilities (and overlay), or why it was skipped."""
    for r in results:
        if "error" in r:
            print(f"{r['path']}: skipped, {r['error']}")
        else:
            probs = ", ".join(f"{c} {p:.3f}" for c, p in r["probabilities"].items())
            overlay = f" -> {r['overlay']}" if "overlay" in r else ""
            print(f"{r['path']}: {r['class']} ({probs}){overlay}")


def cmd_audit(args) -> int:
    from lungxray import pipeline

    predictor, ds, idx = _model_and_data(args)
    report = pipeline.audit_split(predictor, ds, idx, args.out)
    chance = report["chance"]
    print(f"shortcut audit on {report['n']} images (chance: accuracy {chance['accuracy']:.4f}, "
          f"macro-F1 {chance['macro_f1']:.4f}):")
    for name, view in report["views"].items():
        ci = view["accuracy_ci95"]
        interval = f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else ""
        print(f"  {name.replace('_', ' '):<16} accuracy {view['accuracy']:.4f}{interval}, macro-F1 {view['macro_f1']:.4f}")
    print(report["verdict"])
    print(f"written: {args.out / 'audit.json'}")
    return 0


def cmd_export(args) -> int:
    from lungxray.bundle import export_onnx

    path, gap = export_onnx(args.model_dir)
    print(f"written: {path} (ONNX Runtime vs PyTorch: largest probability difference {gap:.1e})")
    return 0


def cmd_serve(args) -> int:
    from lungxray.bundle import Predictor
    from lungxray.serve import serve

    Predictor(args.model_dir, backend=args.backend)  # a broken bundle fails here, in one line
    serve(args.model_dir, args.host, args.port, args.backend)
    return 0


def cmd_predict(args) -> int:
    from lungxray.bundle import Predictor

    results = Predictor(args.model_dir).predict_files(args.images)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_predictions(results)
    return 1 if any("error" in r for r in results) else 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from lungxray.bundle import BundleError
    from lungxray.data import DataError
    from lungxray.models import InitWeightsError, UnknownModelError
    from lungxray.splits import LeakageError

    args = build_parser().parse_args(argv)
    warnings.showwarning = _one_line_warning
    handler = {"scan": cmd_scan, "run": cmd_run, "tune": cmd_tune, "train": cmd_train, "cv": cmd_cv,
               "evaluate": cmd_evaluate, "report": cmd_report, "explain": cmd_explain, "export": cmd_export,
               "serve": cmd_serve, "audit": cmd_audit,
               "predict": cmd_predict}[args.command]
    try:
        return handler(args)
    except (ConfigError, DataError, BundleError, UnknownModelError, InitWeightsError, LeakageError,
            FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"lungxray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished trials are kept in the study and resume on the next run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
