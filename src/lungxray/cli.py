"""Command line: one subcommand per stage, each a thin call into the library.

``lungxray run`` does everything; ``scan``, ``tune``, ``train``, ``evaluate`` and ``predict`` run
one stage each; ``cv`` cross-validates; ``labels`` ranks doubtful labels from cv runs; ``explain``
and ``audit`` show where a model looks. Flags, their defaults and their help come from the
settings dataclasses (``config.py``): this module only parses and prints. A ``LungxrayError`` (a
failure the user can fix) is printed as one line with its hint, exit code 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import typing
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

from lungxray import __version__
from lungxray.config import DataConfig, SplitConfig, TrainConfig, TuneConfig
from lungxray.errors import ConfigError, LungxrayError


def _field_docs(cls) -> dict[str, str]:
    """Field name -> its docstring, on one line (docstring_parser reads attribute docstrings)."""
    import docstring_parser

    return {p.arg_name: " ".join((p.description or "").split()) for p in docstring_parser.parse_from_object(cls).params}


def add_options(parser, cls, *, skip: tuple[str, ...] = (), helps: dict[str, str] | None = None) -> None:
    """One flag per field of dataclass ``cls`` that names a flag (and of the settings dataclasses it
    nests): type, choices and help from the field. Unset flags stay out of the namespace
    (``SUPPRESS``), so the dataclass default applies and is not repeated here."""
    from lungxray.job import nested

    docs, hints, inner = _field_docs(cls), typing.get_type_hints(cls), nested(cls)
    for f in fields(cls):
        if f.name in inner and f.name not in skip:
            group = f.metadata.get("group")
            add_options(parser.add_argument_group(group) if group else parser, inner[f.name], skip=skip, helps=helps)
        flag = f.metadata.get("flag")
        if not flag or f.name in skip:
            continue
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        repeated = typing.get_origin(hints[f.name]) is tuple  # tuple[str, ...]: the flag is repeated
        text = (helps or {}).get(f.name) or docs.get(f.name, "")
        if f.default not in (MISSING, None, ()) and kind is not bool:
            text = f"{text.rstrip('.')} (default {f.default})"
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}  # argparse formats help
        if kind is bool:
            # a switch left to the recipe (or on by default) also needs its --no- form
            kw["action"] = argparse.BooleanOptionalAction if f.default is not False else "store_true"
        else:
            metavar = f.metadata.get("metavar") or (
                None if f.metadata.get("choices") else flag[2:].upper().replace("-", "_")
            )
            kw |= {"type": kind, "choices": f.metadata.get("choices"), "metavar": metavar}
            if repeated:
                kw["action"] = "append"
        parser.add_argument(flag, **kw)


def from_args(cls, args: argparse.Namespace, **values):
    """An instance of settings dataclass ``cls`` from the flags given on the command line, plus ``values``."""
    from lungxray.job import build

    return build(cls, vars(args) | values)


def _train_cfg(args: argparse.Namespace) -> TrainConfig:
    return from_args(TrainConfig, args)


def _data_args(p: argparse.ArgumentParser, img_size: bool = True, sources: bool = False) -> None:
    p.add_argument(
        "data",
        type=Path,
        help="dataset folder: one sub-folder per class, or train/ test/ [val/] folders that each hold class folders",
    )
    # evaluate and friends: the bundle's size and preprocessing
    skip = () if img_size else ("preprocessing",)
    add_options(p, DataConfig, skip=skip + (() if sources else ("sources",)))  # sources: for the model card
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    p.add_argument(
        "--log-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="append the progress lines (stages, one per finished trial and epoch, with losses), the results "
        "and any error to FILE, time-stamped, whether or not the terminal shows bars",
    )


def _model_data_args(p: argparse.ArgumentParser, verb: str) -> None:
    """MODEL, DATA (preprocessed at the model's size) and --splits, for the commands that score a bundle."""
    p.add_argument("model_dir", metavar="MODEL", type=Path, help="model bundle folder (RUN/model)")
    _data_args(p, img_size=False)
    p.add_argument(
        "--splits",
        type=Path,
        default=None,
        help=f"splits.json of a run: {verb} only its test images (default: every image in DATA)",
    )
    p.add_argument("--force", action="store_true", help=f"replace the results of an earlier {verb} (or run) in --out")
    p.add_argument(
        "--include-seen",
        action="store_true",
        help="keep the images the model was trained or validated on (recognised by content, whatever "
        "their path); by default they are left out and listed, as scoring them is not a test",
    )


def _train_args(p: argparse.ArgumentParser, seed: bool = False, members: bool = True) -> None:
    p.add_argument(
        "--model",
        default="cnn",
        help="registered model: cnn (small MONAI CNN, default), resnet18, densenet121, or mlp (the tutorial's)",
    )
    # run/tune/train take --seed with the split options; cv has no split, its seed draws the folds too
    skip = (() if seed else ("seed",)) + (() if members else ("members",))  # tune: one fit per trial
    add_options(p, TrainConfig, skip=skip, helps={"seed": "Seed of the folds, training and bootstrap."})


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL", type=Path, help="model bundle folder (RUN/model)")


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: use 1-65535")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungxray", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lungxray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("scan", help="list classes, counts, unusable files and duplicates")
    _data_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("run", help="scan, split, tune, train, evaluate and save: the whole job")
    _data_args(p, sources=True), add_options(p, SplitConfig), add_options(p, TuneConfig), _train_args(p)
    p.add_argument("--final-epochs", type=int, default=None, help="epochs of the final training (default: --epochs)")
    p.add_argument(
        "--external",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a dataset from elsewhere (other hospitals; class folders as in DATA) to evaluate the final model "
        "on after the internal test, never trained or tuned on; repeatable",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder for the model, metrics, plots and study")
    p.add_argument("--force", action="store_true", help="replace a model already in OUT")

    p = sub.add_parser("tune", help="hyperparameter search on train/val; writes OUT/best_params.json")
    _data_args(p), add_options(p, SplitConfig), add_options(p, TuneConfig), _train_args(p, members=False)
    p.add_argument("--out", type=Path, required=True, help="run folder (study, splits, best_params.json)")

    p = sub.add_parser(
        "worker",
        help="join a study in a shared database (--storage, --study-name) and run its trials until it holds --trials",
        description="Run trials of a study shared by workers on several machines: every worker needs the same "
        "data, split and search settings (checked), and a crashed worker's trial is re-run by another.",
    )
    _data_args(p), add_options(p, SplitConfig), add_options(p, TuneConfig), _train_args(p, members=False)

    p = sub.add_parser("train", help="train with the best (or given) hyperparameters; writes OUT/model/")
    _data_args(p, sources=True), add_options(p, SplitConfig), _train_args(p)
    p.add_argument(
        "--params",
        default=None,
        help="JSON of hyperparameters, or 'defaults' for the model's registered ones "
        "(default OUT/best_params.json from `tune`)",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--force", action="store_true", help="replace a model already in OUT")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train in N processes on this machine (DistributedDataParallel through torchrun: gloo on the CPU, "
        "NCCL on GPUs; the same as `torchrun --nproc-per-node N -m lungxray.cli train ...`); each takes its share "
        "of every batch",
    )

    p = sub.add_parser("evaluate", help="metrics, audit and report of a model on a labelled dataset")
    _model_data_args(p, "evaluate")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for metrics.json, predictions.json, audit.json, the plots and report.html",
    )

    p = sub.add_parser(
        "cv", help="k-fold cross-validation: mean +- std over folds and bootstrap CIs; writes OUT/cv.json"
    )
    _data_args(p)
    _train_args(p, seed=True)
    p.add_argument("--folds", type=int, default=5, help="folds, stratified and grouped by duplicate group (default 5)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="train the same folds with this many training seeds (seed, seed+1, ...) and report each "
        "metric's mean +- std over them: one cv run is one draw (default 1)",
    )
    p.add_argument(
        "--params",
        type=Path,
        default=None,
        help="JSON of fixed hyperparameters for every fold (default: the model's defaults)",
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help="tune inside each fold's training part instead of using fixed hyperparameters",
    )
    add_options(p, TuneConfig)
    p.add_argument("--out", type=Path, required=True, help="folder for cv.json, folds.json and the plot")
    p.add_argument("--force", action="store_true", help="replace a cv.json already in OUT")

    p = sub.add_parser(
        "labels", help="rank images whose label is probably wrong, from the out-of-fold predictions of cv runs"
    )
    p.add_argument("cv_dirs", metavar="CV_DIR", type=Path, nargs="+", help="folders written by `lungxray cv --out`")
    p.add_argument("--top", type=int, default=30, help="thumbnails on the HTML page (default 30)")
    p.add_argument(
        "--out", type=Path, default=None, help="folder for label_issues.csv and .html (default: the first CV_DIR)"
    )

    p = sub.add_parser("report", help="write RUN/report.html from what run, evaluate or cv left in RUN")
    p.add_argument("run_dir", metavar="RUN", type=Path, help="folder written by run, evaluate --out or cv --out")
    p.add_argument(
        "--model",
        dest="model_dir",
        type=Path,
        default=None,
        help="model bundle that explains the errors in the gallery (default RUN/model)",
    )

    p = sub.add_parser("explain", help="probabilities and a Grad-CAM (CNN) or gradient (MLP) overlay per image")
    _model_arg(p)
    p.add_argument("images", metavar="IMAGE", type=Path, nargs="+", help="image files, or folders of them")
    p.add_argument("--out", type=Path, required=True, help="folder for the overlay PNGs and explain.json")

    p = sub.add_parser("audit", help="shortcut check: scores with the lungs hidden and with the borders hidden")
    _model_data_args(p, "audit")
    p.add_argument("--out", type=Path, required=True, help="folder for audit.json")

    p = sub.add_parser("export", help="add model.onnx to a bundle (checked against PyTorch)")
    _model_arg(p)
    p.add_argument("--onnx", action="store_true", required=True, help="export to ONNX (the only format so far)")

    p = sub.add_parser("serve", help="web service and upload page for a model (FastAPI + uvicorn)")
    _model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port, 1-65535 (default 8000)")
    p.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=None,
        metavar="HOST",
        help="Host headers the service answers (default: the bound address, and localhost when it is a "
        "loopback address; any host when bound to 0.0.0.0): refuses DNS-rebinding requests",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx"],
        default="auto",
        help="auto: ONNX Runtime when the bundle has model.onnx (default)",
    )

    p = sub.add_parser("predict", help="class and probabilities for each image")
    _model_arg(p)
    p.add_argument("images", metavar="IMAGE", type=Path, nargs="+", help="image files, or folders of them")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    return parser


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
    mixed = summary["mixed_label_duplicate_groups"]
    if mixed:
        print(f"{len(mixed)} duplicate group(s) whose copies carry different labels (check these labels):")
        for group in mixed:
            print("  " + "  ==  ".join(f"{rel(m['path'])} ({m['label']})" for m in group))
    from lungxray.data import films_per_patient

    patients = summary["patients"]
    if patients["n"]:
        per = films_per_patient(patients)
        print(f"{patients['n']} patient(s) named by DICOM headers, covering {patients['images']} images ({per})")
    groups = summary["groups"]
    sources = [f"patients from {groups['file']}"] * bool(groups["file"])
    sources += ["DICOM patients"] * bool(patients["n"] and patients["grouped"])
    source = f"{' and '.join(sources)} joined with duplicate groups" if sources else "duplicate groups"
    print(f"{groups['n']} group(s) kept whole by every split ({source}); the largest holds {groups['largest']} images")
    if summary["excluded"]:
        print(f"{len(summary['excluded'])} image(s) left out by --exclude")


