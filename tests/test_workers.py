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

import optuna
import pytest
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


@pytest.mark.slow
@pytest.mark.processes
def test_tune_parallel_shares_the_run_folders_sqlite_study(tmp_path):
    data, out = write_tree(tmp_path / "data", per_class=10), tmp_path / "run"
    tuned = _start(
        [sys.executable, "-m", "lungxray.cli", "tune", str(data), "--out", str(out), "--model", "mlp",
         "--img-size", "16", "--epochs", "20", "--trials", "5", "--parallel", "2", "--cache-dir",
         str(tmp_path / "cache"), "--quiet"]
    )  # fmt: skip
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


def test_the_preprocessing_agreement_is_the_one_studies_already_record():
    """A study started before the Preprocessing settings existed recorded this hash for the
    default preprocessing: workers of this version must still agree with it."""
    from lungxray.config import Preprocessing
    from lungxray.workers import _digest, _preprocessing_record

    assert _digest(_preprocessing_record(Preprocessing())) == "5571be143afac59b"
    assert _digest(_preprocessing_record(Preprocessing(equalize="clahe"))) != "5571be143afac59b"
