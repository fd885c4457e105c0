"""Tuning: the study resumes after a kill without losing finished trials, and is seeded; pruned
trials teach the sampler and the pruner; each trial is drawn from a history fixed by its number."""

from __future__ import annotations

import functools
import json
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from conftest import settings, toy

from lungxray.config import TuneConfig, resolve_tune
from lungxray.models import get_spec
from lungxray.study import HISTORY, as_seen, tell
from lungxray.train import FitData
from lungxray.tune import history_start, tune

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _count(db, states: str = "'COMPLETE', 'PRUNED'") -> int:
    """Trials in ``states``, read with plain read-only SQL: loading the study through Optuna while
    the tune process is still creating it would race it to create the tables."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute(f"SELECT COUNT(*) FROM trials WHERE state IN ({states})").fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # no database or no tables yet


def _running_with_an_epoch(db) -> int:
    """RUNNING trials that have reported at least one epoch, read as ``_count`` does."""
    query = ("SELECT COUNT(DISTINCT t.trial_id) FROM trials t JOIN trial_intermediate_values v "
             "ON v.trial_id = t.trial_id WHERE t.state = 'RUNNING'")  # fmt: skip
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute(query).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _ended(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if it still runs, and reap it (and close its pipes) either way."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def _finished(storage):
    study = optuna.load_study(study_name="lungxray", storage=storage)
    return {t.number: (t.value, t.params) for t in study.get_trials(states=FINISHED)}, study


@pytest.mark.slow
@pytest.mark.processes
def test_killed_study_resumes_and_keeps_finished_trials(flat_tree, tmp_path):
    out = tmp_path / "run"
    storage = f"sqlite:///{out / 'study.db'}"
    cmd = [
        sys.executable,
        "-m",
        "lungxray.cli",
        "tune",
        str(flat_tree),
        "--out",
        str(out),
        "--img-size",
        "16",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--epochs",
        "40",
        "--patience",
        "0",
        "--jobs",
        "1",
        "--val-fraction",
        "0.2",
        "--quiet",
    ]
    proc = subprocess.Popen([*cmd, "--trials", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        # killed mid-trial: two finished, and the third one running, an epoch into its 40 (so it is
        # not about to finish between the check and the kill)
        while (
            time.monotonic() < deadline
            and proc.poll() is None
            and (_count(out / "study.db") < 2 or _running_with_an_epoch(out / "study.db") < 1)
        ):
            time.sleep(0.3)
        assert proc.poll() is None, f"tune ended before it could be killed: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        _ended(proc)
    before, _ = _finished(storage)
    assert len(before) >= 2

    target = len(before) + 2
    subprocess.run([*cmd, "--trials", str(target)], check=True, capture_output=True, timeout=300)
    after, study = _finished(storage)
    assert len(after) == target
    for number, (value, params) in before.items():
        assert after[number] == (value, params)  # finished trials survived the kill untouched
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states  # the interrupted trial was marked FAIL
    # the killed trial's parameters are retried, and no finished trial is repeated
    killed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(killed) == 1
    retried = [t for t in study.trials if t.user_attrs.get("retry_of") == killed[0].number]
    assert len(retried) == 1 and retried[0].params == killed[0].params and retried[0].number in after
    new = [params for number, (_, params) in after.items() if number not in before and number != retried[0].number]
    assert new and not any(params in [p for _, p in before.values()] for params in new)


def test_an_extended_study_does_not_replay_its_first_trials(tmp_path):
    train, val = toy(6, size=16), toy(3, size=16, start=50)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    recipe = get_spec("mlp").recipe
    for trials in (2, 4):
        result = tune("mlp", FitData(train, val, 3), resolve_tune(TuneConfig(trials=trials, jobs=1), recipe),
                      settings("mlp", epochs=2, seed=3), storage, progress=False)  # fmt: skip
    params = [t.params for t in result.study.trials]
    assert len(params) == 4 and params[2] not in params[:2] and params[3] not in params[:2]


def test_same_seed_gives_the_same_trials(tmp_path):
    train, val = toy(6, size=16), toy(3, size=16, start=50)
    cfg = TuneConfig(trials=4, sampler="gp", startup_trials=2, jobs=2)
    runs = []
    for name in ("a", "b"):
        result = tune(
            "mlp",
            FitData(train, val, 3),
            cfg,
            settings("mlp", epochs=3, seed=7),
            f"sqlite:///{tmp_path / name}.db",
            progress=False,
        )
        runs.append([(t.params, t.value) for t in result.study.trials])
    assert runs[0] == runs[1]
    assert len({str(p) for p, _ in runs[0]}) == 4  # no point proposed twice


def test_pruning_on_the_frozen_view_decides_as_optuna_does():
    from lungxray.study import FrozenCompleted, should_prune

    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2))
    for slope in (1.0, 2.0, 3.0):
        done = study.ask()
        for step in range(1, 11):
            done.report(slope / step, step)
        study.tell(done, slope / 10)
    frozen = FrozenCompleted(study, below=3)
    decisions = []
    for level in (0.1, 0.5, 1.5, 3.0):
        trial = study.ask()
        values = {}
        for step in range(1, 11):
            values[step] = level + 1 / step
            trial.report(values[step], step)
            ours, optunas = should_prune(trial, dict(values), frozen), trial.should_prune()
            assert ours == optunas, (level, step)
            decisions.append(ours)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert True in decisions and False in decisions  # both outcomes were exercised


@pytest.mark.parametrize("sampler, pruner", [("tpe", "hyperband"), ("random", "none"), ("gp", "median")])
def test_every_sampler_and_pruner_finishes_the_study(tmp_path, sampler, pruner):
    train, val = toy(6, size=16), toy(3, size=16, start=50)
    cfg = resolve_tune(
        TuneConfig(trials=5, sampler=sampler, pruner=pruner, startup_trials=2, warmup_epochs=1), get_spec("mlp").recipe
    )
    result = tune(
        "mlp",
        FitData(train, val, 3),
        cfg,
        settings("mlp", epochs=4, patience=0),
        f"sqlite:///{tmp_path / 's.db'}",
        progress=False,
    )
    finished = result.study.get_trials(states=FINISHED)
    assert len(finished) == 5 and result.n_complete + result.n_pruned == 5
    assert result.best_value == min(as_seen(t).value for t in finished)
    for t in finished:  # pruned trials are stored as such, with the figure the search learnt from
        assert (t.state == optuna.trial.TrialState.PRUNED) == bool(t.user_attrs["pruned_at_epoch"])
        # every epoch's figure is in the study by the time the trial is told (median: written by
        # the report thread while the trial trains; hyperband: written at once, it reads them back)
        assert sorted(t.intermediate_values) == list(range(1, t.user_attrs["epochs_run"] + 1))
        assert as_seen(t).value == min(t.intermediate_values.values())  # selected by val_loss, best epoch
    assert set(result.best_params) == {
        "activation",
        "layer_1",
        "layer_2",
        "layer_3",
        "dropout_1",
        "dropout_2",
        "learning_rate",
    }


def test_a_study_made_for_another_model_is_refused_with_a_hint(tmp_path):
    from lungxray.errors import StudyError
    from lungxray.study import open_study

    storage, cfg = f"sqlite:///{tmp_path / 's.db'}", TuneConfig()
    open_study(cfg, storage, 0, "minimize", 4, "cnn")
    assert open_study(cfg, storage, 0, "minimize", 4, "cnn").user_attrs["model"] == "cnn"  # resumes
    with pytest.raises(StudyError, match="searches the cnn model, not mlp") as info:
        open_study(cfg, storage, 0, "minimize", 4, "mlp")
    assert "--study-name" in info.value.hint


def test_resuming_a_study_with_another_epoch_budget_is_refused_naming_both(tmp_path):
    """Trials trained for 4 and for 8 epochs would be ranked together: refused as another
    --objective is, naming both budgets and how to go on."""
    from lungxray.errors import StudyError
    from lungxray.study import open_study

    storage, cfg = f"sqlite:///{tmp_path / 's.db'}", TuneConfig()
    open_study(cfg, storage, 0, "minimize", 4, "mlp")
    assert open_study(cfg, storage, 0, "minimize", 4, "mlp").user_attrs["epochs"] == 4  # resumes
    with pytest.raises(StudyError, match="trains each trial for --epochs 4, not 8") as info:
        open_study(cfg, storage, 0, "minimize", 8, "mlp")
    assert "--epochs 4" in info.value.hint and "--study-name" in info.value.hint


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_stops_the_running_trial_promptly_and_resume_retries_it(flat_tree, tmp_path, jobs):
    """Ctrl-C stops the running trial at its next epoch instead of waiting for it, and queues its
    parameters so the resumed study retries them; with two jobs, both running trials and the third
    random trial, drawn with them (a new search draws its startup trials at once) and not yet started."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lungxray.cli", "tune", str(flat_tree), "--out", str(out), "--img-size", "16",
           "--cache-dir", str(tmp_path / "cache"), "--epochs", "400", "--patience", "0", "--jobs", str(jobs),
           "--val-fraction", "0.2", "--quiet", "--trials", "3"]  # fmt: skip
    # SIGINT as a terminal delivers it, even where the suite itself runs as a background job (which
    # starts with SIGINT ignored, and Python then installs no KeyboardInterrupt handler)
    restore = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=restore)
    try:
        deadline = time.monotonic() + 120
        # a trial that has reported an epoch is training: one only asked (RUNNING in the study) may
        # still be drawing its parameters
        while time.monotonic() < deadline and proc.poll() is None and _running_with_an_epoch(out / "study.db") < 1:
            time.sleep(0.2)
        time.sleep(1.0)  # a few epochs into a 400-epoch trial
        interrupted_at = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        _ended(proc)
    assert proc.returncode == 130 and b"interrupted" in err
    assert time.monotonic() - interrupted_at < 15  # did not wait for the 400 epochs
    study = optuna.load_study(study_name="lungxray", storage=f"sqlite:///{out / 'study.db'}")
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    queued = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert len(failed) == len(queued) == {1: 1, 2: 3}[jobs] and all(t.params for t in failed)
    by_number = {t.number: t for t in failed}
    assert sorted(again.user_attrs["retry_of"] for again in queued) == sorted(by_number)  # each retried once
    for again in queued:  # the resumed study asks these first
        assert again.system_attrs["fixed_params"] == by_number[again.user_attrs["retry_of"]].params


