"""The command line's grammar: the parser of every subcommand, its flags built from the settings
dataclasses (``config.py``: a field's flag, type, choices, default and one-line doc become the
flag and its help), and the bridge back from parsed flags to settings (``job.build``). Parses only:
running a command is ``cli.py``'s, printing its results ``console.py``'s.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from lungxray.config import CVConfig, DataConfig, ServeTimeouts, SplitConfig, TrainConfig, TuneConfig
from lungxray.version import __version__

DESCRIPTION = "A folder of labelled chest X-rays in; a tuned, honestly evaluated, safely saved classifier out."


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


def given(cls, args: argparse.Namespace) -> list[str]:
    """The flags of dataclass ``cls``'s fields that the command line set (an unset one is not in
    ``args``: ``add_options`` suppresses its default)."""
    return [f.metadata["flag"] for f in fields(cls) if f.metadata.get("flag") and f.name in vars(args)]


def _data_args(p: argparse.ArgumentParser, img_size: bool = True, sources: bool = False) -> None:
    p.add_argument(
        "data",
        type=Path,
        nargs="+",
        metavar="DATA",
        help="dataset folder (one sub-folder per class, or train/ test/ [val/] folders that each hold class "
        "folders) or CSV manifest (a row per image: path, label, and optional patient, site, view, ...); "
        "several make one dataset, each a site unless a site column says otherwise",
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


def _csv_target(text: str) -> Path | str:
    return text if text == "-" else Path(text)  # "-": standard output


def _tracking_args(p: argparse.ArgumentParser) -> None:
    """--mlflow [URI] and --mlflow-experiment, for the commands whose folder ``tracking`` logs."""
    p.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        default=None,
        metavar="URI",
        help="after the job, log its settings, hyperparameters, per-epoch losses, figures, report and model to "
        "MLflow (pip install 'lungxray[mlflow]'; checked before the job starts); URI: a store such as "
        "sqlite:///runs/mlflow.db or http://HOST:5000, default $MLFLOW_TRACKING_URI, else SQLite in OUT/../mlflow.db "
        "(MLflow's deprecated ./mlruns file store is refused); without URI, put it after DATA",
    )
    p.add_argument(
        "--mlflow-experiment", default="lungxray", metavar="NAME", help="MLflow experiment (default lungxray)"
    )


class Parser(argparse.ArgumentParser):
    """A parser whose errors are the error and where to look, not the whole usage (a command's
    usage lists every flag: thirty lines that push the error off the screen)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n  hint: `{self.prog} --help` lists what it takes\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lungxray", description=DESCRIPTION)  # its sub-commands' parsers are Parsers too
    parser.add_argument("--version", action="version", version=f"lungxray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _fitting_commands(sub)
    _judging_commands(sub)
    _model_commands(sub)
    return parser


def _fitting_commands(sub) -> None:
    """scan, run, tune, worker and train."""
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
    _tracking_args(p)

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


def _judging_commands(sub) -> None:
    """evaluate, cv, labels and report."""
    p = sub.add_parser("evaluate", help="metrics, audit and report of a model on a labelled dataset")
    _model_data_args(p, "evaluate")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for metrics.json, predictions.json, audit.json, the plots and report.html",
    )
    p.add_argument("--csv", action="store_true", help="also write OUT/predictions.csv, a table for a spreadsheet")
    _tracking_args(p)

    p = sub.add_parser(
        "cv", help="k-fold cross-validation: mean +- std over folds and bootstrap CIs; writes OUT/cv.json"
    )
    _data_args(p)
    _train_args(p, seed=True)
    add_options(p, CVConfig)
    p.add_argument(
        "--params",
        type=Path,
        default=None,
        help="JSON of fixed hyperparameters for every fold (default: the model's defaults)",
    )
    add_options(p, TuneConfig)
    p.add_argument("--out", type=Path, required=True, help="folder for cv.json, folds.json and the plot")
    p.add_argument("--force", action="store_true", help="replace a cv.json already in OUT")
    _tracking_args(p)

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
        help="model bundle that explains the errors in the gallery and, for an evaluation, gives its own test "
        "to compare with (default RUN/model, or the bundle the evaluation recorded)",
    )

    p = sub.add_parser(
        "compare",
        help="settings and headline figures of run, cv and evaluate folders side by side",
        description="A markdown table with a row per setting (bold where the folders differ), hyperparameter "
        "(hp.NAME) and figure, and a column per folder; --csv writes a row per folder instead, for a spreadsheet.",
    )
    p.add_argument("run_dirs", metavar="RUN", type=Path, nargs="+", help="folders written by run, cv or evaluate --out")
    p.add_argument(
        "--csv",
        type=_csv_target,
        default=None,
        metavar="FILE",
        help="write the table as CSV to FILE (a row per folder, figures as plain numbers), never over an existing "
        "file; - prints it instead of the markdown",
    )


def _model_commands(sub) -> None:
    """explain, audit, export, serve and predict: the commands that use a saved model."""
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
    add_options(p.add_argument_group("timeouts (a client that sends nothing, or a byte at a time, is cut off)"),
                ServeTimeouts)  # fmt: skip

    p = sub.add_parser("predict", help="class and probabilities for each image")
    _model_arg(p)
    p.add_argument("images", metavar="IMAGE", type=Path, nargs="+", help="image files, or folders of them")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print a JSON list")
    shape.add_argument(
        "--csv",
        type=_csv_target,
        default=None,
        metavar="FILE",
        help="write a CSV table (path, class, p_CLASS per class, ...) to FILE, never over an existing file; "
        "- prints it",
    )
