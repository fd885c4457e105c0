"""Logging a finished run, cv or evaluate folder to MLflow (``--mlflow [URI]``).

One MLflow run per folder: its settings and hyperparameters as parameters (``compare.read_folder``:
the names and values ``lungxray compare`` shows), the final training's loss and accuracy per epoch
(history.json) as metrics with the epoch as step, the headline figures as metrics, and report.html,
the JSON summaries and the model bundle as artifacts. ``open_tracker`` runs before the job, so a
missing MLflow or a store that cannot be used fails before anything trains; ``Tracker.log`` after it.

MLflow is an optional extra (``pip install 'lungxray[mlflow]'``: mlflow-skinny, which writes a
SQLite store through the SQLAlchemy and Alembic that Optuna already installs). The default store
is ``sqlite:///OUT/../mlflow.db``, beside the run folders, as MLflow 3.7 made SQLite its default;
its file store (``./mlruns``, deprecated; refused from MLflow 3.13 unless ``MLFLOW_ALLOW_FILE_STORE``
is set) is refused here whatever the version. Nothing here trains or reads images.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from lungxray import runfolder
from lungxray.compare import read_folder, text
from lungxray.errors import ConfigError

STORE = "mlflow.db"  # the default store, beside the run folder
ARTIFACTS_FOLDER = "mlartifacts"  # a new experiment's artifacts, beside a SQLite store
EXPERIMENT = "lungxray"
INSTALL = "pip install 'lungxray[mlflow]'"
LOGGED = (runfolder.REPORT, runfolder.RUN, runfolder.METRICS, runfolder.CV, runfolder.HISTORY, runfolder.BEST_PARAMS)
MOST_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000  # MLflow's limits on one log_batch


def default_uri(out: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else the SQLite store ``mlflow.db`` beside the folder ``out``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(out).resolve().parent / STORE}"


def _sqlite_file(uri: str) -> Path | None:
    """The file of a local SQLite store URI (``sqlite:///PATH``), else None."""
    path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    return Path(path.split("?")[0]) if path and not path.startswith(":memory:") else None


@dataclass(frozen=True)
class Tracker:
    """An MLflow store and experiment, opened and checked."""

    client: object
    """``mlflow.MlflowClient`` on ``uri``."""
    uri: str
    experiment: str
    experiment_id: str

    def log(self, folder: Path, model_dir: Path | None = None) -> str:
        """Log ``folder`` (run, cv or evaluate) as one MLflow run named after it; ``model_dir``: the
        bundle to log (default ``folder/model`` when there is one). Returns the run's id."""
        record = read_folder(folder, model_dir)
        folder = Path(folder)
        tags = {"lungxray.kind": record.kind, "lungxray.folder": str(folder.resolve())}
        run_id = self.client.create_run(self.experiment_id, run_name=folder.resolve().name, tags=tags).info.run_id
        try:
            params = {_key(k): text(v)[:MOST_PARAM_CHARS] for k, v in record.settings.items()}
            now = int(time.time() * 1000)
            final = {_key(k): float(v) for k, v in record.figures.items() if v is not None}
            self._batches(run_id, params, _epochs(folder, now) + [_metric(k, v, now, 0) for k, v in final.items()])
            for name in LOGGED:
                if (folder / name).is_file():
                    self.client.log_artifact(run_id, str(folder / name))
            bundle = Path(model_dir) if model_dir is not None else folder / runfolder.MODEL
            if bundle.is_dir():
                self.client.log_artifacts(run_id, str(bundle), artifact_path=runfolder.MODEL)
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id)
        return run_id

    def _batches(self, run_id: str, params: dict[str, str], metrics: list) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[start : start + PARAMS_PER_BATCH])
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start : start + METRICS_PER_BATCH])


def open_tracker(uri: str | None, experiment: str, out: Path) -> Tracker:
    """The store ``uri`` (None or "": ``default_uri(out)``) and its ``experiment``, made when new:
    a ``ConfigError`` with what to do when MLflow is not installed or cannot use the store."""
    try:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise ConfigError(
            "--mlflow needs MLflow, which is not installed", hint=f"{INSTALL}, or leave --mlflow out"
        ) from None
    uri = uri or default_uri(out)
    if uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks")):
        # MLflow's file store (./mlruns) is deprecated, and refused from MLflow 3.13: one rule whatever the version
        raise ConfigError(
            f"--mlflow {runfolder.shown_url(uri)!r} is not a database or server URI (MLflow's file store is "
            "deprecated)",
            hint=f"give a store such as sqlite:///runs/{STORE} or http://HOST:5000, or --mlflow alone (after DATA) "
            f"for {runfolder.shown_url(default_uri(out))}",
        )
    store = _sqlite_file(uri)
    if store is not None:
        store.parent.mkdir(parents=True, exist_ok=True)
    shown = runfolder.shown_url(uri)
    try:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            beside = (store.resolve().parent / ARTIFACTS_FOLDER).as_uri() if store is not None else None
            experiment_id = client.create_experiment(experiment, artifact_location=beside)
        elif found.lifecycle_stage == "deleted":
            raise ConfigError(
                f"the MLflow experiment {experiment!r} in {shown} was deleted",
                hint=f"restore it (mlflow experiments restore --experiment-id {found.experiment_id}) or choose "
                "another --mlflow-experiment",
            )
        else:
            experiment_id = found.experiment_id
    except MlflowException as exc:
        raise ConfigError(
            f"MLflow cannot use the store {shown}: {exc.message}",
            hint=f"give a database URI such as sqlite:///runs/{STORE}, or a tracking server's http(s):// URL",
        ) from None
    return Tracker(client, uri, experiment, experiment_id)


def _key(name: str) -> str:
    """A name MLflow takes as a parameter or metric key (letters, digits, _ - . / : and spaces)."""
    return re.sub(r"[^\w\-./: ]", "_", name)


def _metric(key: str, value: float, timestamp: int, step: int):
    from mlflow.entities import Metric

    return Metric(key, value, timestamp, step)


def _epochs(folder: Path, timestamp: int) -> list:
    """history.json's per-epoch figures (train_loss, val_accuracy, ...) with the epoch as step; the
    kept epoch as ``best_epoch``; none for a folder without one (cv, evaluate)."""
    history = runfolder.read_json(folder, runfolder.HISTORY) or {}
    steps = history.get("epoch") or []
    metrics = [
        _metric(_key(name), float(v), timestamp, int(step))
        for name, values in history.items()
        if name != "epoch" and isinstance(values, list) and len(values) == len(steps)
        for step, v in zip(steps, values, strict=True)
        if v is not None
    ]
    if history.get("best_epoch") is not None:
        metrics.append(_metric("best_epoch", float(history["best_epoch"]), timestamp, 0))
    return metrics