def test_pruned_trials_are_stored_pruned_and_still_teach_the_sampler_and_the_pruner(tmp_path):
    """A pruned trial is PRUNED in the storage (optuna-dashboard shows it so), and the sampler and
    the median pruner see it as a finished trial worth its best figure."""
    from lungxray.study import (
        BEST_VALUE,
        FrozenCompleted,
        LearnsFromPruned,
        MedianOverFinished,
        StudyView,
        best_trial,
        make_pruner,
        make_sampler,
        should_prune,
        tell,
    )

    seen_by_sampler = []

    class Recording(optuna.samplers.RandomSampler):
        def infer_relative_search_space(self, study, trial):
            seen_by_sampler.append(sorted((t.number, t.value) for t in study.get_trials(states=(COMPLETE,))))
            return {}

    COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 's.db'}",
        sampler=LearnsFromPruned(Recording(seed=0)),
        pruner=MedianOverFinished(n_startup_trials=1, n_warmup_steps=0),
    )
    full = study.ask()
    for step, value in enumerate([0.9, 0.5, 0.4], start=1):
        full.report(value, step)
    tell(study, full, COMPLETE, 0.4)
    pruned = study.ask()
    for step, value in enumerate([0.95, 0.3, 0.8], start=1):  # its best (0.3) is before its last (0.8)
        pruned.report(value, step)
    pruned.set_user_attr(BEST_VALUE, 0.3)
    tell(study, pruned, PRUNED, 0.3)
    stored = study.trials[1]
    assert stored.state == PRUNED and stored.value == 0.8  # Optuna keeps the last figure as the value
    assert as_seen(stored).state == COMPLETE and as_seen(stored).value == 0.3
    assert [(t.number, t.value) for t in StudyView(study).get_trials(states=(COMPLETE,))] == [(0, 0.4), (1, 0.3)]
    assert best_trial(study).number == 1 and study.best_trial.number == 0  # Optuna's own ignores it
    probe = study.ask()
    probe.suggest_float("x", 0, 1)  # the sampler reads the study at the first suggestion
    assert seen_by_sampler[-1] == [(0, 0.4), (1, 0.3)]  # the sampler learns from the pruned trial
    # the median of the two finished trials at step 2 is 0.4: above it is pruned, below is not,
    # read live (a worker) and from the view frozen when the trial was asked (the search's path)
    frozen = FrozenCompleted(study, below=2)
    probe.report(0.45, 2)
    assert probe.should_prune() and should_prune(probe, {2: 0.45}, frozen)
    other = study.ask()
    other.report(0.35, 2)
    assert not other.should_prune() and not should_prune(other, {2: 0.35}, frozen)
    # and the search's own sampler and pruner are these
    cfg = TuneConfig(pruner="median")
    assert isinstance(make_pruner(cfg, 10), MedianOverFinished)
    for name in ("gp", "tpe", "random"):
        assert isinstance(make_sampler(name, 0, 4), LearnsFromPruned)


