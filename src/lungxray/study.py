"""lungxray's adapters over Optuna: the sampler and pruner that learn from pruned trials, the view of
a study they read, opening a study, telling it a trial's end, summing it up, and the heartbeat and
retry pieces a worker uses.

Optuna's samplers read a study through its private ``Study._get_trials``, which ``StudyView``
overrides; this module also relies on ``enqueue_trial`` keeping its parameters in a trial's
``system_attrs["fixed_params"]``. ``tests/test_study.py`` checks each such piece against
the installed Optuna, and pyproject pins the range it was checked on. Holds no scheduling
(``tune.py``) and no training (``train.py``).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import optuna

from lungxray.config import TuneConfig
from lungxray.errors import StudyError
from lungxray.runfolder import shown_url

if TYPE_CHECKING:
    from lungxray.train import FitResult

COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
FINISHED = (COMPLETE, PRUNED)
BEST_VALUE = "best_value"  # a pruned trial's user attribute: the best figure it reached before it stopped
HISTORY = "drawn_from_below"  # a trial's user attribute: its parameters and pruning saw trials below this number
EPOCHS = "epochs"  # the study's user attribute: the epochs each of its trials may train (--epochs)


@dataclass
class TuneResult:
    study: optuna.Study
    best_params: dict
    best_value: float
    best_trial: int
    n_complete: int
    n_pruned: int
    best_fit: FitResult | None = None  # the best trial's trained model, when this call trained it in full


def make_sampler(name: str, seed: int, startup_trials: int) -> optuna.samplers.BaseSampler:
    if name == "gp":
        sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials)
    elif name == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    return LearnsFromPruned(sampler)


def make_pruner(cfg: TuneConfig, epochs: int) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return MedianOverFinished(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_epochs)
    if cfg.pruner == "hyperband":  # reads pruned trials itself (its rungs)
        return optuna.pruners.HyperbandPruner(min_resource=cfg.warmup_epochs, max_resource=epochs)
    return optuna.pruners.NopPruner()


def as_seen(trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    """A trial as lungxray's sampler and pruner see it: a PRUNED one as COMPLETE, valued at the best
    figure it reached (``BEST_VALUE``); any other trial as it is.

    Pruned trials are stored as PRUNED, so the storage and optuna-dashboard say what happened. But
    Optuna's GPSampler fits only COMPLETE trials and its MedianPruner compares only with them: a
    pruned trial would teach the search nothing, and the GP sampler then proposes the same point
    again (seen here: 7 of 16 trials identical). A trial stopped by the pruner is still a measured,
    if partial, answer: its best validation figure is what the search learns from.
    """
    if trial.state != PRUNED or BEST_VALUE not in trial.user_attrs:
        return trial
    seen = copy.copy(trial)
    seen.state, seen.value = COMPLETE, trial.user_attrs[BEST_VALUE]
    return seen


class StudyView:
    """A study whose trials read through ``as_seen`` (so it holds no PRUNED trial: they read as
    COMPLETE); everything else is the study's own.

    Given ``below`` and ``number`` (the trial being drawn), the view is the history that trial is
    drawn from whatever the clock did: the trials below ``below`` as above, those from ``below`` up
    to ``number`` as RUNNING with their parameters and no figures, finished or not (a queued one
    stays WAITING). See ``tune.history_start``.
    """

    def __init__(self, study, below: int | None = None, number: int | None = None) -> None:
        self._study, self._below, self._number = study, below, number

    def __getattr__(self, name: str):
        if name in ("_study", "_below", "_number"):  # not set yet (a copy being made): no endless lookup
            raise AttributeError(name)
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list:
        asked = None if states is None or self._below is not None else (*states, PRUNED)
        get = getattr(self._study, "_get_trials", None)
        trials = get(deepcopy, asked, use_cache) if get else self._study.get_trials(deepcopy, asked)
        seen = [self._seen(t) for t in trials]
        return [t for t in seen if states is None or t.state in states]

    def _seen(self, trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
        if self._below is None or trial.number < self._below:
            return as_seen(trial)
        if trial.number >= self._number or trial.state == optuna.trial.TrialState.WAITING:
            return trial  # the trial being drawn, or one queued
        running = copy.copy(trial)  # its parameters and attributes, without its figures
        running.state, running.value = optuna.trial.TrialState.RUNNING, None
        running.datetime_complete, running.intermediate_values = None, {}
        return running

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        return self._get_trials(deepcopy, states)

    @property
    def trials(self) -> list:
        return self.get_trials()

    @property
    def best_trial(self) -> optuna.trial.FrozenTrial:
        best = best_trial(self._study)
        if best is None:
            raise ValueError("no trial has finished yet")
        return best

    @property
    def best_value(self) -> float:
        return self.best_trial.value


class LearnsFromPruned(optuna.samplers.BaseSampler):
    """An Optuna sampler that learns from pruned trials too (``as_seen``)."""

    def __init__(self, sampler: optuna.samplers.BaseSampler) -> None:
        self.sampler = sampler

    @staticmethod
    def _history(study, trial) -> StudyView:
        """The study as ``trial`` is drawn from it: the history ``tune.tune`` gave it (``HISTORY``), if any."""
        below = trial.user_attrs.get(HISTORY)
        return StudyView(study, below, trial.number if below is not None else None)

    def infer_relative_search_space(self, study, trial):
        return self.sampler.infer_relative_search_space(self._history(study, trial), trial)

    def sample_relative(self, study, trial, search_space):
        return self.sampler.sample_relative(self._history(study, trial), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.sampler.sample_independent(self._history(study, trial), trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.sampler.before_trial(StudyView(study), trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.sampler.after_trial(StudyView(study), trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


class MedianOverFinished(optuna.pruners.MedianPruner):
    """Optuna's MedianPruner, comparing with pruned trials too (``as_seen``)."""

    def prune(self, study, trial) -> bool:
        return super().prune(study if isinstance(study, FrozenCompleted) else StudyView(study), trial)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The trial with the best figure, pruned ones included (``as_seen``); the lowest number on a tie."""
    trials = StudyView(study).get_trials(deepcopy=False, states=(COMPLETE,))
    if not trials:
        return None
    pick = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
    return pick(trials, key=lambda t: t.value)


def tell(study: optuna.Study, trial: optuna.Trial, state, value: float | None) -> None:
    """Tell the study how a trial of ``tune.run_trial`` ended: a pruned trial's figure is in its
    ``BEST_VALUE`` attribute already (Optuna records a pruned trial's last figure as its value)."""
    study.tell(trial, None if state == PRUNED else value, state=state)


def open_study(cfg: TuneConfig, storage: str, seed: int, direction: str, epochs: int, model_name: str) -> optuna.Study:
    """Create the study, or load it to resume; trials a killed process left RUNNING become FAIL.
    A study made for another model is refused (its search space would not fit), and one made with
    another ``epochs`` budget (``check_epochs``)."""
    study = optuna.create_study(
        storage=storage,
        study_name=cfg.study_name,
        direction=direction,
        load_if_exists=True,
        sampler=make_sampler(cfg.sampler, seed, cfg.startup_trials),
        pruner=make_pruner(cfg, epochs),
    )
    if study.direction != optuna.study.StudyDirection[direction.upper()]:
        raise StudyError(
            f"study {cfg.study_name!r} in {shown_url(storage)} was created to {study.direction.name.lower()}, "
            f"but --objective {'val_loss' if direction == 'minimize' else 'val_accuracy'} needs {direction}",
            hint="use another --study-name or --out, or the --objective the study was made with",
        )
    made_for = study.user_attrs.get("model")
    if made_for is None:
        study.set_user_attr("model", model_name)
    elif made_for != model_name:
        raise StudyError(
            f"study {cfg.study_name!r} in {shown_url(storage)} searches the {made_for} model, not {model_name}",
            hint="use another --study-name or --out for another --model",
        )
    check_epochs(study, cfg.study_name, shown_url(storage), epochs)
    # A resumed or extended study must not replay the seeded sampler's first proposals (they would
    # repeat the finished trials): its seed moves on by the number of trials already there. A fresh
    # study keeps ``seed`` itself, so the same command gives the same trials.
    if study.trials:
        study.sampler = make_sampler(cfg.sampler, seed + len(study.trials), cfg.startup_trials)
    # One lungxray process works on a study at a time, so a RUNNING trial here was interrupted:
    # it is marked FAIL and its parameters are queued, so the next trial retries them.
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        if trial.params and "retry_of" not in trial.user_attrs:  # once: a trial that kills the process twice is left
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    return study


def check_epochs(study: optuna.Study, study_name: str, where: str, epochs: int) -> None:
    """Record the study's epoch budget per trial (``EPOCHS``), or refuse another: trials trained
    for other budgets would be ranked together."""
    made_with = study.user_attrs.get(EPOCHS)
    if made_with is None:
        study.set_user_attr(EPOCHS, epochs)
    elif made_with != epochs:
        raise StudyError(
            f"study {study_name!r} in {where} trains each trial for --epochs {made_with}, not {epochs}: "
            "trials of different budgets cannot be ranked together",
            hint=f"resume it with --epochs {made_with}, or use another --study-name or --out for --epochs {epochs}",
        )


class FrozenCompleted:
    """The part of a study a percentile pruner reads, frozen when a trial starts: the finished
    trials of its history (numbered below ``below``, see ``tune.history_start``).

    The same whatever the other trials do meanwhile, so the pruner decides the same on every run.
    Reading them once per trial instead of at every epoch also spares a SQLite round trip of 8-15 ms
    per epoch (measured), most of a trial's bookkeeping, and keeps it off the GIL.
    """

    def __init__(self, study: optuna.Study, below: int) -> None:
        self.direction = study.direction
        trials = StudyView(study).get_trials(deepcopy=True, states=(COMPLETE,))
        self._trials = [t for t in trials if t.number < below]

    def get_trials(self, deepcopy: bool = True, states=None) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self._trials if states is None or t.state in states]


