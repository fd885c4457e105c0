"""Workers sharing one study: two processes on a real PostgreSQL server, one killed mid-trial,
and a worker with other data refused; `tune --parallel` on the run folder's SQLite file; `tune
--storage` beside a worker. Every process a test starts is ended, with whatever it started, when
the test ends, passed or not."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from conftest import write_tree

# Warnings of Optuna's that the worker path must not show (lungxray filters those of its own calls)
OPTUNA_WARNINGS = ("ExperimentalWarning", "FutureWarning", "DeprecationWarning")


def _worker(data, url, cache, trials=6, **extra) -> list[str]:
    args = [sys.executable, "-m", "lungxray.cli", "worker", str(data), "--storage", url, "--study-name", "shared",
            "--trials", str(trials), "--model", "mlp", "--img-size", "16", "--epochs", "300", "--pruner", "none",
            "--heartbeat", "1", "--cache-dir", str(cache), "--quiet"]  # fmt: skip
    return args + [str(v) for pair in extra.items() for v in pair]


def _start(args: list[str]) -> subprocess.Popen:
    """``args`` in a process group of its own (``_stop`` ends the group), its output captured as text."""
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _stop(*procs: subprocess.Popen) -> None:
    """Kill each process's group (the process and the workers it spawned) and reap the process."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):  # the group has ended already
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def _shows_no_optuna_warning(stderr: str) -> bool:
    return not any(kind in stderr for kind in OPTUNA_WARNINGS)


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.postgres
def test_two_workers_on_postgres_survive_one_killed_mid_trial(postgres, tmp_path):
    url = postgres("kill_one")
    data, cache = write_tree(tmp_path / "data", per_class=10), tmp_path / "cache"
    # one worker first: the study exists and the cache is warm when the two start
    first = _start(_worker(data, url, cache, trials=1))
    try:
        _, err = first.communicate(timeout=300)
    finally:
        _stop(first)
    assert first.returncode == 0, err
    a, b = _start(_worker(data, url, cache)), _start(_worker(data, url, cache))
    killed = None
    try:
        deadline = time.monotonic() + 120
        while killed is None and time.monotonic() < deadline:  # wait for a trial of A's to be well under way
            study = optuna.load_study(study_name="shared", storage=url)
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                started = t.datetime_start.timestamp() if t.datetime_start else time.time()
                if t.user_attrs.get("worker", "").endswith(f":{a.pid}") and time.time() - started > 0.5:
                    os.kill(a.pid, signal.SIGKILL)
                    killed = t
            time.sleep(0.2)
        assert killed is not None, "worker A never ran a trial"
        a.wait(timeout=30)
        _, err = b.communicate(timeout=300)
    finally:
        _stop(a, b)
    assert a.returncode == -signal.SIGKILL and b.returncode == 0, err
    assert _shows_no_optuna_warning(err), err
    study = optuna.load_study(study_name="shared", storage=url)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 6  # as requested, counted across workers, none twice
    assert len({t.number for t in trials}) == len(trials)
    assert trials[killed.number].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    assert set(study.best_params) == set(killed.params)  # best parameters readable
    # a worker with other data (one more image) is refused, and says what differs
    more = write_tree(tmp_path / "more", per_class=11)
    refused = _start(_worker(more, url, cache))
    try:
        _, err = refused.communicate(timeout=300)
    finally:
        _stop(refused)
    assert refused.returncode == 2 and "other data" in err
    assert len(optuna.load_study(study_name="shared", storage=url).trials) == len(trials)  # it ran nothing


def _tune_parallel(data: Path, out: Path, cache: Path, flags: str) -> list[str]:
    """`lungxray tune` of the MLP on 16-px films with two worker processes, and ``flags``."""
    return [sys.executable, "-m", "lungxray.cli", "tune", str(data), "--out", str(out), "--model", "mlp",
            "--img-size", "16", "--parallel", "2", "--cache-dir", str(cache), *flags.split()]  # fmt: skip


