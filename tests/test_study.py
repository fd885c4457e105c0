"""The Optuna pieces ``lungxray.study`` relies on, private ones included, behave as it assumes; the
worker path shows no warning of Optuna's."""

from __future__ import annotations

import copy
import inspect
import time
import warnings

import optuna
import pytest
from conftest import settings, toy

from lungxray.config import TuneConfig, resolve_tune
from lungxray.models import get_spec
from lungxray.study import (
    BEST_VALUE,
    PRUNED,
    FrozenCompleted,
    LearnsFromPruned,
    StudyView,
    as_seen,
    heartbeat_warnings_off,
    retried_trial_number,
    retry_once,
    storage_trial_id,
    tell,
)
from lungxray.train import FitData

COMPLETE, RUNNING = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING


def _study_with_a_pruned_trial(sampler=None) -> optuna.Study:
    """Three COMPLETE trials and a PRUNED one whose best figure (0.05) is the study's best."""
    study = optuna.create_study(sampler=sampler or optuna.samplers.RandomSampler(seed=0))
    for value in (0.4, 0.3, 0.2):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        tell(study, trial, COMPLETE, value)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.report(0.05, 1)
    trial.report(0.6, 2)
    trial.set_user_attr(BEST_VALUE, 0.05)
    tell(study, trial, PRUNED, 0.05)
    return study


def test_study_get_trials_is_there_with_the_arguments_the_view_takes():
    """``StudyView`` overrides ``Study._get_trials(deepcopy, states, use_cache)``, private in Optuna."""
    parameters = list(inspect.signature(optuna.Study._get_trials).parameters)
    assert parameters == ["self", "deepcopy", "states", "use_cache"]
    view = StudyView(_study_with_a_pruned_trial())
    trials = view._get_trials(deepcopy=False, states=(COMPLETE,), use_cache=True)
    assert [(t.number, t.value) for t in trials] == [(0, 0.4), (1, 0.3), (2, 0.2), (3, 0.05)]


@pytest.mark.parametrize("name", ["gp", "tpe"])
def test_the_samplers_read_the_study_through_the_views_get_trials(name, monkeypatch):
    """Optuna's GP and TPE samplers read the study they are handed through its private
    ``_get_trials``: were they to read it another way, they would not see pruned trials as
    ``as_seen`` makes them."""
    calls = []
    own = StudyView._get_trials

    def recording(self, deepcopy=True, states=None, use_cache=False):
        trials = own(self, deepcopy, states, use_cache)
        calls.append([(t.number, t.state) for t in trials])
        return trials

    monkeypatch.setattr(StudyView, "_get_trials", recording)
    if name == "gp":
        inner = optuna.samplers.GPSampler(seed=0, n_startup_trials=2)
    else:
        inner = optuna.samplers.TPESampler(seed=0, n_startup_trials=2)
    study = _study_with_a_pruned_trial(LearnsFromPruned(inner))
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    assert any((3, COMPLETE) in seen for seen in calls)  # the pruned trial, read as finished


def test_a_percentile_pruner_reads_only_what_the_frozen_view_holds():
    """The median pruner is handed a ``FrozenCompleted`` in place of a study: it must read only its
    ``get_trials`` and ``direction``."""
    study = _study_with_a_pruned_trial()
    frozen = FrozenCompleted(study, below=4)
    assert set(vars(frozen)) == {"direction", "_trials"}
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    running = optuna.trial.create_trial(state=RUNNING, intermediate_values={1: 0.9})
    assert pruner.prune(frozen, running)  # above the median at step 1 (0.05 is the only figure there)


def test_a_frozen_trial_copies_and_its_setters_leave_the_original_alone():
    """``as_seen`` and ``StudyView`` make a trial's view by ``copy.copy`` and FrozenTrial's setters;
    the result equals a trial built whole (so no attribute of FrozenTrial is left behind)."""
    study = _study_with_a_pruned_trial()
    stored = study.trials[3]
    seen = as_seen(stored)
    assert (seen.state, seen.value) == (COMPLETE, 0.05) and (stored.state, stored.value) == (PRUNED, 0.6)
    drawn = StudyView(study, below=3, number=4)._seen(stored)
    whole = optuna.trial.FrozenTrial(
        number=stored.number,
        trial_id=stored._trial_id,
        state=RUNNING,
        value=None,
        datetime_start=stored.datetime_start,
        datetime_complete=None,
        params=stored.params,
        distributions=stored.distributions,
        user_attrs=stored.user_attrs,
        system_attrs=stored.system_attrs,
        intermediate_values={},
    )
    assert drawn == whole and vars(drawn) == vars(whole)
    assert stored.state == PRUNED and stored.intermediate_values == {1: 0.05, 2: 0.6}
    assert copy.copy(stored) is not stored