def _ci(metrics: dict, name: str) -> str:
    interval = metrics.get("ci95", {}).get(name)
    return f" (95% CI {interval[0]:.4f}-{interval[1]:.4f})" if interval else ""


def cmd_scan(args) -> int:
    from lungxray.data import load_dataset

    summary = load_dataset(args.data, from_args(DataConfig, args), progress=not args.quiet and not args.json).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_scan(summary)
    return 0


def cmd_run(args) -> int:
    from lungxray import pipeline

    result = pipeline.run(
        args.data,
        args.out,
        args.model,
        from_args(DataConfig, args),
        from_args(SplitConfig, args),
        from_args(TuneConfig, args),
        _train_cfg(args),
        final_epochs=args.final_epochs,
        external=args.external,
        force=args.force,
        progress=not args.quiet,
    )
    summary, metrics = result.summary, result.metrics
    split = metrics["split"]
    print(f"best hyperparameters: {json.dumps(summary['best_params'])}")
    print(f"trials: {summary['trials_complete']} ran to the end, {summary['trials_pruned']} stopped early")
    leaked = split["test_duplicates_of_train"]
    duplicates = (
        f"{leaked} test images copy a training image: optimistic, see --drop-test-duplicates"
        if leaked
        else f"{summary['duplicate_groups']} duplicate groups kept whole"
    )
    print(
        f"test accuracy {summary['test_accuracy']:.4f}{_ci(metrics, 'accuracy')}, macro-F1 "
        f"{summary['test_macro_f1']:.4f}{_ci(metrics, 'macro_f1')} on {summary['n_test']} held-out images "
        f"({split['mode']} split, seed {split['seed']}, {duplicates})"
    )
    _print_ood(metrics)
    for name, ext in summary["external"].items():
        if "error" in ext:
            print(f"external {name}: not evaluated: {ext['error']}")
            continue
        recall = ", ".join(f"{c} {v:.2f}" for c, v in ext["recall"].items())
        print(f"external {name}: accuracy {ext['accuracy']:.4f} on {ext['n']} images; recall {recall}")
    print("artifacts:")
    for name, path in summary["artifacts"].items():
        print(f"  {name:<17} {path}")
    return 0


