"""Trials from several processes or machines on one shared Optuna study.

``lungxray worker`` (and ``tune --parallel N``, which starts N of them) joins a study in a
relational storage: PostgreSQL for workers on several machines, the run folder's SQLite file for
processes of one machine. Each worker scans and splits the data itself; ``agreement`` is what all
of them must share (the data's content hashes and labels, the excluded files and groups, the
split, the search space and trial settings, the preprocessing, lungxray's version): the first
worker records it in the study, and a worker whose own differs is refused, told what differs.

Workers run trials until the study holds ``--trials`` finished ones, counted across workers.
Each running trial beats a heartbeat into the storage; a trial whose worker died (killed, out of
memory, its machine gone) stops beating, and the next worker to look fails it and queues it once
more with the same parameters (Optuna's ``fail_stale_trials`` and ``RetryFailedTrialCallback``),
so a crash costs one trial, never the study. Unlike ``tune.tune`` in one process, the order of the
trials depends on timing: a search over workers is not repeatable trial for trial. Optuna's warnings
about the heartbeat API, which workers use on purpose, are not shown (``study.heartbeat_warnings_off``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace

import optuna

from lungxray.config import DataConfig, Preprocessing, TrainConfig, TuneConfig
from lungxray.data import Dataset
from lungxray.errors import StudyError
from lungxray.models import get_spec
from lungxray.runfolder import shown_url
from lungxray.splits import Split
from lungxray.study import (
    FINISHED,
    check_epochs,
    heartbeat_warnings_off,
    make_pruner,
    make_sampler,
    queue_retry,
    retried_trial_number,
    retry_once,
    storage_trial_id,
    tell,
)
from lungxray.train import FitData
from lungxray.tune import TrialSetup, run_trial
from lungxray.version import __version__

AGREEMENT = "lungxray_agreement"  # the study's user attribute holding what workers must share


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _preprocessing_record(prep: Preprocessing) -> list:
    """The preprocessing as studies record it in their agreement (so a study started by an earlier
    lungxray with the same preprocessing is still joined): the size, then the decoder's options
    under the names decoding once took."""
    return [prep.img_size, {"equalize_method": prep.equalize, "crop": prep.crop_borders, "dicom_keep": prep.dicom_keep}]


def agreement(ds: Dataset, split: Split, model_name: str, data_cfg: DataConfig, trial_cfg: TrainConfig) -> dict:
    """What every worker on one study must share, each part as a short hash (``version`` as is)."""
    sha = [s.sha256 for s in ds.samples]
    settings = {k: v for k, v in asdict(trial_cfg).items() if k not in ("threads", "device")}
    labels = [s.label for s in ds.samples]
    if ds.task == "multilabel":  # the label names the positives only: --uncertain and blank cells change the rest
        labels = [json.dumps([ds.classes, [None if v != v else v for v in s.targets]]) for s in ds.samples]  # NaN: None
    return {
        "data": _digest(sorted(zip(sha, labels, strict=True))),
        "excluded_and_groups": _digest([len(ds.excluded), ds.group_sizes()["n"], sorted(ds.groups.tolist())]),
        "split": _digest(
            {
                part: sorted(sha[i] for i in idx)
                for part, idx in (("train", split.train), ("val", split.val), ("test", split.test))
            }
        ),  # fmt: skip
        "search_space": _digest([model_name, settings]),
        "preprocessing": _digest(_preprocessing_record(data_cfg.preprocessing)),
        "version": __version__,
    }


def check_storage(url: str) -> None:
    """StudyError in one line when the storage cannot be reached (before anything is scanned)."""
    import sqlalchemy

    shown = shown_url(url)
    if url.split("/", 3)[2:3] and url.split("/", 3)[2].count("@") > 1:  # the driver's error would quote a piece
        raise StudyError(f"--storage {shown!r}: its user part holds more than one '@'",
                         hint="write an '@' inside the password as %40")  # fmt: skip
    try:
        sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise StudyError(f"--storage {shown!r} is not a database URL",
                         hint="e.g. postgresql+psycopg://USER@HOST/DB or sqlite:///study.db") from None  # fmt: skip
    try:
        engine = sqlalchemy.create_engine(
            url, connect_args={"connect_timeout": 10} if url.startswith("postgres") else {}
        )
        with engine.connect():
            pass
        engine.dispose()
    except ModuleNotFoundError as exc:
        raise StudyError(f"no driver for {shown}: {exc}", hint="pip install 'lungxray[postgres]'") from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = " ".join(str(getattr(exc, "orig", exc)).split())[:200]
        raise StudyError(f"cannot reach the study storage {shown}: {reason}",
                         hint="check the host, port, user, database and that the server runs") from None  # fmt: skip


def open_shared_study(
    url: str, tune_cfg: TuneConfig, trial_cfg: TrainConfig, model_name: str, record: dict
) -> optuna.Study:
    """Create or join the study in ``url`` with heartbeats on, a stale trial retried once; refuse it
    when its agreement differs."""
    import sqlalchemy

    for attempt in range(5):
        try:
            with heartbeat_warnings_off():
                storage = optuna.storages.RDBStorage(
                    url, heartbeat_interval=tune_cfg.heartbeat, grace_period=3 * tune_cfg.heartbeat, **retry_once()
                )
            break
        except (
            sqlalchemy.exc.IntegrityError,
            sqlalchemy.exc.OperationalError,
        ):  # two workers made a new database's tables at once: again
            if attempt == 4:
                raise
            time.sleep(1 + attempt)
    direction = "minimize" if trial_cfg.select_by == "val_loss" else "maximize"
    study = optuna.create_study(
        storage=storage,
        study_name=tune_cfg.study_name,
        direction=direction,
        load_if_exists=True,
        # Workers draw from their own seeds: the same seed would make them propose the same trials.
        sampler=make_sampler(tune_cfg.sampler, trial_cfg.seed + os.getpid(), tune_cfg.startup_trials),
        pruner=make_pruner(tune_cfg, trial_cfg.epochs),
    )
    check_epochs(study, tune_cfg.study_name, shown_url(url), trial_cfg.epochs)  # by name: the agreement hashes it
    known = study.user_attrs.get(AGREEMENT)
    if known is None:
        study.set_user_attr(AGREEMENT, record)
        study.set_user_attr("model", model_name)
        known = study.user_attrs.get(AGREEMENT)  # a worker beside this one may have written first
    differs = [f"{k} ({known.get(k)} there, {v} here)" for k, v in record.items() if known.get(k) != v]
    if differs:
        raise StudyError(
            f"study {tune_cfg.study_name!r} was started with other {', '.join(differs)}",
            hint="give every worker the same data, --exclude/--groups, split and search settings and lungxray version",
        )
    return study


def _counts(study: optuna.Study) -> tuple[int, int]:
    """(finished, running) trials of the study."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, optuna.trial.TrialState.RUNNING))
    finished = sum(t.state in FINISHED for t in trials)
    return finished, len(trials) - finished