@pytest.mark.slow
def test_the_search_on_a_slice_of_the_shared_dataset_repeats_exactly(shared_data, tmp_path):
    """Two runs with the same seed on 20 real X-rays per class: the same trials (parameters,
    figures, states, where each stopped), the same test metrics and the same model bytes. Two
    trials run side by side, as in the demo, and some are pruned."""
    import json

    from conftest import cli

    data = tmp_path / "slice"
    for folder in sorted((shared_data / "train").iterdir()):
        (data / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:20]:
            (data / folder.name / image.name).symlink_to(image)
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        options = "--model mlp --img-size 48 --trials 10 --epochs 14 --jobs 2 --seed 3 --quiet"
        assert cli("run", data, "--out", out, "--cache-dir", tmp_path / "cache", options) == 0
        trials = json.loads((out / "trials.json").read_text())
        runs.append(
            (
                [(t["number"], t["state"], t["value"], t["params"], t.get("pruned_at_epoch")) for t in trials],
                json.loads((out / "metrics.json").read_text())["accuracy"],
                (out / "model" / "model.safetensors").read_bytes(),
            )
        )
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1] and runs[0][2] == runs[1][2]
    states = [state for _, state, *_ in runs[0][0]]
    assert states.count("COMPLETE") + states.count("PRUNED") == 10 and "PRUNED" in states