def cmd_tune(args) -> int:
    from lungxray import pipeline, runfolder

    train_cfg, tune_cfg = _train_cfg(args), from_args(TuneConfig, args)
    pipeline.settings(args.model, train_cfg, tune_cfg)  # a bad model or device fails before the scan
    if tune_cfg.storage:
        from lungxray.workers import check_storage

        check_storage(tune_cfg.storage)  # before the scan
    data_cfg = from_args(DataConfig, args)
    with runfolder.writer_lock(args.out):
        ds, split = pipeline.prepare(
            args.data, data_cfg, from_args(SplitConfig, args), args.out, not args.quiet, args.model
        )
        result = pipeline.tune_stage(
            ds, split, args.model, tune_cfg, train_cfg, args.out, progress=not args.quiet, data_cfg=data_cfg
        )
    print(
        f"best trial {result.best_trial}: {train_cfg.select_by} {result.best_value:.4f}, "
        f"params {json.dumps(result.best_params)}"
    )
    print(f"written: {args.out / runfolder.BEST_PARAMS}, {args.out / runfolder.TRIALS}")
    return 0


def cmd_worker(args) -> int:
    from lungxray import pipeline, workers
    from lungxray.progress import note
    from lungxray.tune import best_trial

    train_cfg, tune_cfg = _train_cfg(args), from_args(TuneConfig, args)
    if not tune_cfg.storage:
        raise ConfigError(
            "worker needs --storage: the study's database URL (postgresql+psycopg://USER@HOST/DB)",
            hint="start the study with `lungxray tune ... --storage URL --study-name NAME`, or give the same URL here",
        )
    trial_cfg, _, tune_cfg = pipeline.settings(args.model, train_cfg, tune_cfg)
    workers.check_storage(tune_cfg.storage)  # before the scan
    data_cfg = from_args(DataConfig, args)
    ds, split = pipeline.prepare(args.data, data_cfg, from_args(SplitConfig, args), None, not args.quiet, args.model)
    record = workers.agreement(ds, split, args.model, data_cfg, trial_cfg)
    study = workers.open_shared_study(tune_cfg.storage, tune_cfg, trial_cfg, args.model, record)
    pipeline.set_threads(trial_cfg.threads)
    x, y = pipeline.tensors(ds, split.train), pipeline.tensors(ds, split.val)
    done = workers.run_worker(study, args.model, x, y, len(ds.classes), tune_cfg, trial_cfg,
                              say=lambda text: note(text, not args.quiet))  # fmt: skip
    finished = len(study.get_trials(deepcopy=False, states=workers.FINISHED))
    print(f"this worker finished {done} trial(s); the study holds {finished} of {tune_cfg.trials}")
    best = best_trial(study)
    if best is not None:
        print(f"best so far: trial {best.number}, {trial_cfg.select_by} {best.value:.4f}, "
              f"params {json.dumps(best.params)}")  # fmt: skip
    return 0


