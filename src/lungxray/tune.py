"""Hyperparameter search in one process: ``tune`` schedules trials that call ``train.fit`` on
train/val only.

The study lives in an Optuna storage (a SQLite file in the run folder by default), so a second
call with the same storage and study name resumes it, and a process killed mid-study loses no
finished trial. Trials run in threads, each drawn and pruned from a history fixed by its number
(``history_start``); Ctrl-C stops them at their next epoch and queues them again. Optuna's sampler,
pruner and study adapters are in ``study.py``; trials from several processes in ``workers.py``.
The test split never reaches this module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, CancelledError, Executor, Future, wait
from dataclasses import dataclass

import optuna
import torch

from lungxray.config import TrainConfig, TuneConfig
from lungxray.models import create_model, get_spec
from lungxray.study import (
    BEST_VALUE,
    COMPLETE,
    FINISHED,
    FREEZABLE,
    HISTORY,
    PRUNED,
    FrozenCompleted,
    TuneResult,
    best_trial,
    open_study,
    should_prune,
    summarise,
    tell,
)
from lungxray.train import EpochStats, FitData, FitResult, fit

STARTED = "started_s"  # a trial's user attribute: seconds into its search when a worker took it


def _no_progress(number: int, epoch: int | None) -> None:
    pass


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one search trains on and with, and where its epochs go."""

    model_name: str
    data: FitData
    train_cfg: TrainConfig  # resolved; each trial takes its own batch size from its parameters
    on_epoch: Callable[[int, int | None], None] = _no_progress  # (trial number, epoch; None: ended)
    stop: threading.Event | None = None  # set on Ctrl-C: the fit ends at its next epoch
    writer: Executor | None = None  # writes each epoch's figure to the study (with a frozen pruner)


def run_trial(
    trial: optuna.Trial, hp: dict, setup: TrialSetup, frozen: FrozenCompleted | None = None
) -> tuple[optuna.trial.TrialState, float | None, FitResult | None]:
    """Train one trial, reporting every epoch; returns its state, its figure (the best epoch's) and
    its fit. A trial the pruner stops is PRUNED, with its figure in ``BEST_VALUE`` (see ``as_seen``)
    and the epoch it stopped after in ``pruned_at_epoch``.

    With a ``frozen`` pruner, which decides from this trial's own figures, each epoch's figure is
    written to the study by ``setup.writer`` (one thread) while training goes on, and every write has
    landed before this returns: a write into the SQLite study waits for its disk sync (2-5 ms a
    time, ~500 an MLP search), which the epoch thus does not wait for.
    """
    select_by, on_epoch, stop, writer = setup.train_cfg.select_by, setup.on_epoch, setup.stop, setup.writer
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
        return should_prune(trial, values, frozen)

    try:
        cfg = setup.train_cfg.for_params(hp)  # the trial's own batch size
        result = fit(setup.model_name, hp, setup.data, cfg, on_epoch=report)
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
    model_name: str, data: FitData, cfg: TuneConfig, train_cfg: TrainConfig, storage: str, progress: bool = True
) -> TuneResult:
    """Run trials until the study holds ``cfg.trials`` finished trials.

    ``cfg`` and ``train_cfg`` come resolved (a ``job.Job``'s ``search`` and ``trial``); each trial
    takes its own batch size from its hyperparameters
    (``TrainConfig.for_params``).
    Trials run ``cfg.jobs`` at a time, in threads (torch releases the GIL), with the torch threads
    shared out: small-batch steps of the MLP and the small CNN are memory- and dispatch-bound, and
    two trials side by side beat one trial on two threads; a large CNN uses every core itself.
    Trials are asked and drawn in number order, each from a history fixed by its number
    (``history_start``), and start as a worker frees, so the sampler and the pruner see the same
    history on every run with the same seed. (Not with ``--pruner hyperband`` and more than one
    job, as mlp and cnn run: that pruner reads the live study from the trials' threads, so where it
    stops a trial, and so what the sampler learns, depends on timing.)
    """
    from concurrent.futures import ThreadPoolExecutor

    if not cfg.jobs or not train_cfg.resolved:
        raise ValueError("tune() needs resolved settings: a Job's search and trial")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar says it instead
    direction = "minimize" if train_cfg.select_by == "val_loss" else "maximize"
    study = open_study(cfg, storage, train_cfg.seed, direction, train_cfg.epochs, model_name)
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    shown = _TrialsBar(cfg, train_cfg, done, best_trial(study), progress)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads_before // cfg.jobs))
    try:
        with (  # the report thread closes after the trials' pool
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="lungxray-report") as writer,
            ThreadPoolExecutor(max_workers=cfg.jobs) as pool,
        ):
            setup = TrialSetup(model_name, data, train_cfg, shown.show, threading.Event(), writer)
            best_fit = _Schedule(study, cfg, setup, pool, shown).run(done)
    finally:
        torch.set_num_threads(threads_before)
        shown.bar.close()
    summary = summarise(study)
    if best_fit is not None and best_fit[0] == summary.best_trial:  # not an earlier best's
        summary.best_fit = best_fit[1]
    return summary


