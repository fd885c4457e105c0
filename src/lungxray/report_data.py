"""What a run, evaluate or cv folder holds, read for the report: ``read_run`` gives a ``RunContents``.

Every file is named by ``runfolder`` and read with its ``read_json``; the model bundle's files
(config.json, its own metrics.json) are read through ``bundle``'s public functions. Nothing here
writes HTML or draws (``report``, ``report_sections``, ``plots``) or computes a metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lungxray import runfolder
from lungxray.bundle import bundle_config, bundle_metrics, is_bundle
from lungxray.errors import MissingInputError

# The report's name for each JSON artifact it reads, and the artifact.
ARTIFACTS = {
    "scan": runfolder.SCAN,
    "splits": runfolder.SPLITS,
    "trials": runfolder.TRIALS,
    "best_params": runfolder.BEST_PARAMS,
    "history": runfolder.HISTORY,
    "metrics": runfolder.METRICS,
    "predictions": runfolder.PREDICTIONS,
    "cv": runfolder.CV,
    "audit": runfolder.AUDIT,
}


class Scores(NamedTuple):
    """The scored images: labels (N,), probabilities (N, C) as served, the probabilities before
    temperature scaling (None for cv, which keeps only the served ones) and the temperature."""

    y: np.ndarray | None
    probs: np.ndarray | None
    raw: np.ndarray | None
    temperature: float


@dataclass(frozen=True)
class RunContents:
    """The JSON artifacts found in ``folder`` (None where absent), by their ``ARTIFACTS`` key; the
    external sets' metrics by name; ``model_dir``, the bundle the report explains errors with."""

    folder: Path
    model_dir: Path
    found: dict[str, dict | list | None]
    external: dict[str, dict]

    @property
    def cv(self) -> dict | None:
        return self.found["cv"]

    @property
    def metrics(self) -> dict:
        """The headline metrics: the test's (or evaluation's) metrics.json, or cv's pooled ones."""
        return self.found["metrics"] or (self.cv or {}).get("pooled")

    @property
    def own_run(self) -> bool:
        """A run's folder (scored on its own test split), not an evaluation of other data."""
        return self.found["splits"] is not None

    def data_root(self) -> str | None:
        """The data folder the scored images came from."""
        return self.metrics.get("data") or (self.found["scan"] or {}).get("root")

    def scored_by(self) -> dict:
        """What an evaluation recorded of the model that scored the images: its bundle's folder
        (``model_dir``), its name (``model``) and training seed (``seed``); {} elsewhere."""
        return (self.found["metrics"] or {}).get("scored_by") or {}

    def missing_model(self) -> str | None:
        """Why the sections that need the model bundle (the gallery of errors; an evaluation's
        comparison with the model's own test) cannot be drawn, in words naming --model; None when
        they can, or when the folder has none of them (cv)."""
        if self.cv or (self.own_run and not self.found["predictions"]) or is_bundle(self.model_dir):
            return None
        recorded = self.scored_by().get("model_dir")
        where = (
            f"the model that scored these images is no longer at {recorded}"
            if recorded and Path(recorded) == self.model_dir
            else f"no model bundle at {self.model_dir}"
        )
        return f"{where}; pass --model BUNDLE to `lungxray report` to draw what needs it"

    def run_record(self) -> dict:
        """run.json ({} before `run` wrote it: the report of a run is written before run.json)."""
        return runfolder.read_json(self.folder, runfolder.RUN) or {}

    def model_config(self) -> dict | None:
        """The bundle's config.json, or None without a bundle at ``model_dir``."""
        return bundle_config(self.model_dir)

    def model_metrics(self) -> dict | None:
        """The test metrics stored in the bundle (when its checksums list them), or None."""
        return bundle_metrics(self.model_dir)

    def split_sizes(self) -> dict | None:
        """Images per part of the split: a run's splits, or each cv fold's train / val / test."""
        if self.found["splits"]:
            return self.found["splits"]["sizes"]
        if self.cv:
            return {
                f"fold {f['fold']} (train / val / test)": f"{f['train']} / {f['val']} / {f['test']}"
                for f in self.cv["per_fold"]
            }
        return None

    def scores(self) -> Scores:
        """The labels and probabilities of the scored images: cv's out-of-fold ones, else predictions.json's."""
        cv, predictions = self.cv, self.found["predictions"]
        if cv:
            classes = cv["pooled"]["classes"]
            y = np.array([classes.index(o["label"]) for o in cv["out_of_fold"]])
            return Scores(y, np.array([[o["probabilities"][c] for c in classes] for o in cv["out_of_fold"]]), None, 1.0)
        if predictions:
            classes = predictions["classes"]
            y = np.array([classes.index(it["label"]) for it in predictions["images"]])
            return Scores(
                y,
                np.array([runfolder.by_class(it["probabilities"], classes) for it in predictions["images"]]),
                np.array([runfolder.by_class(it["uncalibrated"], classes) for it in predictions["images"]]),
                predictions["temperature"],
            )
        return Scores(None, None, None, 1.0)


def read_run(folder: Path, model_dir: Path | None = None) -> RunContents:
    """The artifacts of the run, evaluate or cv folder ``folder``; ``model_dir`` defaults to
    ``folder/model`` (a run's bundle), else the bundle an evaluation recorded in its metrics.json.
    A folder without metrics.json or cv.json is refused."""
    folder = Path(folder)
    found = {key: runfolder.read_json(folder, name) for key, name in ARTIFACTS.items()}
    if model_dir is None:
        recorded = ((found["metrics"] or {}).get("scored_by") or {}).get("model_dir")
        own = folder / runfolder.MODEL
        model_dir = Path(recorded) if recorded and not is_bundle(own) else own
    if (found["metrics"] or (found["cv"] or {}).get("pooled")) is None:
        raise MissingInputError(
            f"{folder} holds no {runfolder.METRICS} or {runfolder.CV}",
            hint="run `lungxray run`, `evaluate` or `cv` with --out there first",
        )
    external = {
        sub.name: runfolder.read_json(sub, runfolder.METRICS)
        for sub in sorted((folder / runfolder.EXTERNAL).glob("*"))
        if (sub / runfolder.METRICS).is_file()
    }
    return RunContents(folder, Path(model_dir), found, external)