@pytest.mark.slow  # holds half of 16 trials back 1 s each, by design
def test_the_search_is_the_same_whichever_trial_ends_first(tmp_path, monkeypatch):
    """Trials start as a worker frees and are told as they end, but each is drawn and pruned from
    a history fixed by its number: two runs whose trials end in different orders (the even ones
    held back in one, the odd ones in the other) make the same study, trial for trial."""
    from lungxray import tune as tune_module

    run_trial, frozen_view, told, ended, at_draw = tune_module.run_trial, tune_module.FrozenCompleted, [], set(), []

    def held(slow_parity):
        def run(trial, *args, **kwargs):
            outcome = run_trial(trial, *args, **kwargs)
            time.sleep(1.0 if trial.number % 2 == slow_parity else 0.0)  # ends after its neighbour
            ended.add(trial.number)
            return outcome

        return run

    class Drawn(frozen_view):  # made as each trial is submitted, its parameters drawn
        def __init__(self, study, below):
            number = len(study.trials) - 1
            at_draw[-1].append((number, number - 1 in ended))  # had the trial just before it ended?
            super().__init__(study, below)

    def recording_tell(study, trial, state, value):
        told[-1].append(trial.number)
        return tell(study, trial, state, value)

    monkeypatch.setattr(tune_module, "tell", recording_tell)
    monkeypatch.setattr(tune_module, "FrozenCompleted", Drawn)
    train, val = toy(6, size=16), toy(3, size=16, start=50)
    cfg = resolve_tune(TuneConfig(trials=8, sampler="gp", startup_trials=2, warmup_epochs=1, jobs=2),
                       get_spec("mlp").recipe)  # fmt: skip
    runs = []
    for slow_parity in (0, 1):
        told.append([])
        at_draw.append([])
        ended.clear()
        monkeypatch.setattr(tune_module, "run_trial", held(slow_parity))
        result = tune("mlp", FitData(train, val, 3), cfg, settings("mlp", epochs=4, seed=5),
                      f"sqlite:///{tmp_path / str(slow_parity)}.db", progress=False)  # fmt: skip
        runs.append([(t.number, t.params, t.value, t.state, t.intermediate_values, t.user_attrs[HISTORY])
                     for t in result.study.trials])  # fmt: skip
    assert told[0] != told[1] and sorted(told[0]) == sorted(told[1]) == list(range(8))  # other orders
    # and trials drawn with the trial just before them ended in one run, still training in the other
    assert [n for n, _ in at_draw[0]] == [n for n, _ in at_draw[1]] and at_draw[0][2:] != at_draw[1][2:]
    assert runs[0] == runs[1]
    assert [history for *_, history in runs[0]] == [0, 0, 2, 2, 3, 4, 5, 6]
    assert len({json.dumps(params, sort_keys=True) for _, params, *_ in runs[0]}) == 8  # none drawn twice


