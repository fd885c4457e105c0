"""Run, cv and evaluate folders side by side (``lungxray compare``): each folder's settings (the
model, its preprocessing, split, search and training options, the hyperparameters it trained with)
and its headline figures (macro-F1, accuracy against always answering the majority class, macro
AUROC; mean +- sd over folds for a cv folder; each external set's), as a markdown table or CSV.

A folder is read as ``report_data.read_run`` reads it (an evaluation finds the bundle it recorded,
whose config.json holds its settings). Settings keep their option names (``img_size``,
``site_balanced``, ``val_by``: the names of run.json, cv.json and config.json); hyperparameters
are ``hp.NAME``. Writes nothing and computes no metric; ``tracking`` logs the same to MLflow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from lungxray.config import Preprocessing, TrainConfig
from lungxray.errors import LungxrayError
from lungxray.report_data import RunContents, read_run

# Settings shown first, in this order; the other options follow in the order the folders hold them.
HEADLINE = ("data", "model", "bundle", "img_size", "seed", "epochs", "final_epochs", "trials", "folds")
# The figures of one metrics.json (or cv's pooled ones), in this order.
FIGURES = ("n", "macro_f1", "accuracy", "majority_accuracy", "balanced_accuracy", "macro_auroc", "loss")
OVER_FOLDS = ("macro_f1", "accuracy", "macro_auroc")  # cv: mean and sd over folds
LABELS = {"n": "images scored", "macro_f1": "macro-F1", "accuracy": "accuracy (majority class)",
          "balanced_accuracy": "balanced accuracy", "macro_auroc": "macro AUROC", "loss": "loss"}  # fmt: skip
FOLD_LABELS = {"macro_f1": "macro-F1", "accuracy": "accuracy", "macro_auroc": "macro AUROC"}
TRAINING = {f.name for f in fields(TrainConfig)}  # config.json's training settings; the rest are results
PREPROCESSING = {f.name for f in fields(Preprocessing)}  # config.json's preprocessing options; the rest are fixed


@dataclass(frozen=True)
class Compared:
    """One folder's column of the table."""

    folder: Path
    kind: str
    """"run", "cv" or "evaluate"."""
    settings: dict[str, object]
    """Option name -> value as the folder recorded it; ``hp.NAME`` -> a hyperparameter."""
    figures: dict[str, float | int | None]
    """``FIGURES``; ``NAME_mean`` and ``NAME_sd`` over folds (cv); ``external.SET.NAME`` per external set."""


def read_folder(folder: Path, model_dir: Path | None = None) -> Compared:
    """The settings and figures of a run, cv or evaluate folder; ``model_dir``: the bundle whose
    settings an evaluation's are (default: the one it recorded). A folder that holds neither
    metrics.json nor cv.json is a ``MissingInputError`` naming it."""
    contents = read_run(folder, model_dir)
    kind = "cv" if contents.cv else "run" if contents.own_run else "evaluate"
    if kind == "cv":
        settings = _cv_settings(contents.cv)
    elif contents.run_record().get("settings"):
        settings = _run_settings(contents.run_record())
    else:  # an evaluation (or a run stopped before run.json): the settings its bundle was made with
        settings = _bundle_settings(contents)
    return Compared(Path(folder), kind, settings, _figures(contents))


def compare(folders: list[Path]) -> tuple[list[Compared], list[tuple[Path, str]]]:
    """Each folder read (``read_folder``), and those that could not be, with why."""
    read, skipped = [], []
    for folder in map(Path, folders):
        if not folder.is_dir():
            skipped.append((folder, "no such folder"))
            continue
        try:
            read.append(read_folder(folder))
        except LungxrayError as exc:
            skipped.append((folder, f"{exc} ({exc.hint})" if exc.hint else str(exc)))
    return read, skipped


def options(section: dict) -> dict:
    """A settings section of run.json, cv.json or config.json, flat by option name: a nested
    section's fields by their own names, its switch ``enabled`` by the section's (``augment``)."""
    flat = {}
    for name, value in section.items():
        if isinstance(value, dict):
            flat |= {(name if inner == "enabled" else inner): v for inner, v in options(value).items()}
        else:
            flat[name] = value
    return flat


def _hyperparameters(*params: dict) -> dict:
    """``hp.NAME`` -> the value; where folds chose differently, each fold's value, joined by " / "."""
    names = list(dict.fromkeys(name for p in params for name in p))
    values = {}
    for name in names:
        seen = [p.get(name) for p in params]
        values[f"hp.{name}"] = seen[0] if all(v == seen[0] for v in seen) else " / ".join(map(text, seen))
    return values


def _run_settings(record: dict) -> dict:
    """run.json's settings: the search's training settings, and the final model's epochs."""
    s = record["settings"]
    values = options(s["data"]) | options(s["split"]) | options(s["tune"]) | options(s["final"])
    values |= {"data": record["data"], "model": record["model"], "seed": record["seed"],
               "epochs": s["trial"]["epochs"], "final_epochs": s["final"]["epochs"]}  # fmt: skip
    return values | _hyperparameters(record.get("best_params") or {})


def _cv_settings(cv: dict) -> dict:
    """cv.json's settings; the hyperparameters of each fold (fixed, or tuned in each fold)."""
    s = cv["settings"]
    values = options(s["data"]) | options(s.get("split") or {}) | options(s.get("tune") or {}) | options(s["train"])
    values |= {"data": cv["data"], "model": cv["model"], "seed": cv["seed"], "folds": cv["folds"],
               "by": cv.get("by"), "repeats": cv.get("repeats"), "tune": cv.get("tuned_in_each_fold")}  # fmt: skip
    return values | _hyperparameters(*(fold["params"] for fold in cv["per_fold"]))