@pytest.mark.slow
@pytest.mark.processes
def test_tune_parallel_shares_the_run_folders_sqlite_study(tmp_path):
    data, out = write_tree(tmp_path / "data", per_class=10), tmp_path / "run"
    tuned = _start(_tune_parallel(data, out, tmp_path / "cache", "--epochs 20 --trials 5 --quiet"))
    try:
        _, err = tuned.communicate(timeout=600)
    finally:
        _stop(tuned)  # and the worker processes it spawned
    assert tuned.returncode == 0, err
    assert _shows_no_optuna_warning(err), err
    trials = json.loads((out / "trials.json").read_text())
    finished = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == 5
    assert len({t["worker"] for t in finished}) == 2  # both processes ran trials
    best = json.loads((out / "best_params.json").read_text())
    assert best["trial"] in {t["number"] for t in finished} and best["params"]


def _kill_a_running_worker(proc: subprocess.Popen, db: Path, timeout: float = 240) -> tuple[int, dict]:
    """SIGKILL the worker process of the first trial seen running in the SQLite study ``db`` (as the
    out-of-memory killer would); returns (its trial's number, its parameters)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        # The study is not made yet, or its tables are being made: only the tuner makes them (a
        # second creator racing it would fail on the schema version's unique key).
        with contextlib.suppress(KeyError, optuna.exceptions.OptunaError, sqlalchemy.exc.SQLAlchemyError):
            storage = optuna.storages.RDBStorage(f"sqlite:///{db}", skip_table_creation=True) if db.exists() else None
            study = optuna.load_study(study_name="lungxray", storage=storage) if storage else None
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if study else ():
                if "worker" in t.user_attrs and t.params:  # training: its parameters drawn
                    os.kill(int(t.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
                    return t.number, t.params
        time.sleep(0.2)
    raise AssertionError("no worker ran a trial")


@pytest.mark.slow
@pytest.mark.processes
def test_tune_parallel_replaces_a_killed_worker_and_retries_its_trial(tmp_path):
    data, out = write_tree(tmp_path / "data", per_class=10), tmp_path / "run"
    tuned = _start(_tune_parallel(data, out, tmp_path / "cache", "--epochs 100 --trials 3 --pruner none"))
    try:
        killed, params = _kill_a_running_worker(tuned, out / "study.db")
        _, err = tuned.communicate(timeout=400)
    finally:
        _stop(tuned)
    assert tuned.returncode == 0, err
    assert "Traceback" not in err and "KeyError: '/loky-" not in err, err
    assert f"during trial {killed}; a new process takes its place and trial {killed} is retried once" in err
    trials = json.loads((out / "trials.json").read_text())
    assert trials[killed]["state"] == "FAIL"
    finished = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3  # as requested, counted across the processes old and new
    drawn = trials[killed]["params"].items()  # all of them, unless killed while drawing them
    assert drawn and drawn >= params.items()
    assert any(drawn <= t["params"].items() for t in finished if t["number"] > killed)  # its retry
    best = json.loads((out / "best_params.json").read_text())
    assert best["trial"] in {t["number"] for t in finished}


@pytest.mark.slow
@pytest.mark.processes
def test_tune_with_a_storage_url_takes_part_as_a_worker(tmp_path):
    """`tune --storage URL` beside a worker: the two share the trials (none counted twice) and
    tune writes the run folder's best parameters from the whole study."""
    data, cache = write_tree(tmp_path / "data", per_class=10), tmp_path / "cache"
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    worker = _start(_worker(data, url, cache, trials=4))
    tuned = None
    try:
        tuned = _start(
            [sys.executable, "-m", "lungxray.cli", "tune", str(data), "--out", str(tmp_path / "run"), "--storage", url,
             "--study-name", "shared", "--trials", "4", "--model", "mlp", "--img-size", "16", "--epochs", "300",
             "--pruner", "none", "--heartbeat", "1", "--cache-dir", str(cache), "--quiet"]
        )  # fmt: skip
        _, tune_err = tuned.communicate(timeout=300)
        _, err = worker.communicate(timeout=300)
    finally:
        _stop(worker, *([tuned] if tuned is not None else []))
    assert tuned.returncode == 0 and worker.returncode == 0, tune_err + err
    assert _shows_no_optuna_warning(tune_err + err), tune_err + err
    study = optuna.load_study(study_name="shared", storage=url)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 4 and all("worker" in t.user_attrs for t in finished)
    best = json.loads((tmp_path / "run" / "best_params.json").read_text())
    assert best["trial"] == study.best_trial.number and best["params"] == study.best_params
    assert best["storage"] == url  # a URL without a password is written as it is