def test_an_enqueued_trial_keeps_its_parameters_in_fixed_params():
    """Ctrl-C while a queued retry was asked but not trained queues its parameters again, read from
    Optuna's ``system_attrs["fixed_params"]``."""
    study = optuna.create_study()
    study.enqueue_trial({"x": 0.25}, user_attrs={"retry_of": 7})
    trial = study.ask()
    (asked,) = study.get_trials(deepcopy=False)
    assert asked.number == trial.number and asked.system_attrs["fixed_params"] == {"x": 0.25}
    assert asked.user_attrs["retry_of"] == 7


def test_a_trial_reaches_its_storage_and_id_through_public_attributes(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    study.ask()
    trial = study.ask()
    assert trial.study is study and trial.storage is study._storage
    assert storage_trial_id(trial) == trial._trial_id


@pytest.mark.slow  # waits out a heartbeat's grace period: the full suite runs it
def test_a_stale_trial_is_failed_and_retried_once_with_its_parameters(tmp_path):
    """``retry_once`` and ``retried_trial_number`` over Optuna's heartbeat: a trial whose heartbeat
    stopped is failed and queued once more; the retry says which trial it retries."""
    with heartbeat_warnings_off():
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=1, **retry_once()
        )
        study = optuna.create_study(storage=storage)
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        storage.record_heartbeat(storage_trial_id(trial))
        time.sleep(2.1)  # past the grace period
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
        assert retried_trial_number(trials[1]) == trial.number and retried_trial_number(trials[0]) is None
        assert trials[1].params == trials[0].params


def test_a_shared_study_refuses_a_worker_with_another_epoch_budget(tmp_path):
    """Workers' agreement hashes their settings; the epoch budget is named in the refusal."""
    from lungxray import workers
    from lungxray.errors import StudyError

    url, tune_cfg = f"sqlite:///{tmp_path / 'w.db'}", TuneConfig(heartbeat=1, study_name="w")
    with workers.heartbeat_warnings_off():
        workers.open_shared_study(url, tune_cfg, settings("mlp", epochs=2), "mlp", {"data": "x"})
        with pytest.raises(StudyError, match="trains each trial for --epochs 2, not 3") as info:
            workers.open_shared_study(url, tune_cfg, settings("mlp", epochs=3), "mlp", {"data": "x"})
    assert "--epochs 2" in info.value.hint


def test_the_worker_path_shows_no_warning_of_optunas(tmp_path):
    """A worker opens a shared study (heartbeats and a retry callback, both experimental in Optuna)
    and runs trials by ask and tell, which Optuna warns about where heartbeats are on: none of it
    reaches the user."""
    from lungxray import workers

    data = FitData(toy(4), toy(2, start=50), 3)
    tune_cfg = resolve_tune(TuneConfig(trials=2, heartbeat=1, pruner="none", study_name="w"), get_spec("mlp").recipe)
    trial_cfg = settings("mlp", epochs=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        study = workers.open_shared_study(f"sqlite:///{tmp_path / 'w.db'}", tune_cfg, trial_cfg, "mlp", {"data": "x"})
        assert workers.run_worker(study, "mlp", data, tune_cfg, trial_cfg) == 2
    from_optuna = [
        f"{w.category.__name__}: {w.message}"
        for w in seen
        if issubclass(w.category, (optuna.exceptions.ExperimentalWarning, FutureWarning, DeprecationWarning))
        or "optuna" in w.filename
    ]
    assert from_optuna == []
    # and the filters are gone once the worker is done: Optuna's warnings show again elsewhere
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'other.db'}", heartbeat_interval=1)
    assert any(issubclass(w.category, optuna.exceptions.ExperimentalWarning) for w in after)