class _TrialsBar:
    """The search's progress bar: finished trials, the best figure so far, each running trial's epoch."""

    def __init__(self, cfg: TuneConfig, train_cfg: TrainConfig, done: int, best, progress: bool) -> None:
        from lungxray.progress import bar as progress_bar

        self.bar = progress_bar(
            total=cfg.trials, initial=min(done, cfg.trials), desc="trials", unit="trial", disable=not progress
        )
        self.select_by, self.epochs, self.progress = train_cfg.select_by, train_cfg.epochs, progress
        self.running: dict[int, int] = {}  # trial number -> epochs done
        self.best_text = f"best {self.select_by} {best.value:.4f}" if best else ""
        self.lock = threading.Lock()

    def show(self, number: int, epoch: int | None) -> None:
        """Trial ``number`` finished ``epoch`` (None: the trial ended)."""
        with self.lock:
            if epoch is None:
                self.running.pop(number, None)
            else:
                self.running[number] = epoch
            epochs = " ".join(f"#{n}:{e}/{self.epochs}" for n, e in sorted(self.running.items()))
            self.bar.set_postfix_str(
                ", ".join(part for part in (self.best_text, epochs and f"epochs {epochs}") if part)
            )


class _Schedule:
    """One search's trials in the workers' hands: each asked and drawn in number order from its
    history (``history_start``), started as soon as a worker is free and that history has ended,
    and told as it ends. A new search's startup trials are asked and drawn together, still in
    number order (the same draws), and started largest first (``_startup``)."""

    def __init__(self, study: optuna.Study, cfg: TuneConfig, setup: TrialSetup, pool: Executor, shown) -> None:
        self.study, self.cfg, self.setup, self.pool, self.shown = study, cfg, setup, pool, shown
        self.space = get_spec(setup.model_name).space
        self.training: dict[Future, optuna.Trial] = {}  # in the workers' hands
        self.waiting = None  # (trial, its history's end, seconds asking it): asked, its history still running
        self.ready: list[tuple[optuna.Trial, dict]] = []  # startup trials drawn, in the order they start
        self.drew_startup = False  # once: trials that all fail early leave done at 0 with some still queued
        self.best_fit: tuple[int, FitResult] | None = None  # the best trial's fit, when it ran here
        self.began = time.perf_counter()

    def run(self, done: int) -> tuple[int, FitResult] | None:
        """Trials until the study holds ``cfg.trials`` finished; returns (number, fit) of the best
        trial that ran to its end here, if any. Ctrl-C fails the running trials and queues them again."""
        try:
            while done < self.cfg.trials:
                self._start(done)
                ended, _ = wait(self.training, return_when=FIRST_COMPLETED)
                done += self._tell(ended)
        except KeyboardInterrupt:
            _stop_and_requeue(self.study, self.training, self.setup.stop)
            for trial, _ in self.ready:  # drawn with the running ones, not yet started
                _requeue(self.study, trial)
            if self.waiting is not None:
                _fail_asked(self.study, self.waiting[0])
            raise
        except BaseException:
            self.setup.stop.set()  # the other trials end at their next epoch instead of training on
            for future in self.training:
                future.cancel()  # and one handed to a worker not yet free does not start
            raise
        return self.best_fit

    def _start(self, done: int) -> None:
        """Hand trials to the free workers while their histories have ended."""
        if not self.drew_startup and done == 0 and self.cfg.jobs > 1:  # the first call of a new search
            self._startup()
        while len(self.training) < self.cfg.jobs and done + len(self.training) < self.cfg.trials:
            if self.ready:
                self._submit(*self.ready.pop(0), 0)
                continue
            if self.waiting is None:
                started = time.perf_counter()
                trial = self.study.ask()
                self.waiting = (trial, history_start(trial.number, self.cfg), time.perf_counter() - started)
            trial, below, ask_s = self.waiting
            if any(other.number < below for other in self.training.values()):
                return  # its history has not ended: the worker waits with it
            self._submit(trial, self._draw(trial, below, ask_s), below)
            self.waiting = None

    def _draw(self, trial: optuna.Trial, below: int, ask_s: float) -> dict:
        """``trial``'s parameters, drawn from the trials below ``below``."""
        started = time.perf_counter()
        trial.set_user_attr(HISTORY, below)
        hp = self.space(trial)  # the sampler fits its model at the first suggestion
        trial.set_user_attr("sampler_s", round(ask_s + time.perf_counter() - started, 3))
        return hp

    def _submit(self, trial: optuna.Trial, hp: dict, below: int) -> None:
        trial.set_user_attr(STARTED, round(time.perf_counter() - self.began, 6))  # asked maybe long before
        frozen = FrozenCompleted(self.study, below) if isinstance(self.study.pruner, FREEZABLE) else None
        self.training[self.pool.submit(run_trial, trial, hp, self.setup, frozen)] = trial

    def _startup(self) -> None:
        """A new search's startup trials, asked and drawn in number order (from no history: the same
        draws as one at a time) and queued largest network first, by parameter count (its step's cost,
        roughly). The first trial after them waits for all of them: started in number order, the
        last two often ended far apart, one core idle between; largest first, they end closer together."""
        self.drew_startup = True
        drawn: list[tuple[optuna.Trial, dict]] = []
        while len(drawn) < min(self.cfg.startup_trials, self.cfg.trials):
            started = time.perf_counter()
            trial = self.study.ask()
            if trial.number >= self.cfg.startup_trials:  # a resumed study's: drawn from a history
                self.waiting = (trial, history_start(trial.number, self.cfg), time.perf_counter() - started)
                break
            drawn.append((trial, self._draw(trial, 0, time.perf_counter() - started)))
        data = self.setup.data
        with torch.device("meta"):  # no memory, no draws from torch's generator
            size = [
                sum(p.numel() for p in create_model(self.setup.model_name, data.train[0].shape[1:], data.n_classes,
                                                    **hp).parameters())
                for _, hp in drawn
            ]  # fmt: skip
        self.ready = [drawn[i] for i in sorted(range(len(drawn)), key=lambda i: -size[i])]

    def _tell(self, ended) -> int:
        """Tell the study the ``ended`` trials, in number order; returns how many finished."""
        finished = 0
        for future in sorted(ended, key=lambda f: self.training[f].number):
            trial = self.training.pop(future)
            state, value, result = future.result()
            tell(self.study, trial, state, value)
            best = None  # a failed trial's line names no best
            if result is not None:
                best = best_trial(self.study)
                self.shown.best_text = f"best {self.shown.select_by} {best.value:.4f}"
                self.shown.show(trial.number, None)
                if result.stopped_at is None and best.number == trial.number:
                    self.best_fit = (trial.number, result)
            finished += state != optuna.trial.TrialState.FAIL
            _say_trial(trial.number, state, value, result, best, self.shown.select_by, self.shown.progress)
            self.shown.bar.update(state != optuna.trial.TrialState.FAIL)
        return finished