def test_each_trial_s_history_and_how_its_sampler_sees_the_rest():
    """``history_start``: the startup trials see none, the next sees them all, and with two jobs a
    trial sees all but the one before it; with one job, all before it. In a trial's view that
    one reads RUNNING with its parameters and no figure, though it has ended."""
    from lungxray.study import FrozenCompleted, StudyView

    def starts(jobs, startup=4):
        return [history_start(n, TuneConfig(jobs=jobs, startup_trials=startup)) for n in range(9)]

    assert starts(2) == [0, 0, 0, 0, 4, 4, 5, 6, 7]
    assert starts(1) == [0, 0, 0, 0, 4, 5, 6, 7, 8]
    assert starts(3, startup=2) == [0, 0, 2, 2, 2, 3, 4, 5, 6]
    study = optuna.create_study()
    for x in (0.1, 0.2, 0.3):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        trial.report(x, 1)
        study.tell(trial, x)
    drawn = study.ask()
    view = StudyView(study, below=2, number=drawn.number)
    seen = {t.number: (t.state.name, t.value, t.intermediate_values, t.params) for t in view.get_trials()}
    assert seen[0] == ("COMPLETE", 0.1, {1: 0.1}, study.trials[0].params)
    assert seen[2] == ("RUNNING", None, {}, study.trials[2].params)  # ended, but after its history
    complete = view.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert seen[3][0] == "RUNNING" and [t.number for t in complete] == [0, 1]
    assert [t.number for t in FrozenCompleted(study, below=2).get_trials()] == [0, 1]  # the pruner's, too


def test_every_epochs_figure_is_in_the_study_before_its_trial_is_told(tmp_path, monkeypatch):
    """The report thread writes while the trial trains; slowed down here, so a trial told before its
    writes landed would be missing figures (or be told while still taking them)."""
    report = optuna.trial.Trial.report

    def slow(self, value, step):
        time.sleep(0.05)
        return report(self, value, step)

    monkeypatch.setattr(optuna.trial.Trial, "report", slow)
    train, val = toy(6, size=16), toy(3, size=16, start=50)
    cfg = resolve_tune(TuneConfig(trials=2, startup_trials=4, jobs=2), get_spec("mlp").recipe)
    result = tune("mlp", FitData(train, val, 3), cfg, settings("mlp", epochs=6, patience=0),
                  f"sqlite:///{tmp_path / 's.db'}", progress=False)  # fmt: skip
    trials = result.study.get_trials(states=FINISHED)
    assert len(trials) == 2
    for t in trials:
        assert sorted(t.intermediate_values) == list(range(1, 7))


def test_a_new_searchs_startup_trials_start_largest_first_with_the_draws_of_number_order(tmp_path):
    """Side by side, the startup trials are drawn together, in number order (the draws one job makes
    one at a time), and handed to the workers largest network first, so the two last to end (which
    the first sampled trial waits for) end closer together."""
    from lungxray.models import create_model

    train, val = toy(6, size=16), toy(3, size=16, start=50)
    recipe = get_spec("cnn").recipe
    runs = {}
    for jobs in (1, 2):
        cfg = resolve_tune(TuneConfig(trials=4, jobs=jobs, startup_trials=4), recipe)
        storage = f"sqlite:///{tmp_path / str(jobs)}.db"
        result = tune("cnn", FitData(train, val, 3), cfg, settings("cnn", epochs=1, seed=3), storage, progress=False)
        runs[jobs] = sorted(result.study.trials, key=lambda t: t.number)
    assert [t.params for t in runs[1]] == [t.params for t in runs[2]]

    def size(trial) -> int:
        return sum(p.numel() for p in create_model("cnn", (1, 16, 16), 3, **trial.params).parameters())

    sizes = [size(t) for t in runs[2]]
    assert len(set(sizes)) > 1  # the draws differ in size, so the order is tested
    started = sorted(runs[2], key=lambda t: t.user_attrs["started_s"])
    assert [size(t) for t in started] == sorted(sizes, reverse=True)
    assert [t.number for t in sorted(runs[1], key=lambda t: t.user_attrs["started_s"])] == [
        0,
        1,
        2,
        3,
    ]  # one job: in turn
