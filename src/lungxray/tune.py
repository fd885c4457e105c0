"""Hyperparameter search with Optuna: the objective calls ``train.fit`` on train/val only.

The study lives in an Optuna storage (a SQLite file in the run folder by default), so a second
call with the same storage and study name resumes it, and a process killed mid-study loses no
finished trial. The test split never reaches this module.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, CancelledError, Executor, Future, wait
from dataclasses import dataclass

import optuna
import torch

from lungxray.config import TrainConfig, TuneConfig, resolve_train
from lungxray.errors import StudyError
from lungxray.models import get_spec
from lungxray.train import EpochStats, FitResult, fit

COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
FINISHED = (COMPLETE, PRUNED)
BEST_VALUE = "best_value"  # a pruned trial's user attribute: the best figure it reached before it stopped
HISTORY = "drawn_from_below"  # a trial's user attribute: its parameters and pruning saw trials below this number


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
    stays WAITING). See ``history_start``.
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
        return optuna.trial.FrozenTrial(
            number=trial.number,
            trial_id=trial._trial_id,
            state=optuna.trial.TrialState.RUNNING,
            value=None,
            datetime_start=trial.datetime_start,
            datetime_complete=None,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=trial.user_attrs,
            system_attrs=trial.system_attrs,
            intermediate_values={},
        )

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
        """The study as ``trial`` is drawn from it: the history ``tune`` gave it (``HISTORY``), if any."""
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
        return super().prune(study if isinstance(study, _FrozenCompleted) else StudyView(study), trial)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The trial with the best figure, pruned ones included (``as_seen``); the lowest number on a tie."""
    trials = StudyView(study).get_trials(deepcopy=False, states=(COMPLETE,))
    if not trials:
        return None
    pick = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
    return pick(trials, key=lambda t: t.value)


def tell(study: optuna.Study, trial: optuna.Trial, state, value: float | None) -> None:
    """Tell the study how a trial of ``_run_trial`` ended: a pruned trial's figure is in its
    ``BEST_VALUE`` attribute already (Optuna records a pruned trial's last figure as its value)."""
    study.tell(trial, None if state == PRUNED else value, state=state)


def open_study(cfg: TuneConfig, storage: str, seed: int, direction: str, epochs: int, model_name: str) -> optuna.Study:
    """Create the study, or load it to resume; trials a killed process left RUNNING become FAIL.
    A study made for another model is refused (its search space would not fit)."""
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
            f"study {cfg.study_name!r} in {storage} was created to {study.direction.name.lower()}, "
            f"but --objective {'val_loss' if direction == 'minimize' else 'val_accuracy'} needs {direction}",
            hint="use another --study-name or --out, or the --objective the study was made with",
        )
    made_for = study.user_attrs.get("model")
    if made_for is None:
        study.set_user_attr("model", model_name)
    elif made_for != model_name:
        raise StudyError(
            f"study {cfg.study_name!r} in {storage} searches the {made_for} model, not {model_name}",
            hint="use another --study-name or --out for another --model",
        )
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