def _heartbeat(trial: optuna.Trial, trial_id: int, stop: threading.Event, interval: int) -> threading.Thread:
    """Beat ``trial``'s heartbeat now and every ``interval`` seconds until ``stop`` is set (Optuna
    beats it only inside Study.optimize, which a worker does not use)."""
    storage = trial.storage

    def beat() -> None:
        while not stop.wait(interval):
            storage.record_heartbeat(trial_id)

    thread = threading.Thread(target=beat, daemon=True)
    storage.record_heartbeat(trial_id)
    thread.start()
    return thread


def _say_nothing(text: str) -> None:
    pass


def run_worker(study: optuna.Study, model_name: str, data: FitData, tune_cfg: TuneConfig, trial_cfg: TrainConfig,
               say: Callable[[str], None] = _say_nothing) -> int:  # fmt: skip
    """Run trials until the study holds ``tune_cfg.trials`` finished ones; returns how many this
    worker finished. While other workers' trials run and would reach the count, it waits: one of
    them may die, and its trial is then failed here and re-run."""
    with heartbeat_warnings_off():
        return _run_worker(study, TrialSetup(model_name, data, trial_cfg), tune_cfg, say)


def _run_worker(study: optuna.Study, setup: TrialSetup, tune_cfg: TuneConfig, say: Callable[[str], None]) -> int:
    space, done = get_spec(setup.model_name).space, 0
    me = f"{socket.gethostname()}:{os.getpid()}"
    while True:
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial: FAIL, and queued again once
        finished, running = _counts(study)
        if finished >= tune_cfg.trials:
            return done
        if finished + running >= tune_cfg.trials:
            # Others' last trials run: look again soon (two small queries), not a heartbeat later, so this
            # worker ends with them instead of up to a heartbeat (30 s) after.
            time.sleep(min(tune_cfg.heartbeat, 2))
            continue
        trial = study.ask()
        try:
            trial.set_user_attr("worker", me)  # at once: a trial naming no worker is taken for a dead one's
            if sum(_counts(study)) > tune_cfg.trials and trial.number == max(
                t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            ):  # two workers asked for the last trial at once: the later one stands down
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            done += _run_and_tell(study, trial, space, setup, tune_cfg.heartbeat, say)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Paused (SIGSTOP, swapped out) past the heartbeat window: another worker found the
            # trial silent, failed it and queued it again; what it went on to train is not the study's.
            say(f"warning: trial {trial.number} was already marked failed: this worker was silent longer than "
                f"the heartbeat window ({3 * tune_cfg.heartbeat} s, --heartbeat {tune_cfg.heartbeat}), so its "
                "result is dropped (the trial is queued again once, unless it was a retry already)")  # fmt: skip


