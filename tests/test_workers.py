"""Workers sharing one study: two processes on a real PostgreSQL server, one killed mid-trial,
and a worker with other data refused; `tune --parallel` on the run folder's SQLite file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import write_tree


def _worker(data, url, cache, trials=6, **extra) -> list[str]:
    args = [sys.executable, "-m", "lungxray.cli", "worker", str(data), "--storage", url, "--study-name", "shared",
            "--trials", str(trials), "--model", "mlp", "--img-size", "16", "--epochs", "300", "--pruner", "none",
            "--heartbeat", "1", "--cache-dir", str(cache), "--quiet"]  # fmt: skip
    return args + [str(v) for pair in extra.items() for v in pair]


@pytest.mark.postgres
def test_two_workers_on_postgres_survive_one_killed_mid_trial(postgres, tmp_path):
    url = postgres("kill_one")
    data, cache = write_tree(tmp_path / "data", per_class=10), tmp_path / "cache"
    # one worker first: the study exists and the cache is warm when the two start
    subprocess.run(_worker(data, url, cache, trials=1), check=True, capture_output=True, timeout=300)
    a = subprocess.Popen(_worker(data, url, cache), stderr=subprocess.PIPE, text=True)
    b = subprocess.Popen(_worker(data, url, cache), stderr=subprocess.PIPE, text=True)
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
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    assert a.returncode == -signal.SIGKILL and b.returncode == 0, err
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
    refused = subprocess.run(_worker(more, url, cache), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "other data" in refused.stderr
    assert len(optuna.load_study(study_name="shared", storage=url).trials) == len(trials)  # it ran nothing


def test_tune_parallel_shares_the_run_folders_sqlite_study(tmp_path):
    data, out = write_tree(tmp_path / "data", per_class=10), tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "lungxray.cli", "tune", str(data), "--out", str(out), "--model", "mlp",
         "--img-size", "16", "--epochs", "20", "--trials", "5", "--parallel", "2", "--cache-dir",
         str(tmp_path / "cache"), "--quiet"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    trials = json.loads((out / "trials.json").read_text())
    finished = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == 5
    assert len({t["worker"] for t in finished}) == 2  # both processes ran trials
    best = json.loads((out / "best_params.json").read_text())
    assert best["trial"] in {t["number"] for t in finished} and best["params"]


def test_tune_with_a_storage_url_takes_part_as_a_worker(tmp_path):
    """`tune --storage URL` beside a worker: the two share the trials (none counted twice) and
    tune writes the run folder's best parameters from the whole study."""
    data, cache = write_tree(tmp_path / "data", per_class=10), tmp_path / "cache"
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    worker = subprocess.Popen(_worker(data, url, cache, trials=4), stderr=subprocess.PIPE, text=True)
    tuned = subprocess.run(
        [sys.executable, "-m", "lungxray.cli", "tune", str(data), "--out", str(tmp_path / "run"), "--storage", url,
         "--study-name", "shared", "--trials", "4", "--model", "mlp", "--img-size", "16", "--epochs", "300",
         "--pruner", "none", "--heartbeat", "1", "--cache-dir", str(cache), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    _, err = worker.communicate(timeout=300)
    assert tuned.returncode == 0 and worker.returncode == 0, tuned.stderr + err
    study = optuna.load_study(study_name="shared", storage=url)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 4 and all("worker" in t.user_attrs for t in finished)
    best = json.loads((tmp_path / "run" / "best_params.json").read_text())
    assert best["trial"] == study.best_trial.number and best["params"] == study.best_params