def cmd_train(args) -> int:
    """Train once; under torchrun (WORLD_SIZE above 1) this is one process of a distributed
    training: every process scans, splits and trains on its share of each batch, and the first
    (rank 0) holds the run folder and writes everything."""
    import os

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_distributed(args)
    from lungxray import pipeline, runfolder

    params = pipeline.training_params(args.model, args.params, args.out)
    _, train_cfg, _ = pipeline.settings(args.model, _train_cfg(args))  # a bad model or device fails before the scan
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    with _process_group(train_cfg) if processes > 1 else contextlib.nullcontext(0) as rank:
        first = rank == 0
        if first:
            runfolder.refuse_to_replace(args.out, runfolder.MODEL, args.force, "a model")  # before splits.json
        data_cfg = from_args(DataConfig, args)
        with runfolder.writer_lock(args.out) if first else contextlib.nullcontext():
            ds, split = pipeline.prepare(args.data, data_cfg, from_args(SplitConfig, args),
                                         args.out if first else None, first and not args.quiet, args.model)  # fmt: skip
            result, folder = pipeline.train_stage(
                ds, split, args.model, params, _train_cfg(args), data_cfg, args.out, force=args.force,
                progress=first and not args.quiet,
            )  # fmt: skip
    if first:
        shared = f" ({processes} processes, batch {train_cfg.batch_size} shared among them)" if processes > 1 else ""
        print(f"kept epoch {result.best_epoch}{shared}: val accuracy {result.best.val_accuracy:.4f}, "
              f"val loss {result.best.val_loss:.4f}")  # fmt: skip
        print(f"written: {folder}, {args.out / runfolder.CURVES}, {args.out / runfolder.HISTORY}")
    return 0