FREEZABLE = (optuna.pruners.PercentilePruner, optuna.pruners.NopPruner)  # read only finished trials


def should_prune(trial: optuna.Trial, values: dict[int, float], frozen: FrozenCompleted | None) -> bool:
    if frozen is None:  # a pruner that needs the live study (hyperband)
        return trial.should_prune()
    running = optuna.trial.FrozenTrial(
        number=trial.number,
        trial_id=-1,
        state=optuna.trial.TrialState.RUNNING,
        value=None,
        datetime_start=None,
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs={},
        system_attrs={},
        intermediate_values=values,
    )
    return trial.study.pruner.prune(frozen, running)


def summarise(study: optuna.Study) -> TuneResult:
    """The study's best trial (pruned ones included, ``as_seen``) and its counts of finished trials."""
    best = best_trial(study)
    if best is None:
        raise StudyError("no trial completed (all failed)", hint="lower the learning rates or check the data")
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    # a study made by a lungxray that stored pruned trials as COMPLETE marks them by pruned_at_epoch
    pruned = sum(t.state == PRUNED or bool(t.user_attrs.get("pruned_at_epoch")) for t in finished)
    return TuneResult(study, dict(best.params), float(best.value), best.number, len(finished) - pruned, pruned)


# Optuna marks its heartbeat API experimental, and warns that a heartbeat is meant for
# Study.optimize; workers use both on purpose (they beat the heartbeat themselves, see
# workers._heartbeat), so those warnings, and only those, are not shown to the user.
_HEARTBEAT_WARNINGS = (
    (optuna.exceptions.ExperimentalWarning, r"Argument ``heartbeat_interval`` is an experimental feature"),
    (optuna.exceptions.ExperimentalWarning, r"(\S+\.)?Retry\w*TrialCallback is experimental"),
    (optuna.exceptions.ExperimentalWarning, r"(\S+\.)?fail_stale_trials is experimental"),
    (optuna.exceptions.ExperimentalWarning, r"(\S+\.)?retried_trial_number is experimental"),
    (UserWarning, r"Heartbeat of storage is supposed to be used with Study\.optimize"),
)