def history_start(number: int, cfg: TuneConfig) -> int:
    """Trial ``number`` is drawn, and pruned, from the trials numbered below this: its history.

    Fixed by the trial's number, never by which trials happen to have ended, so the search is the
    same on every run with the same seed. With ``jobs`` trials side by side, a trial sees all but
    the ``jobs - 1`` trials just before it, which its sampler reads as still running (GPSampler
    then draws away from their parameters). A trial starts as soon as a worker is free and its
    history has ended; with two jobs that is at once, unless the younger of the two running trials
    ended first.

    The startup trials (random, never pruned) see none, so they start as workers free (a new
    search's largest first, ``_Schedule._startup``); the first trial after them sees all of them
    (the GP sampler and the median pruner start once they see ``startup_trials`` finished; a failed
    one among them leaves the next trial random too). With one job, every trial sees every trial
    before it.
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
    parameters so the resumed study retries them."""
    stop.set()
    for future in training:
        future.cancel()  # handed to a worker not yet free: retried on resume as well
    for future, trial in training.items():
        try:
            state, value, _ = future.result()  # it finished just before the stop: keep it
            tell(study, trial, state, value)
        except (_Interrupted, CancelledError):
            _requeue(study, trial)


def _requeue(study: optuna.Study, trial: optuna.Trial) -> None:
    """Ctrl-C: ``trial``, running or drawn and not yet started, is failed and its parameters queued
    so the resumed study retries them first."""
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def _fail_asked(study: optuna.Study, trial: optuna.Trial) -> None:
    """Ctrl-C while ``trial`` was asked but not yet training: it is failed, and when it was a retry
    (its parameters fixed by ``enqueue_trial``), those parameters are queued again."""
    (asked,) = [t for t in study.get_trials(deepcopy=False) if t.number == trial.number]
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    if "retry_of" in asked.user_attrs:
        retry = {"retry_of": asked.user_attrs["retry_of"]}
        study.enqueue_trial(asked.system_attrs["fixed_params"], user_attrs=retry)