@contextlib.contextmanager
def _process_group(cfg):
    """torchrun's process group for this process (gloo on the CPU, NCCL on its GPU); yields the rank."""
    import os

    import torch
    import torch.distributed as dist

    from lungxray.train import resolve_device

    cuda = resolve_device(cfg.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dist.get_rank()
        # every process waits for the others (rank 0 writes the run folder) before the group is torn
        # down: a process that left first while rank 0 still held the group aborted now and then
        # in gloo's teardown ("terminate called without an active exception", 1 run in 5-9 here)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _launch_distributed(args) -> int:
    """``train --nproc N``: N processes on this machine through torchrun's own launcher, each
    running this command without --nproc."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    argv, skip = [], False
    for arg in args.argv:
        if skip or arg == "--nproc" or arg.startswith("--nproc="):
            skip = arg == "--nproc"
            continue
        argv.append(arg)
    try:
        torchrun(["--standalone", "--nproc-per-node", str(args.nproc), "-m", "lungxray.cli", *argv])
    except ChildFailedError as exc:
        _error(f"lungxray train: error: a training process failed ({exc.name}); its output is above")
        return 1
    return 0


def _model_and_data(args):
    """(predictor, dataset, indices to score, extra for metrics.json/audit.json) for evaluate and audit."""
    from lungxray import pipeline

    predictor, ds, idx, seen = pipeline.model_and_data(
        args.model_dir, args.data, from_args(DataConfig, args), args.splits, not args.quiet, args.include_seen
    )
    print(_seen_line(seen))
    extra = {"data": str(ds.root), "seen_excluded": 0 if seen["included"] else seen["n_seen"], "seen_images": seen}
    return predictor, ds, idx, extra


def _seen_line(seen: dict) -> str:
    """The headline on images the model was trained or validated on."""
    if not seen["known"]:
        return "this model does not record which images it was trained on: seen images cannot be left out"
    n, k = seen["n_images"], seen["n_seen"]
    if not k:
        return f"none of the {n} images was used in training or validation: this is a test"
    if seen["included"]:
        return (
            f"NOT A TEST: {k} of {n} images were used in training or validation and are included "
            "(--include-seen); these figures overstate how the model does on new images"
        )
    return f"{k} of {n} images were used in training or validation: scored on the other {n - k}"


def cmd_evaluate(args) -> int:
    from lungxray import pipeline, runfolder
    from lungxray.report import write_report

    runfolder.refuse_to_replace(args.out, runfolder.METRICS, args.force, "test metrics (a run's or an evaluation's)")
    with runfolder.writer_lock(args.out):
        predictor, ds, idx, extra = _model_and_data(args)
        # preprocessed as in training; the coverage plot named after the data folder
        metrics = pipeline.evaluate_split(predictor, ds, idx, args.out, extra, name=ds.root.name)
        pipeline.audit_split(predictor, ds, idx, args.out, extra)
        write_report(args.out, args.model_dir)
    auroc = "n/a" if metrics["macro_auroc"] is None else f"{metrics['macro_auroc']:.4f}"
    print(
        f"accuracy {metrics['accuracy']:.4f}{_ci(metrics, 'accuracy')}, macro-F1 {metrics['macro_f1']:.4f}"
        f"{_ci(metrics, 'macro_f1')}, macro AUROC {auroc}, loss {metrics['loss']:.4f} on {metrics['n']} images"
    )
    _print_ood(metrics)
    print(
        "written: "
        + ", ".join(
            str(args.out / name) for name in (runfolder.REPORT, runfolder.METRICS, runfolder.AUDIT, runfolder.CONFUSION)
        )
    )
    return 0


def cmd_cv(args) -> int:
    from lungxray import runfolder
    from lungxray.cv import cross_validate

    params = runfolder.read_params(args.params) if args.params else None
    train_cfg = _train_cfg(args)
    report = cross_validate(
        args.data,
        args.out,
        args.model,
        from_args(DataConfig, args),
        train_cfg,
        folds=args.folds,
        repeats=args.repeats,
        params=params,
        tune=args.tune,
        tune_cfg=from_args(TuneConfig, args),
        force=args.force,
        progress=not args.quiet,
    )
    print(
        f"{args.model}, {args.folds}-fold cross-validation on {report['pooled']['n']} images "
        f"(folds grouped by duplicate group, seed {report['seed']}"
        f"{', tuned in each fold' if args.tune else ''}):"
    )
    print(f"  {'metric':<28} {'mean +- std over folds':>24} {'pooled':>8}  95% CI (bootstrap)")
    for name, row in report["summary"].items():
        spread = (
            f"{row['mean']:.4f} +- {row['std']:.4f}"
            if row["std"] is not None
            else "n/a"
            if row["mean"] is None
            else f"{row['mean']:.4f}"
        )
        pooled = "n/a" if row["pooled"] is None else f"{row['pooled']:.4f}"
        ci = "n/a" if row["ci95"] is None else f"[{row['ci95'][0]:.4f}, {row['ci95'][1]:.4f}]"
        print(f"  {name:<28} {spread:>24} {pooled:>8}  {ci}")
    if report["seed_spread"]:
        _print_seed_spread(report)
    print(
        "written: "
        + ", ".join(
            str(args.out / name) for name in (runfolder.REPORT, runfolder.CV, runfolder.FOLDS, runfolder.CV_CONFUSION)
        )
    )
    return 0


def _print_seed_spread(report: dict) -> None:
    seeds = [p["training_seed"] for p in next(iter(report["seed_spread"].values()))["per_seed"]]
    print(
        f"over {len(seeds)} training seeds ({', '.join(map(str, seeds))}) on the same folds "
        f"(the table above: seed {seeds[0]}):"
    )
    print(f"  {'metric':<28} {'fold mean: mean +- std':>24} {'pooled: mean +- std':>22}")
    for name, row in report["seed_spread"].items():
        cells = [f"{row[k]['mean']:.4f} +- {row[k]['std']:.4f}" if row[k] else "n/a" for k in ("fold_mean", "pooled")]
        print(f"  {name:<28} {cells[0]:>24} {cells[1]:>22}")


def cmd_labels(args) -> int:
    from lungxray.labels import write_label_issues

    csv_path, html_path, n = write_label_issues(args.cv_dirs, args.out or args.cv_dirs[0], args.top)
    print(f"confident learning flags {n} image(s) whose given label the out-of-fold predictions doubt")
    print(f"written: {csv_path} (every image, most suspect first), {html_path} (the top {args.top} as thumbnails)")
    print("check them by eye: nothing is relabelled")
    print("to leave confirmed ones out: copy their rows into a file and pass it to --exclude")
    return 0


def cmd_report(args) -> int:
    from lungxray.report import write_report

    print(f"written: {write_report(args.run_dir, args.model_dir)}")
    return 0


def cmd_explain(args) -> int:
    from lungxray import runfolder
    from lungxray.bundle import Predictor
    from lungxray.decode import image_files
    from lungxray.explain import explain_files

    results = explain_files(Predictor(args.model_dir), image_files(args.images), args.out)
    _print_predictions(results)
    print(f"written: {args.out / runfolder.EXPLAIN}")
    return 1 if any("error" in r for r in results) else 0


def _print_ood(metrics: dict) -> None:
    """How many scored images the out-of-distribution flag set aside, and the accuracy on the rest."""
    ood = metrics.get("ood")
    if ood and ood["accepted"]:
        print(
            f"flagged out of distribution: {ood['n_flagged']} of {metrics['n']} ({ood['share_flagged']:.1%}); "
            f"accuracy on the other {ood['accepted']['n']}: {ood['accepted']['accuracy']:.4f}"
        )
    elif ood:
        print(f"flagged out of distribution: all {metrics['n']} images")


def _probability(p: float) -> str:
    """Three decimals, never rounded to certainty (a softmax reaches 1.0 only by rounding)."""
    if p >= 0.9995:
        return ">0.999"
    if 0 < p < 0.0005:
        return "<0.001"
    return f"{p:.3f}"


def _print_predictions(results: list[dict]) -> None:
    """One line per image: its class and probabilities (and overlay), or why it was skipped."""
    for r in results:
        if "error" in r:
            print(f"{r['path']}: skipped, {r['error']}")
        else:
            probs = ", ".join(f"{c} {_probability(p)}" for c, p in r["probabilities"].items())
            overlay = f" -> {r['overlay']}" if "overlay" in r else ""
            if r.get("in_distribution") is False:  # the answer is shown, but as one the model cannot vouch for
                print(
                    f"{r['path']}: NOT LIKE THE TRAINING IMAGES (out-of-distribution score {r['ood_score']:.2f} > 1): "
                    f"no reliable answer; the model would say {r['class']} ({probs}){overlay}"
                )
                continue
            print(f"{r['path']}: {r['class']} ({probs}){overlay}")


def cmd_audit(args) -> int:
    from lungxray import pipeline, runfolder

    runfolder.refuse_to_replace(args.out, runfolder.AUDIT, args.force, "an audit")
    with runfolder.writer_lock(args.out):
        predictor, ds, idx, extra = _model_and_data(args)
        report = pipeline.audit_split(predictor, ds, idx, args.out, extra)
    chance = report["chance"]
    print(
        f"shortcut audit on {report['n']} images (chance: accuracy {chance['accuracy']:.4f}, "
        f"macro-F1 {chance['macro_f1']:.4f}):"
    )
    for name, view in report["views"].items():
        ci = view["accuracy_ci95"]
        interval = f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else ""
        print(
            f"  {name.replace('_', ' '):<16} accuracy {view['accuracy']:.4f}{interval}, macro-F1 {view['macro_f1']:.4f}"
        )
    print(report["verdict"])
    print(f"written: {args.out / runfolder.AUDIT}")
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
    serve(args.model_dir, args.host, args.port, args.backend, args.allowed_hosts)
    return 0


def cmd_predict(args) -> int:
    from lungxray.bundle import Predictor
    from lungxray.decode import image_files

    results = Predictor(args.model_dir).predict_files(image_files(args.images))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_predictions(results)
    return 1 if any("error" in r for r in results) else 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


COMMANDS = {
    "scan": cmd_scan,
    "run": cmd_run,
    "tune": cmd_tune,
    "worker": cmd_worker,
    "train": cmd_train,
    "cv": cmd_cv,
    "labels": cmd_labels,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
    "explain": cmd_explain,
    "export": cmd_export,
    "serve": cmd_serve,
    "audit": cmd_audit,
    "predict": cmd_predict,
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, and answer a mistyped flag with the flags it may have meant."""
    import difflib

    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        sub = parser._subparsers._group_actions[0].choices[args.command]  # the command's own parser
        flags = [s for action in sub._actions for s in action.option_strings]
        hints = []
        for extra in extras:
            close = difflib.get_close_matches(extra.split("=")[0], flags, n=2)
            hints.append(f"{extra} (did you mean {' or '.join(close)}?)" if close else extra)
        sub.error(f"unrecognized arguments: {' '.join(hints)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # as given: train --nproc passes them on
    warnings.showwarning = _one_line_warning
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints escaped, never crashes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    from lungxray import progress

    try:
        progress.log_to(getattr(args, "log_file", None))
    except OSError as exc:
        print(f"lungxray {args.command}: error: cannot write the log file: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        with progress.stdout_copied_to_log():
            return _dispatch(args)
    finally:
        progress.log_to(None)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command](args)
    except LungxrayError as exc:  # user-fixable: one line and a hint; anything else keeps its traceback
        _error(f"lungxray {args.command}: error: {exc}", exc.hint)
        return 2
    except OSError as exc:  # the file system: a read-only or missing folder, a full disk, a bad port
        where = f": {exc.filename}" if exc.filename else ""
        _error(f"lungxray {args.command}: error: {exc.strerror or exc}{where}",
               "check the path, its permissions and the free space")  # fmt: skip
        return 2
    except KeyboardInterrupt:
        _error("interrupted; finished trials are kept in the study and resume on the next run")
        return 130
    except Exception as exc:  # a bug: its traceback follows on stderr, and the log says it happened
        from lungxray.progress import logged

        logged(f"lungxray {args.command}: crashed: {type(exc).__name__}: {exc} (traceback on stderr)")
        raise


def _error(line: str, hint: str | None = None) -> None:
    """An error on standard error, and in the log file when there is one."""
    from lungxray.progress import logged

    for text in [line] + ([f"  hint: {hint}"] if hint else []):
        print(text, file=sys.stderr)
        logged(text)


if __name__ == "__main__":
    sys.exit(main())