def test_the_preprocessing_agreement_is_the_one_studies_already_record():
    """A study started before the Preprocessing settings existed recorded this hash for the
    default preprocessing: workers of this version must still agree with it."""
    from lungxray.config import Preprocessing
    from lungxray.workers import _digest, _preprocessing_record

    assert _digest(_preprocessing_record(Preprocessing())) == "5571be143afac59b"
    assert _digest(_preprocessing_record(Preprocessing(equalize="clahe"))) != "5571be143afac59b"


def test_workers_reading_uncertain_cells_otherwise_do_not_share_a_study():
    """Two multi-label datasets whose films name the same positives but read an uncertain cell as
    unknown in one and as negative in the other train on other targets: their agreements differ."""
    import numpy as np

    from lungxray.config import DataConfig, TrainConfig
    from lungxray.data import Dataset, Sample
    from lungxray.splits import Split
    from lungxray.workers import agreement

    def dataset(uncertain: float) -> Dataset:
        samples = [Sample(f"f{i}.png", "effusion", None, f"{i:064x}", f"p{i}", "0" * 16, group=i,
                          targets=(1.0, uncertain)) for i in range(4)]  # fmt: skip
        return Dataset("root", "flat", ["effusion", "edema"], samples, np.zeros((4, 8, 8), np.uint8), task="multilabel")

    split = Split(np.array([0, 1]), np.array([2]), np.array([3]), "random multilabel", 0)
    ignored, negative = (agreement(dataset(v), split, "mlp", DataConfig(), TrainConfig()) for v in (float("nan"), 0.0))
    assert ignored["data"] != negative["data"] and ignored["split"] == negative["split"]
    assert agreement(dataset(float("nan")), split, "mlp", DataConfig(), TrainConfig()) == ignored  # NaN reads alike


@pytest.mark.slow  # scans, trains or scores whole folders: the full suite runs it
def test_a_worker_resumed_after_its_trial_was_failed_drops_the_result_in_one_line(tmp_path, monkeypatch):
    """A worker paused (SIGSTOP) past the heartbeat window finds, when it goes on, that another
    worker failed its trial and queued it again: it says so and runs on, with no Optuna traceback."""
    from conftest import settings, toy

    from lungxray import workers
    from lungxray.config import TuneConfig, resolve_tune
    from lungxray.models import get_spec
    from lungxray.train import FitData

    url = f"sqlite:///{tmp_path / 'w.db'}"
    tune_cfg = resolve_tune(TuneConfig(trials=2, heartbeat=1, pruner="none", study_name="w"), get_spec("mlp").recipe)
    trial_cfg = settings("mlp", epochs=2)
    real_run_trial, paused = workers.run_trial, []

    def failed_meanwhile(trial, hp, setup):
        if not paused:  # the first trial: another worker found it silent, as fail_stale_trials does
            paused.append(trial.number)
            optuna.load_study(study_name="w", storage=url).tell(trial.number, state=optuna.trial.TrialState.FAIL)
        return real_run_trial(trial, hp, setup)

    monkeypatch.setattr(workers, "run_trial", failed_meanwhile)
    said = []
    with workers.heartbeat_warnings_off():
        study = workers.open_shared_study(url, tune_cfg, trial_cfg, "mlp", {"data": "x"})
        data = FitData(toy(4), toy(2, start=50), 3)
        assert workers.run_worker(study, "mlp", data, tune_cfg, trial_cfg, said.append) == 2
    assert said[0].startswith(f"warning: trial {paused[0]} was already marked failed")
    assert "result is dropped" in said[0] and "--heartbeat 1" in said[0]
    assert study.get_trials(deepcopy=False)[paused[0]].state == optuna.trial.TrialState.FAIL