@contextlib.contextmanager
def heartbeat_warnings_off() -> Iterator[None]:
    """Within: Optuna's warnings about the heartbeat and retry API (``_HEARTBEAT_WARNINGS``) are not shown."""
    with warnings.catch_warnings():
        for category, message in _HEARTBEAT_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def _retry_class():
    """Optuna's callback that queues a heartbeat-stale trial again (renamed in Optuna 4.9)."""
    renamed = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    return renamed or optuna.storages.RetryFailedTrialCallback


def retry_once() -> dict:
    """``RDBStorage`` keyword arguments that queue a heartbeat-stale trial once more, with the same
    parameters (``heartbeat_stale_trial_callback``; ``failed_trial_callback`` before Optuna 4.9)."""
    retry = _retry_class()(max_retry=1)
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        return {"heartbeat_stale_trial_callback": retry}
    return {"failed_trial_callback": retry}


def retried_trial_number(trial: optuna.trial.FrozenTrial) -> int | None:
    """The trial that ``trial`` retries, when a stale trial's callback queued it (``retry_once``)."""
    return _retry_class().retried_trial_number(trial)


def queue_retry(study: optuna.Study, failed: optuna.trial.FrozenTrial) -> bool:
    """Queue the ``failed`` trial once more with its parameters, as a heartbeat-stale one is
    (``retry_once``: marked for ``retried_trial_number``); False when it was a retry already."""
    _retry_class()(max_retry=1)(study, failed)
    return retried_trial_number(failed) is None  # max_retry=1: a retry is not queued again


def storage_trial_id(trial: optuna.Trial) -> int:
    """``trial``'s id in its storage, asked of the storage through its public API."""
    storage = trial.storage
    study_id = storage.get_study_id_from_name(trial.study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