def _run_and_tell(study: optuna.Study, trial: optuna.Trial, space, setup: TrialSetup, heartbeat: int,
                  say: Callable[[str], None]) -> bool:  # fmt: skip
    """Run ``trial`` with its heartbeat beating, tell the study and say how it ended; True when it
    finished (COMPLETE or PRUNED)."""
    stop, trial_id = threading.Event(), storage_trial_id(trial)
    beating = _heartbeat(trial, trial_id, stop, heartbeat)
    try:
        state, value, _ = run_trial(trial, space(trial), setup)
    finally:
        stop.set()
        beating.join()
    tell(study, trial, state, value)
    retry = retried_trial_number(trial.storage.get_trial(trial_id))
    say(f"trial {trial.number}: {state.name.lower()}" + (f" {value:.4f}" if value is not None else "")
        + (f" (a retry of trial {retry})" if retry is not None else ""))  # fmt: skip
    return state != optuna.trial.TrialState.FAIL


def _worker_process(url: str, model_name: str, data: FitData, tune_cfg: TuneConfig, trial_cfg: TrainConfig,
                    record: dict, say: Callable[[str], None]) -> int:  # fmt: skip
    """One of ``run_parallel``'s processes (``trial_cfg.threads``: its share of the cores); it says
    only its warnings, the parent process names each trial."""
    import torch

    torch.set_num_threads(trial_cfg.threads)
    study = open_shared_study(url, tune_cfg, trial_cfg, model_name, record)
    warnings_only = lambda text: say(text) if text.startswith("warning:") else None  # noqa: E731
    return run_worker(study, model_name, data, tune_cfg, trial_cfg, warnings_only)


def run_parallel(url: str, model_name: str, data: FitData, tune_cfg: TuneConfig, trial_cfg: TrainConfig,
                 record: dict, say: Callable[[str], None] = _say_nothing) -> optuna.Study:  # fmt: skip
    """``tune_cfg.parallel`` worker processes on this machine (spawned, each with its share of the
    cores) on the study in ``url``; returns the study once they are done. ``say`` goes to the
    processes too: a module-level function or a ``functools.partial`` of one (it is pickled).

    Each process is a pool of its own, so one that dies (SIGKILL, the out-of-memory killer) breaks
    only its own: it is replaced, and the trial it ran is failed and queued once more at once
    (``_retry_dead``) instead of a heartbeat window later; the other processes train on."""
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, (os.cpu_count() or 1) // tune_cfg.parallel)
    trial_cfg = replace(trial_cfg, threads=threads)  # each process's share, for the fused step too
    study = open_shared_study(url, tune_cfg, trial_cfg, model_name, record)  # made (or refused) once, here
    args = (url, model_name, data, tune_cfg, trial_cfg, record, say)
    running = _start_workers(tune_cfg.parallel, args)  # future -> (its pool, its process's pid)
    deaths = 0
    try:
        while running:
            ended, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in ended:
                pool, pid = running.pop(future)
                pool.shutdown()
                try:
                    future.result()
                except BrokenProcessPool:
                    deaths += 1
                    if deaths > tune_cfg.trials:  # every trial kills its process: no end to replacing them
                        raise StudyError(
                            f"worker processes died {deaths} times (killed, out of memory?)",
                            hint="lower --parallel or the batch size, or free memory",
                        ) from None
                    with heartbeat_warnings_off():
                        _retry_dead(study, pid, say)
                    running |= _start_workers(1, args)
    finally:
        for pool, _ in running.values():
            pool.shutdown()
    return study


def _start_workers(n: int, args: tuple) -> dict:
    """``n`` worker processes, each alone in a pool of its own, running ``_worker_process(*args)``:
    {its future: (its pool, its pid)}."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pools = [ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) for _ in range(n)]
    pids = [pool.submit(os.getpid) for pool in pools]  # the processes start side by side
    return {pool.submit(_worker_process, *args): (pool, pid.result()) for pool, pid in zip(pools, pids, strict=True)}


def _retry_dead(study: optuna.Study, pid: int, say: Callable[[str], None]) -> None:
    """Fail the trials that the dead worker process ``pid`` left running and queue each once more,
    saying which and why."""
    me = f"{socket.gethostname()}:{pid}"
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # None: it died between asking for the trial and naming itself; with no heartbeat yet, the
        # trial would never turn stale and the search would wait for it forever
        if trial.user_attrs.get("worker") not in (me, None):
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker found it silent first, and queued it again itself
        failed = study.get_trials(deepcopy=False)[trial.number]
        queued = queue_retry(study, failed)
        say(f"worker process {pid} died (killed: out of memory?) during trial {trial.number}; a new process "
            f"takes its place and trial {trial.number} " + ("is retried once with the same parameters" if queued
            else "is not retried again: it was a retry already"))  # fmt: skip