def _bundle_settings(contents: RunContents) -> dict:
    """The settings of the bundle that scored an evaluation's images (config.json), and its data."""
    values = {"data": contents.data_root()}
    config = contents.model_config()
    if config is None:  # the bundle is gone: only what metrics.json recorded of it
        recorded = contents.scored_by()
        return values | {k: recorded[k] for k in ("model", "seed") if k in recorded}
    training = config.get("training") or {}
    values |= {k: v for k, v in options(config.get("preprocessing") or {}).items() if k in PREPROCESSING}
    values |= options({k: v for k, v in training.items() if k in TRAINING})
    values |= {
        "model": config["model"]["name"],
        "bundle": str(contents.model_dir),
        "final_epochs": training.get("epochs"),
    }
    values.pop("epochs", None)  # the bundle's are the final training's
    return values | _hyperparameters(config["model"].get("hyperparameters") or {})


def _headline(metrics: dict) -> dict:
    figures = {k: metrics.get(k) for k in FIGURES}
    return figures | {"majority_accuracy": (metrics.get("baseline") or {}).get("accuracy")}


def _figures(contents: RunContents) -> dict:
    figures = _headline(contents.metrics)
    if contents.cv:
        for name in OVER_FOLDS:
            row = contents.cv["summary"].get(name) or {}
            figures |= {f"{name}_mean": row.get("mean"), f"{name}_sd": row.get("std")}
    for name, metrics in contents.external.items():
        figures |= {f"external.{name}.{k}": v for k, v in _headline(metrics).items()}
    return figures


def text(value) -> str:
    """A setting as the table shows it: a string as it is, anything else as JSON (true, null, [..])."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def shown_figures(figures: dict) -> dict[str, str]:
    """The markdown rows of one folder's figures: label -> cell (accuracy with the majority class's)."""
    rows = _shown(figures, "", "")
    for name in _external_sets(figures):
        rows |= _shown(figures, f"external.{name}.", f"external {name}: ")
    for name in OVER_FOLDS:
        if f"{name}_mean" in figures:
            mean, sd = figures[f"{name}_mean"], figures[f"{name}_sd"]
            rows[f"{FOLD_LABELS[name]} over folds, mean ± sd"] = f"{_number(mean)} ± {_number(sd)}"
    return rows


def _shown(figures: dict, prefix: str, label: str) -> dict[str, str]:
    """The rows of the figures of one metrics.json, held in ``figures`` under keys ``prefix`` + name."""
    rows = {}
    for key in (k for k in FIGURES if k != "majority_accuracy"):
        cell = _number(figures.get(prefix + key))
        if key == "accuracy":
            cell = f"{cell} ({_number(figures.get(prefix + 'majority_accuracy'))})"
        rows[label + LABELS[key]] = cell
    return rows


def _external_sets(figures: dict) -> list[str]:
    """The external sets' names, from keys ``external.NAME.FIGURE`` (a NAME may hold dots)."""
    return list(dict.fromkeys(k[len("external.") :].rsplit(".", 1)[0] for k in figures if k.startswith("external.")))


def _columns(dicts: list[dict], first: tuple[str, ...] = ()) -> list[str]:
    """The keys of ``dicts`` in first-seen order, ``first`` leading, hyperparameters (``hp.``) last."""
    keys = list(dict.fromkeys([k for k in first if any(k in d for d in dicts)] + [k for d in dicts for k in d]))
    return sorted(keys, key=lambda k: k.startswith("hp."))  # stable: the order otherwise kept


def to_markdown(records: list[Compared]) -> str:
    """A row per setting and per figure, a column per folder; a setting whose value differs between
    the folders that hold it in bold."""
    cell = lambda s: s.replace("|", "\\|")  # noqa: E731
    head = ["folder", *(cell(str(r.folder)) for r in records)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines.append("| kind | " + " | ".join(r.kind for r in records) + " |")
    differ = False
    for key in _columns([r.settings for r in records], HEADLINE):
        cells = [text(r.settings[key]) if key in r.settings else "" for r in records]
        bold = len({text(r.settings[key]) for r in records if key in r.settings}) > 1  # where it applies
        differ |= bold
        lines.append(f"| {f'**{key}**' if bold else key} | " + " | ".join(map(cell, cells)) + " |")
    shown = [shown_figures(r.figures) for r in records]
    for label in _columns(shown):
        lines.append(f"| {cell(label)} | " + " | ".join(cell(s.get(label, "")) for s in shown) + " |")
    notes = ["", "accuracy (majority class): the accuracy of always answering the most frequent class in brackets"]
    if any(r.kind == "cv" for r in records):
        notes.append("cv: the figures of the out-of-fold predictions pooled, then mean ± sd over folds")
    if differ:
        notes.append("**bold**: a setting that differs between the folders (a blank: it does not apply there)")
    return "\n".join(lines + notes) + "\n"


def to_csv(records: list[Compared]) -> str:
    """A row per folder: folder, kind, every setting, then every figure as a plain number."""
    import csv
    import io

    settings = _columns([r.settings for r in records], HEADLINE)
    figures = _columns([r.figures for r in records])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["folder", "kind", *settings, *figures])
    for r in records:
        writer.writerow(
            [str(r.folder), r.kind]
            + [text(r.settings[k]) if k in r.settings else "" for k in settings]
            + ["" if r.figures.get(k) is None else r.figures[k] for k in figures]
        )
    return out.getvalue()
