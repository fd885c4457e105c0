"""--mlflow on run, cv and evaluate: each leaves one run in a local MLflow store that MLflow reads
back (parameters as the folder's settings, a metric per epoch, the figures of metrics.json, the
report and the bundle as artifacts); a missing MLflow or an unusable store fails before the job
starts. And the study's browsing hint: optuna-dashboard on a URL that opens the study."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import cli, write_tree

from lungxray.compare import read_folder, text

SMALL = "--model mlp --img-size 16 --quiet --cache-dir"


def _json(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> dict:
    """A run and a cv logged to one SQLite store; an evaluation of the run's model logged with
    --mlflow alone (the default store beside its folder). Returns the folders, the store and what
    the commands printed."""
    root = tmp_path_factory.mktemp("tracking")
    data, ext = write_tree(root / "data", per_class=10), write_tree(root / "ext", per_class=4, start=50)
    store = root / "store" / "mlflow.db"
    uri = f"sqlite:///{store}"
    run, cv, ev = root / "run", root / "cv", root / "evals" / "ev"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracked = f"--mlflow {uri} --mlflow-experiment lx-test"
        assert cli("run", data, "--out", run, SMALL, root / "cache", "--trials 2 --epochs 3 --seed 1", tracked) == 0
        assert cli("cv", data, "--out", cv, SMALL, root / "cache", "--epochs 2 --folds 3", tracked) == 0
        assert cli("evaluate", run / "model", ext, "--mlflow --out", ev, "--quiet --cache-dir", root / "cache") == 0
    return {"run": run, "cv": cv, "ev": ev, "uri": uri, "store": store, "printed": printed.getvalue()}


def _only_run(client, experiment: str, kind: str):
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`lungxray.kind` = '{kind}'")
    assert len(runs) == 1
    return found, runs[0]


@pytest.mark.slow
def test_a_run_logs_its_settings_epochs_figures_and_files(logged):
    from mlflow import MlflowClient

    client, folder = MlflowClient(logged["uri"]), logged["run"]
    experiment, run = _only_run(client, "lx-test", "run")
    assert run.info.status == "FINISHED" and run.info.run_name == folder.name
    assert f"logged to MLflow: run {run.info.run_id} of experiment 'lx-test'" in logged["printed"]
    # parameters: the run's settings, as run.json and best_params.json hold them
    params = run.data.params
    settings, best = _json(folder, "run.json")["settings"], _json(folder, "best_params.json")["params"]
    assert params["model"] == "mlp" and params["seed"] == "1"
    assert params["img_size"] == str(settings["data"]["preprocessing"]["img_size"]) == "16"
    assert params["trials"] == "2" and params["epochs"] == params["final_epochs"] == "3"
    assert params["site_balanced"] == "false" and params["val_by"] == "group"
    assert {k: params[f"hp.{k}"] for k in best} == {k: text(v) for k, v in best.items()}
    assert params == {k: text(v) for k, v in read_folder(folder).settings.items()}  # what `compare` shows
    # a metric per epoch, the epoch as its step
    history = _json(folder, "history.json")
    for name in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
        steps = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
        assert sorted(steps) == list(zip(history["epoch"], history[name], strict=True))
    assert len(history["epoch"]) == 3
    # the final figures: metrics.json's
    metrics = _json(folder, "metrics.json")
    assert run.data.metrics["macro_f1"] == metrics["macro_f1"]
    assert run.data.metrics["accuracy"] == metrics["accuracy"]
    assert run.data.metrics["majority_accuracy"] == metrics["baseline"]["accuracy"]
    assert run.data.metrics["best_epoch"] == history["best_epoch"]
    # the report, the summaries and the bundle, stored beside the SQLite file
    listed = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "metrics.json", "run.json", "history.json", "best_params.json", "model"} <= listed
    bundle = {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/checksums.json"} <= bundle
    assert experiment.artifact_location == (logged["store"].parent / "mlartifacts").as_uri()
    stored = Path(urlparse(run.info.artifact_uri).path)
    assert stored.is_relative_to(logged["store"].parent / "mlartifacts") and (stored / "report.html").is_file()


@pytest.mark.slow
def test_a_cv_logs_its_figures_over_folds_and_no_epochs(logged):
    from mlflow import MlflowClient

    client, folder = MlflowClient(logged["uri"]), logged["cv"]
    _, run = _only_run(client, "lx-test", "cv")
    report = _json(folder, "cv.json")
    assert run.data.params["folds"] == "3" and run.data.params["tune"] == "false"
    assert run.data.metrics["macro_f1"] == report["pooled"]["macro_f1"]
    assert run.data.metrics["macro_f1_mean"] == report["summary"]["macro_f1"]["mean"]
    assert client.get_metric_history(run.info.run_id, "val_loss") == []  # cv keeps no history per epoch
    assert "report.html" in {f.path for f in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_an_evaluation_logs_to_the_store_beside_its_folder_by_default(logged):
    from mlflow import MlflowClient

    store = logged["ev"].parent / "mlflow.db"
    assert store.is_file()
    client = MlflowClient(f"sqlite:///{store}")
    _, run = _only_run(client, "lungxray", "evaluate")
    assert run.data.params["bundle"] == str((logged["run"] / "model").resolve())
    assert run.data.params["hp.learning_rate"] == text(
        _json(logged["run"], "best_params.json")["params"]["learning_rate"]
    )
    assert run.data.metrics["macro_f1"] == _json(logged["ev"], "metrics.json")["macro_f1"]
    listed = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "metrics.json", "model"} <= listed  # the evaluated bundle


@pytest.mark.slow
def test_the_run_says_how_to_browse_its_study(logged):
    import optuna

    study = (logged["run"] / "study.db").resolve()
    line = f"browse the search: optuna-dashboard sqlite:///{study}  (pip install 'lungxray[dashboard]')"
    assert line in logged["printed"].splitlines()
    # the URL it gives opens the study: the run's two trials
    loaded = optuna.load_study(study_name="lungxray", storage=f"sqlite:///{study}")
    assert len(loaded.trials) == 2


@pytest.mark.parametrize("command", ["run", "cv", "evaluate"])
def test_mlflow_missing_fails_before_the_job_with_the_install_hint(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    data, out = write_tree(tmp_path / "data", per_class=2), tmp_path / "out"
    first = [tmp_path / "no-model"] if command == "evaluate" else []  # never read: the check comes first
    assert cli(command, *first, data, "--out", out, "--mlflow --quiet") == 2
    err = capsys.readouterr().err
    assert f"lungxray {command}: error: --mlflow needs MLflow, which is not installed" in err
    assert "hint: pip install 'lungxray[mlflow]'" in err
    assert not out.exists()


def test_a_store_mlflow_cannot_use_fails_before_the_job(tmp_path, monkeypatch, capsys):
    data, out = write_tree(tmp_path / "data", per_class=2), tmp_path / "out"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret@mlflow.example.org")
    # MLflow's deprecated file store, and a path, are refused whatever MLflow's version
    for store in (f"file://{tmp_path / 'mlruns'}", "mlruns"):
        assert cli("run", data, "--out", out, "--mlflow", store, "--quiet") == 2
        err = capsys.readouterr().err
        assert f"--mlflow '{store}' is not a database or server URI (MLflow's file store is deprecated)" in err
        assert "for https://alice:***@mlflow.example.org" in err and "s3cret" not in err  # the default, masked
    assert cli("run", data, "--out", out, "--mlflow", "nosuch://host/db", "--quiet") == 2  # MLflow's own refusal
    err = capsys.readouterr().err
    assert (
        "MLflow cannot use the store nosuch://host/db" in err and "hint: give a database URI such as sqlite:///" in err
    )
    assert not out.exists()