class _FrozenCompleted:
    """The part of a study a percentile pruner reads, frozen when a trial starts: the finished
    trials of its history (numbered below ``below``, see ``history_start``).

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


_FREEZABLE = (optuna.pruners.PercentilePruner, optuna.pruners.NopPruner)  # read only finished trials


def _should_prune(trial: optuna.Trial, values: dict[int, float], frozen: _FrozenCompleted | None) -> bool:
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


def _run_trial(
    trial: optuna.Trial,
    hp: dict,
    model_name: str,
    train,
    val,
    n_classes: int,
    train_cfg: TrainConfig,
    on_epoch: Callable[[int, int | None], None] = lambda number, epoch: None,
    frozen: _FrozenCompleted | None = None,
    stop: threading.Event | None = None,
    writer: Executor | None = None,
) -> tuple[optuna.trial.TrialState, float | None, FitResult | None]:
    """Train one trial, reporting every epoch; returns its state, its figure (the best epoch's) and
    its fit. A trial the pruner stops is PRUNED, with its figure in ``BEST_VALUE`` (see ``as_seen``)
    and the epoch it stopped after in ``pruned_at_epoch``.

    With a ``frozen`` pruner, which decides from this trial's own figures, each epoch's figure is
    written to the study by ``writer`` (one thread) while training goes on, and every write has
    landed before this returns: a write into the SQLite study waits for its disk sync (2-5 ms a
    time, ~500 an MLP search), which the epoch then no longer waits for.
    """
    select_by = train_cfg.select_by
    values: dict[int, float] = {}
    writes: list[Future] = []

    def report(stats: EpochStats) -> bool:
        if stop is not None and stop.is_set():
            raise _Interrupted  # Ctrl-C: leave the fit at this epoch's end
        values[stats.epoch] = getattr(stats, select_by)
        if writer is not None and frozen is not None:
            writes.append(writer.submit(trial.report, values[stats.epoch], stats.epoch))
        else:
            trial.report(values[stats.epoch], stats.epoch)
        on_epoch(trial.number, stats.epoch)
        return _should_prune(trial, values, frozen)

    try:
        cfg = resolve_train(train_cfg, get_spec(model_name).recipe, hp)  # the trial's own batch size
        result = fit(model_name, hp, train, val, n_classes, cfg, on_epoch=report)
    except FloatingPointError as exc:
        _landed(writes)
        on_epoch(trial.number, None)
        trial.set_user_attr("error", str(exc))
        return optuna.trial.TrialState.FAIL, None, None
    finally:
        wait(writes)  # none outlives its trial, whatever the fit raised (its own error goes on)
    _landed(writes)
    on_epoch(trial.number, None)  # finished: off the progress bar
    for key, value in (
        ("best_epoch", result.best_epoch),
        ("val_accuracy", result.best.val_accuracy),
        ("val_loss", result.best.val_loss),
        ("diverged", result.diverged),
        ("pruned_at_epoch", result.stopped_at),
        ("epochs_run", len(result.history)),
    ):
        trial.set_user_attr(key, value)
    figure = float(getattr(result.best, select_by))
    if result.stopped_at is not None:
        trial.set_user_attr(BEST_VALUE, figure)
        return PRUNED, figure, result
    return COMPLETE, figure, result


def _landed(writes: list[Future]) -> None:
    """Wait for every epoch's figure to be in the study (before the trial is told); a failed write
    is raised."""
    for write in writes:
        write.result()


def tune(
    model_name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    n_classes: int,
    cfg: TuneConfig,
    train_cfg: TrainConfig,
    storage: str,
    progress: bool = True,
) -> TuneResult:
    """Run trials until the study holds ``cfg.trials`` finished trials.

    ``cfg`` and ``train_cfg`` come resolved (``config.resolve_tune``, ``config.trial_settings`` and
    ``config.resolve_train``); each trial resolves its own batch size from its hyperparameters.
    Trials run ``cfg.jobs`` at a time, in threads (torch releases the GIL), with the torch threads
    shared out: small-batch MLP steps are memory- and dispatch-bound, and two MLP trials side by
    side beat one trial on two threads; a CNN uses every core itself. Trials are asked and drawn
    in number order, each from a history fixed by its number (``history_start``), and start as
    a worker frees, so the sampler and the pruner see the same history on every run with the same
    seed. (Not with ``--pruner hyperband`` and more than one job: that pruner reads the live study
    from the trials' threads, so where it stops a trial, and so what the sampler learns, depends on
    timing.)
    """
    from concurrent.futures import ThreadPoolExecutor

    from lungxray.progress import bar as progress_bar

    if not cfg.jobs or not train_cfg.resolved:
        raise ValueError("tune() needs resolved configs: config.resolve_tune and config.resolve_train")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar says it instead
    direction = "minimize" if train_cfg.select_by == "val_loss" else "maximize"
    study = open_study(cfg, storage, train_cfg.seed, direction, train_cfg.epochs, model_name)
    space, jobs = get_spec(model_name).space, cfg.jobs
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    bar = progress_bar(
        total=cfg.trials, initial=min(done, cfg.trials), desc="trials", unit="trial", disable=not progress
    )
    running: dict[int, int] = {}  # trial number -> epochs done, shown on the bar
    best = best_trial(study)
    best_text = [f"best {train_cfg.select_by} {best.value:.4f}" if best else ""]
    lock = threading.Lock()

    def show(number: int, epoch: int | None) -> None:
        with lock:
            if epoch is None:
                running.pop(number, None)
            else:
                running[number] = epoch
            epochs = " ".join(f"#{n}:{e}/{train_cfg.epochs}" for n, e in sorted(running.items()))
            bar.set_postfix_str(", ".join(part for part in (best_text[0], epochs and f"epochs {epochs}") if part))

    best_fit = None
    stop = threading.Event()  # set on Ctrl-C: running trials end at their next epoch
    training: dict[Future, optuna.Trial] = {}  # in the workers' hands
    waiting = None  # (trial, its history's end, seconds asking it): asked, its history still running
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads_before // jobs))
    try:
        with (  # the report thread closes after the trials' pool
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="lungxray-report") as writer,
            ThreadPoolExecutor(max_workers=jobs) as pool,
        ):
            try:
                while done < cfg.trials:
                    while len(training) < jobs and done + len(training) < cfg.trials:  # a worker is free
                        if waiting is None:
                            started = time.perf_counter()
                            trial = study.ask()
                            waiting = (trial, history_start(trial.number, cfg), time.perf_counter() - started)
                        trial, below, ask_s = waiting
                        if any(other.number < below for other in training.values()):
                            break  # its history has not ended: the worker waits with it
                        started = time.perf_counter()
                        trial.set_user_attr(HISTORY, below)
                        hp = space(trial)  # the sampler fits its model at the first suggestion
                        trial.set_user_attr("sampler_s", round(ask_s + time.perf_counter() - started, 3))
                        frozen = _FrozenCompleted(study, below) if isinstance(study.pruner, _FREEZABLE) else None
                        future = pool.submit(_run_trial, trial, hp, model_name, train, val, n_classes, train_cfg, show,
                                             frozen, stop, writer)  # fmt: skip
                        training[future], waiting = trial, None
                    ended, _ = wait(training, return_when=FIRST_COMPLETED)
                    for future in sorted(ended, key=lambda f: training[f].number):
                        trial = training.pop(future)
                        state, value, result = future.result()
                        tell(study, trial, state, value)
                        if result is not None:
                            best = best_trial(study)
                            best_text[0] = f"best {train_cfg.select_by} {best.value:.4f}"
                            show(trial.number, None)
                            if result.stopped_at is None and best.number == trial.number:
                                best_fit = (trial.number, result)
                        done += state != optuna.trial.TrialState.FAIL
                        _say_trial(trial.number, state, value, result, best, train_cfg.select_by, progress)
                        bar.update(state != optuna.trial.TrialState.FAIL)
            except KeyboardInterrupt:
                _stop_and_requeue(study, training, stop)
                if waiting is not None:  # asked, not yet training: failed; a retry's parameters queued again
                    (asked,) = [t for t in study.get_trials(deepcopy=False) if t.number == waiting[0].number]
                    study.tell(waiting[0], state=optuna.trial.TrialState.FAIL)
                    if "retry_of" in asked.user_attrs:
                        retry = {"retry_of": asked.user_attrs["retry_of"]}
                        study.enqueue_trial(asked.system_attrs["fixed_params"], user_attrs=retry)
                raise
            except BaseException:
                stop.set()  # the other trials end at their next epoch instead of training on
                for future in training:
                    future.cancel()  # and one handed to a worker not yet free does not start
                raise
    finally:
        torch.set_num_threads(threads_before)
        bar.close()
    summary = _summarise(study)
    if best_fit is not None and best_fit[0] == summary.best_trial:  # not an earlier best's
        summary.best_fit = best_fit[1]
    return summary


def history_start(number: int, cfg: TuneConfig) -> int:
    """Trial ``number`` is drawn, and pruned, from the trials numbered below this: its history.

    Fixed by the trial's number, never by which trials happen to have ended, so the search is the
    same on every run with the same seed. With ``jobs`` trials side by side, a trial sees all but
    the ``jobs - 1`` trials just before it, which its sampler reads as still running (GPSampler
    then draws away from their parameters). A trial starts as soon as a worker is free and its
    history has ended; with two jobs that is at once, unless the younger of the two running trials
    ended first.

    The startup trials (random, never pruned) see none, so they start as workers free; the first
    trial after them sees all of them (the GP sampler and the median pruner start once they see
    ``startup_trials`` finished; a failed one among them leaves the next trial random too). With
    one job, every trial sees every trial before it.
    """
    if number < cfg.startup_trials:
        return 0
    return max(number - (cfg.jobs - 1), cfg.startup_trials)


def _say_trial(number: int, state, value, result, best, select_by: str, progress: bool) -> None:
    """One log line for a finished trial: its figure, where it stopped, ``best``, the best trial so far."""
    from lungxray.progress import note

    if result is None:
        note(f"trial {number}: failed ({state.name.lower()})", enabled=progress)
        return
    ended = (
        f"pruned at epoch {result.stopped_at}"
        if result.stopped_at is not None
        else f"best epoch {result.best_epoch} of {len(result.history)}"
    )
    other = (
        f"val_accuracy {result.best.val_accuracy:.4f}"
        if select_by == "val_loss"
        else f"val_loss {result.best.val_loss:.4f}"
    )
    so_far = f"; best so far {best.value:.4f} (trial {best.number})" if best else ""
    note(f"trial {number}: {select_by} {value:.4f}, {other}, {ended}{so_far}", progress)


class _Interrupted(Exception):
    """Raised inside a trial's fit when the user pressed Ctrl-C."""


def _stop_and_requeue(study: optuna.Study, training: dict[Future, optuna.Trial], stop: threading.Event) -> None:
    """Ctrl-C: stop the running trials at their next epoch, mark them FAIL, and queue their
    parameters so the resumed study retries them (before: it waited for them, then threw them away)."""
    stop.set()
    for future in training:
        future.cancel()  # handed to a worker not yet free: retried on resume as well
    for future, trial in training.items():
        try:
            state, value, _ = future.result()  # it finished just before the stop: keep it
            tell(study, trial, state, value)
        except (_Interrupted, CancelledError):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def _summarise(study: optuna.Study) -> TuneResult:
    best = best_trial(study)
    if best is None:
        raise StudyError("no trial completed (all failed)", hint="lower the learning rates or check the data")
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    # a study resumed from before pruned trials were stored so holds them as COMPLETE
    pruned = sum(t.state == PRUNED or bool(t.user_attrs.get("pruned_at_epoch")) for t in finished)
    return TuneResult(study, dict(best.params), float(best.value), best.number, len(finished) - pruned, pruned)