SECRET = "Pw-7c1e9f"  # a password planted in a storage URL; no output may show it


def test_a_storage_urls_password_is_masked_wherever_the_url_is_shown():
    """The URL written to run.json and cv.json, best_params.json and error messages keeps no
    password: in the user part, in the query, or in a URL SQLAlchemy cannot parse."""
    from lungxray.config import TuneConfig
    from lungxray.errors import StudyError
    from lungxray.pipeline import search_settings
    from lungxray.runfolder import shown_url
    from lungxray.workers import check_storage

    url = f"postgresql+psycopg://lungxray:{SECRET}@db.example:5432/studies"
    assert shown_url(url) == "postgresql+psycopg://lungxray:***@db.example:5432/studies"
    assert SECRET not in shown_url(f"postgresql+psycopg://lungxray@db.example/db?password={SECRET}&sslmode=require")
    assert SECRET not in shown_url(f"postgresql+psycopg://lungxray:{SECRET}@db.example:noport/studies")
    assert shown_url("sqlite:////runs/a/study.db") == "sqlite:////runs/a/study.db"  # nothing to hide: as it is
    assert search_settings(TuneConfig(storage=url))["storage"] == shown_url(url)
    assert search_settings(TuneConfig())["storage"] is None
    with pytest.raises(StudyError, match="is not a database URL") as refused:
        check_storage(f"postgresql+psycopg://lungxray:{SECRET}@db.example:noport/studies")
    assert SECRET not in str(refused.value)
    # a password holding an unescaped '@': hidden whole, and refused before any driver quotes a piece of it
    at = f"postgresql+psycopg://lungxray:{SECRET}@x@db.example/studies"
    assert shown_url(at) == "postgresql+psycopg://lungxray:***@db.example/studies"
    with pytest.raises(StudyError, match="more than one '@'") as refused:
        check_storage(at)
    assert SECRET not in str(refused.value) and "@x" not in str(refused.value)


@pytest.mark.slow
@pytest.mark.postgres
def test_a_run_on_a_storage_url_with_a_password_never_writes_or_prints_it(postgres, tmp_path, capsys):
    """`run --storage` with a password in the URL (the throw-away server trusts any): no file of the
    run folder, no line printed and no line of --log-file holds it; run.json and best_params.json
    name the storage with the password masked."""
    from conftest import cli

    url = postgres("masked").replace("lungxray@", f"lungxray:{SECRET}@")
    data, out, log = write_tree(tmp_path / "data", per_class=10), tmp_path / "run", tmp_path / "run.log"
    code = cli("run", data, "--out", out, "--storage", url, "--log-file", log, "--model mlp --img-size 16",
               "--trials 2 --epochs 2 --final-epochs 2 --heartbeat 1 --cache-dir", tmp_path / "cache")  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10 and log.read_text()
    for text in [printed.out, printed.err, log.read_text()] + [p.read_bytes().decode("latin-1") for p in files]:
        assert SECRET not in text
    masked = url.replace(SECRET, "***")
    run = json.loads((out / "run.json").read_text())
    assert run["artifacts"]["study"] == masked and run["settings"]["tune"]["storage"] == masked
    assert json.loads((out / "best_params.json").read_text())["storage"] == masked
    assert ["study", masked] in [line.split() for line in printed.out.splitlines()]  # the artifact list
