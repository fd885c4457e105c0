"""The stages of ``run``, each taking the ``Job``: prepare -> tune -> train -> evaluate -> save.

``run`` chains them and writes the run folder (artifact names and writes: ``runfolder``); ``work``
is one worker of a shared study. The Job arrives resolved (``job.Job``): stages read its trial and
final settings as they are. The test split is touched once, by ``evaluation.evaluate_split``, after
the model is final. Evaluating a saved bundle is ``evaluation.py``; cross-validation is ``cv.py``.
"""

from __future__ import annotations

import functools
import importlib
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from lungxray import runfolder
from lungxray.bundle import BundleConfig, BundleExtras, attach_metrics, save_bundle
from lungxray.card import headline, model_card, write_card
from lungxray.config import Manifest, TuneConfig
from lungxray.data import Dataset, load_dataset
from lungxray.evaluation import audit_split, check_external_classes, evaluate_split, external_names, external_stage
from lungxray.infer import Images, predict_logits, set_threads
from lungxray.job import Job
from lungxray.labelling import Findings
from lungxray.learnable import trainable
from lungxray.metrics import calibrate, fit_class_bias
from lungxray.models import get_spec
from lungxray.ood import fit_ood
from lungxray.plots import curves_figure, save_figure
from lungxray.predictor import Predictor
from lungxray.progress import note, stage
from lungxray.splits import Split, make_split
from lungxray.train import FitData, FitResult, fit, world
from lungxray.version import __version__


def jsonable(obj):
    """Settings as JSON values (Paths as strings), for config.json, run.json and cv.json."""
    import json

    return json.loads(json.dumps(obj, default=str))


def fingerprint(job: Job, **parts) -> dict:
    """What a run or cv folder is made from: the data, its preprocessing and selection, the model,
    and ``parts`` (the split of a run; the folds and seed of a cv)."""

    prep, data_cfg = job.preprocessing, job.dataset
    # Preprocessing options only when set, so folders made before they existed keep their fingerprint.
    options = {"crop_borders": prep.crop_borders, "equalize": prep.equalize, "dicom_keep": prep.dicom_keep,
               "site_normalise": prep.site_normalise}  # fmt: skip
    options = {k: v for k, v in options.items() if v not in (False, "none", ())}
    if not data_cfg.dicom_patients:
        options["dicom_patients"] = False
    if data_cfg.manifest != Manifest():  # which rows and columns of a manifest make the data
        options["manifest"] = asdict(data_cfg.manifest)
    if data_cfg.findings != Findings():  # how its labels become findings (--uncertain, --map, ...)
        options["findings"] = asdict(data_cfg.findings)
    return jsonable({"data": _real(job.data), "model": job.model, "img_size": prep.img_size,
                     "groups": data_cfg.groups, "exclude": data_cfg.exclude, **options, **parts})  # fmt: skip


def search_settings(search: TuneConfig) -> dict:
    """The search's settings as run.json and cv.json record them: the storage URL's password masked."""
    return asdict(replace(search, storage=search.storage and runfolder.shown_url(search.storage)))


def _real(data: tuple[Path, ...]) -> str | list[str]:
    """DATA's real paths: one as a string (as folders made before several were allowed), several as a list."""
    import os

    paths = [os.path.realpath(d) for d in data]
    return paths[0] if len(paths) == 1 else paths


def check_storage(job: Job) -> None:
    """A database URL given with --storage answers, before anything is scanned."""
    if job.search.storage:
        from lungxray.workers import check_storage as check

        check(job.search.storage)


def prepare(job: Job, write: bool = True) -> tuple[Dataset, Split]:
    """Scan and split; with ``write`` and an out folder, write scan.json and splits.json there,
    after checking that it was not made from other data, split or model
    (``runfolder.check_fingerprint``) nor from other images under the same path (``check_content``)."""
    out = job.out if write else None
    split = {k: v for k, v in asdict(job.split).items() if (k, v) != ("val_by", "group")}  # as before it existed
    made_from = fingerprint(job, split=split)
    if out is not None:
        runfolder.check_fingerprint(out, made_from)  # before the scan: fail fast
    stage(f"scanning {', '.join(map(str, job.data))}", job.progress)
    ds = trainable(load_dataset(job.data, job.dataset, progress=job.progress), job.progress)
    split = make_split(ds, job.split)
    note(f"{len(ds.samples)} images ({', '.join(f'{c} {n}' for c, n in ds.counts().items())}), "
         f"{len(ds.skipped)} skipped; split {split.mode}: " + ", ".join(f"{k} {v}" for k, v in split.sizes().items()),
         job.progress)  # fmt: skip
    if out is not None:
        content = check_content(job, ds, made_from)
        if any(s.patient for s in ds.samples):
            ds.rekey_patients(runfolder.secret_key(out / runfolder.PATIENT_KEY))
        runfolder.record_fingerprint(out, made_from, content)
        runfolder.write_json(out, runfolder.SCAN, scan_summary(ds, job.seed, job.progress))
        runfolder.write_json(out, runfolder.SPLITS, split.to_json(ds))
    return ds, split


def check_content(job: Job, ds: Dataset, made_from: dict) -> list:
    """Add the digest of the data's content (sorted [sha256, class, site] of every usable image) to
    the fingerprint ``made_from`` and compare it with ``job.out``'s (``runfolder.check_content``):
    a change is refused, or with --force the folder's study is set aside, so that the search starts
    anew, and a warning says so. Returns the listing for ``runfolder.record_fingerprint``."""
    import warnings

    from lungxray.errors import OutputExistsError

    content = sorted([s.sha256, s.label, s.site or ""] for s in ds.samples)
    made_from["content"] = runfolder.content_digest(content)
    changes = runfolder.check_content(job.out, made_from, content, job.force)
    if changes is not None and job.search.storage:
        raise OutputExistsError(
            f"{job.out} was made from other images under the same DATA ({changes}); --force does not "
            "restart the study in --storage", hint="choose another --out and --study-name for the data as it is now",
        )  # fmt: skip
    if changes is not None:
        aside = runfolder.set_study_aside(job.out)
        anew = f"starts a new study; the old study is kept as {aside}" if aside else "makes it anew"
        warnings.warn(f"{job.out} was made from other images ({changes}): --force {anew}", stacklevel=3)
    return content


def scan_summary(ds: Dataset, seed: int, progress: bool = True) -> dict:
    """scan.json: the dataset's summary and its source-confound audit (``confound.audit``), whose
    warning, when it fires, is also said at once."""
    from lungxray.confound import audit

    confound = audit(ds, seed)
    if confound["warning"]:
        note(f"warning: {confound['warning']}", progress)
    return ds.summary() | {"confound": confound}


def tensors(ds: Dataset, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, 1, H, W) float in [0, 1], y) for the samples ``idx``: y (N,) int64 class labels, or
    for a multi-label dataset (N, F) float32 targets, NaN where unknown (``train.fit`` tells them apart)."""
    return Images(ds.images, idx), torch.from_numpy(ds.targets[idx] if ds.task == "multilabel" else ds.labels[idx])


def fit_data(ds: Dataset, split: Split) -> FitData:
    """The training and validation part of ``split``, as ``train.fit`` and the search take them."""
    sites = torch.from_numpy(ds.site_codes()[split.train])
    return FitData(tensors(ds, split.train), tensors(ds, split.val), len(ds.classes), sites)


def tune_stage(job: Job, ds: Dataset, split: Split):
    """Optuna search on train/val (``job.search.parallel`` worker processes when above 1); writes
    best_params.json and trials.json to ``job.out``."""
    from lungxray.study import as_seen, summarise
    from lungxray.tune import tune

    search, trial_cfg = job.search, job.trial
    at_a_time = f"{search.parallel} worker processes" if search.parallel > 1 else f"{search.jobs} at a time"
    stage(f"searching: {search.trials} trials of {job.model}, {at_a_time}", job.progress)
    set_threads(trial_cfg.threads)
    storage = runfolder.study_storage(job.out, search.storage)
    data = fit_data(ds, split)
    if search.parallel > 1 or search.storage:
        # A study other workers may share (a database URL, or --parallel): this process runs as a
        # worker among them, with heartbeats, instead of assuming it is the study's only user.
        from lungxray import workers

        record = workers.agreement(ds, split, job.model, job.dataset, trial_cfg)
        if search.parallel > 1:
            say = functools.partial(note, enabled=job.progress)  # pickled: the worker processes say their warnings
            study = workers.run_parallel(storage, job.model, data, search, trial_cfg, record, say)
        else:
            study = workers.open_shared_study(storage, search, trial_cfg, job.model, record)
            workers.run_worker(study, job.model, data, search, trial_cfg, lambda text: note(text, job.progress))
        result = summarise(study)
    else:
        result = tune(job.model, data, search, trial_cfg, storage, progress=job.progress)
    trials = [
        # a pruned trial's value: the best figure it reached, which the search learnt from (Optuna's
        # own value for it is its last epoch's)
        {"number": t.number, "state": t.state.name, "value": as_seen(t).value, "params": t.params, **t.user_attrs}
        for t in result.study.trials
    ]
    runfolder.write_json(job.out, runfolder.TRIALS, trials)
    best = {"model": job.model, "params": result.best_params, "objective": trial_cfg.select_by,
            "value": result.best_value, "trial": result.best_trial,
            "storage": runfolder.shown_url(storage)}  # fmt: skip
    runfolder.write_json(job.out, runfolder.BEST_PARAMS, best)
    return result


def work(job: Job):
    """``lungxray worker``: scan and split as the study's other workers do (nothing written), then
    run the shared study's trials until it holds ``job.search.trials``. Returns (trials this worker
    finished, the study)."""
    from lungxray import workers

    check_storage(job)
    ds, split = prepare(job, write=False)
    record = workers.agreement(ds, split, job.model, job.dataset, job.trial)
    study = workers.open_shared_study(job.search.storage, job.search, job.trial, job.model, record)
    set_threads(job.trial.threads)
    say = lambda text: note(text, job.progress)  # noqa: E731
    return workers.run_worker(study, job.model, fit_data(ds, split), job.search, job.trial, say=say), study


def train_stage(
    job: Job, ds: Dataset, split: Split, params: dict, trained: FitResult | None = None
) -> tuple[FitResult, Path | None]:
    """Final training on train (watching val) with ``job.final`` and the hyperparameters ``params``;
    writes history.json, curves.png and model/ (the first process of a distributed training only).

    ``trained``: a run of exactly this training (the best trial, same settings and seed) whose
    model is saved instead of training it a second time.
    """
    runfolder.refuse_to_replace(job.out, runfolder.MODEL, job.force, "a model")
    cfg = job.final.for_params(params)
    set_threads(cfg.threads)
    stage("training the final model" + (": the best trial's model, already trained" if trained else ""), job.progress)
    result = trained or fit(job.model, params, fit_data(ds, split), cfg, progress=job.progress)
    if world()[0] != 0:  # a distributed training's other processes: the first one writes
        return result, None
    calibration = _calibration(result, ds, split)
    multilabel = {}
    if ds.task == "multilabel":  # per finding: config.json's thresholds and temperatures, beside calibration
        multilabel = {"task": "multilabel", "thresholds": calibration.pop("thresholds"),
                      "temperatures": calibration.pop("temperatures")}  # fmt: skip
    history = result.history_dict()
    runfolder.write_json(job.out, runfolder.HISTORY, {"best_epoch": result.best_epoch, **history})
    save_figure(curves_figure(history, result.best_epoch), job.out / runfolder.CURVES)
    config = _bundle_config(job, ds, split, params, result, trained is not None)
    config = replace(config, calibration=calibration, training_data={"sources": job.dataset.sources}, **multilabel)
    config = config.to_json()
    seen = {part: [ds.samples[i].sha256 for i in idx] for part, idx in (("train", split.train), ("val", split.val))}
    ood = fit_ood(ds.images[split.train], ds.images[split.val])
    card = model_card(config | {"ood": ood.info}, ds.summary())  # run completes it once the test is read
    extras = BundleExtras(seen=seen, ood=ood, card=card)
    folder = save_bundle(job.out / runfolder.MODEL, result.model, config, extras, overwrite=job.force)
    return result, folder


def _calibration(result: FitResult, ds: Dataset, split: Split) -> dict:
    """config.json's calibration: the temperature fitted on val (``calibrate``) and, when val is a
    whole other site (``--val-by site``), the class offsets fitted there first."""
    x_val, y_val = tensors(ds, split.val)
    logits, y = predict_logits(result.model, x_val).double().numpy(), y_val.numpy()
    if (
        ds.task == "multilabel"
    ):  # per finding; a threshold whose val part lacks a side falls back to training's prevalence
        from lungxray.multilabel_calibration import calibrate_multilabel, prevalence

        return calibrate_multilabel(logits, y, ds.classes, prevalence(ds.targets[split.train], ds.classes))
    bias = fit_class_bias(logits, y) if split.val_site is not None else None
    if bias is None:
        return calibrate(logits, y)
    return calibrate(logits + np.asarray(bias), y) | {"class_bias": bias, "class_bias_fitted_on": split.val_site}


def _bundle_config(
    job: Job, ds: Dataset, split: Split, params: dict, result: FitResult, from_best: bool
) -> BundleConfig:
    """config.json's classes, model, preprocessing and training sections (``bundle.BundleConfig``)."""
    cfg = job.final.for_params(params)
    size = job.preprocessing.img_size
    training = {
        **jsonable(asdict(cfg)),
        "best_epoch": result.best_epoch,
        "member_best_epochs": result.member_epochs,
        "epochs_run": len(result.history),
        "arithmetic": result.arithmetic,  # what --precision auto came to on this machine
        "split_seed": split.seed,
        "split_mode": split.mode,
        "from_best_trial": from_best,
        "split_sizes": split.sizes(),
        "torch_version": torch.__version__,
    }
    model = {"name": job.model, "members": cfg.members, "hyperparameters": params, "input_shape": [1, size, size]}
    return BundleConfig(tuple(ds.classes), model, job.preprocessing, training)


def training_params(job: Job) -> dict:
    """The hyperparameters a final training uses: the model's registered ones (``job.params`` is
    'defaults'), a JSON file, or the run folder's best_params.json when ``job.params`` is None."""
    if str(job.params) == "defaults":
        return dict(get_spec(job.model).defaults)
    return runfolder.read_params(Path(job.params) if job.params is not None else job.out / runfolder.BEST_PARAMS)


@dataclass
class RunResult:
    """What ``run`` wrote: the content of run.json, of metrics.json and of each external set's metrics.json."""

    summary: dict
    metrics: dict
    external: dict[str, dict] = field(default_factory=dict)
    """Each external set's metrics.json, by name."""


def run(job: Job) -> RunResult:
    """The whole job; writes the run folder and run.json (settings, timings, headline figures).

    ``job.trial`` trains the trials and ``job.final`` the final model; ``job.external``: dataset
    folders from elsewhere (other hospitals) the final model is evaluated on after the internal
    test (``evaluation.external_stage``). One process writes ``job.out`` at a time
    (``runfolder.writer_lock``).
    """
    runfolder.refuse_to_replace(job.out, runfolder.MODEL, job.force, "a model (the study resumes with --force)")
    external = external_names(job.external)  # a missing folder fails before the scan
    with runfolder.writer_lock(job.out, (*job.data, *job.external)):
        return _run(job, external)


def _run(job: Job, external: dict[str, Path]) -> RunResult:
    """``run``'s stages, under the folder's writer lock."""
    check_storage(job)
    set_threads(job.final.threads)
    clock = Clock()
    ds, split = prepare(job)
    if external and ds.task == "multilabel":
        from lungxray.errors import ConfigError

        raise ConfigError("--external takes class folders: a multi-label model is scored elsewhere with evaluate",
                          hint="leave --external out; then `lungxray evaluate RUN/model OTHER.csv --out DIR` with "
                          "the same --layout (or --label-sep, --finding-cols)")  # fmt: skip
    for folder in external.values():  # before the search: an external set the model cannot score fails now
        check_external_classes(folder, ds.classes)
    # torch's optimisers import torch._dynamo on first use (1.3-1.6 s here): a cost of the process, not
    # of the search, so it is paid here and counted with the scan, as bench/search_bench.py's Keras
    # reference imports its framework before its search is timed
    importlib.import_module("torch._dynamo")
    clock.lap("scan_and_split_s")
    tuned = tune_stage(job, ds, split)
    clock.lap("tune_s")
    fitted, predictor, how = _final_model(job, ds, split, tuned)
    set_threads(job.final.threads)
    clock.lap("train_s")
    split_info = {"mode": split.mode, "seed": split.seed, **split.sizes(),
                  "test_duplicates_of_train": split.test_duplicates_of_train}  # fmt: skip
    if split.site is not None:
        split_info |= {"site": split.site, "left_out": split.left_out}
    stage(f"evaluating on the test split ({len(split.test)} images)", job.progress)
    if ds.task == "multilabel":
        from lungxray.evaluation_multilabel import score_test_split

        metrics, audited = score_test_split(predictor, ds, split, job.out, {"split": split_info}, job.seed), None
    else:
        metrics = evaluate_split(
            predictor, ds, split.test, job.out, {"split": split_info}
        )  # the one read of the test split
        audited = audit_split(predictor, ds, split.test, job.out)  # the same images, lungs or borders hidden
    attach_metrics(predictor.folder, metrics)
    clock.lap("evaluate_s")
    elsewhere = external_stage(predictor, job.dataset, external, job.out, job.progress) if external else {}
    if external:
        clock.lap("external_s")
    scored_elsewhere = {
        name: runfolder.read_json(Path(r["metrics"]).parent, runfolder.METRICS) for name, r in elsewhere.items()
        if "metrics" in r
    }  # fmt: skip
    card = model_card(predictor.config_, ds.summary(), metrics, scored_elsewhere, audited)
    write_card(predictor.folder, card, headline(metrics, scored_elsewhere))
    from lungxray.report import write_report

    stage("writing the report", job.progress)
    write_report(job.out)
    clock.lap("report_s")
    summary = _summary(job, ds, tuned, fitted, metrics, audited) | {"final_model": how, "external": elsewhere}
    summary["timings"] = clock.laps
    runfolder.write_json(job.out, runfolder.RUN, summary)
    return RunResult(summary, metrics, scored_elsewhere)


def _final_model(job: Job, ds: Dataset, split: Split, tuned) -> tuple[FitResult, Predictor, str]:
    """The final model, trained and saved: (its fit, the loaded bundle, how it was made)."""
    # The final training repeats the best trial exactly when the settings match (same data, seed,
    # epochs, patience): then the trial's model is the final model and is not trained twice.
    repeats_best_trial = replace(job.trial, threads=0) == replace(job.final, threads=0)
    same = tuned.best_fit if repeats_best_trial else None
    final_job = job
    if repeats_best_trial and same is None:
        # The best trial ran in an earlier process (a resumed study): train it again on the threads a
        # trial had, since another thread count gives other floats.
        threads = max(1, torch.get_num_threads() // job.search.jobs)
        final_job = replace(job, train=replace(job.train, threads=threads))
    fitted, model_dir = train_stage(final_job, ds, split, tuned.best_params, trained=same)
    how = ("best trial (same training settings)" if same is not None
           else "best trial retrained (resumed study)" if repeats_best_trial else "retrained")  # fmt: skip
    return fitted, Predictor(model_dir), how


def _summary(job: Job, ds: Dataset, tuned, fitted: FitResult, metrics: dict, audited: dict) -> dict:
    """run.json's settings, search, final model and headline figures."""
    settings = {"data": asdict(job.dataset), "split": asdict(job.split), "tune": search_settings(job.search),
                "trial": asdict(job.trial), "final": asdict(job.final.for_params(tuned.best_params))}  # fmt: skip
    return {
        "lungxray_version": __version__,
        "data": job.data_named,
        "model": job.model,
        "seed": job.seed,
        "settings": jsonable(settings),
        "best_params": tuned.best_params,
        "trials_complete": tuned.n_complete,
        "trials_pruned": tuned.n_pruned,
        "best_epoch": fitted.best_epoch,
        "task": ds.task,
        **(
            {"test_macro_auroc": metrics["macro_auroc"], "test_micro_auroc": metrics["micro_auroc"]}
            if ds.task == "multilabel"
            else {"test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"]}
        ),
        "n_test": metrics["n"],
        "test_share_flagged": metrics["ood"]["share_flagged"] if metrics["ood"] else None,
        "audit": {name: view["accuracy"] for name, view in audited["views"].items()}
        | {"chance": audited["chance"]["accuracy"]}
        if audited
        else None,
        "confound": runfolder.read_json(job.out, runfolder.SCAN).get("confound"),
        "duplicate_groups": len(ds.duplicate_groups),
        "groups": ds.group_sizes(),
        "excluded": ds.excluded,
        "skipped": len(ds.skipped),
        "artifacts": {name: str(job.out / file) for name, file in runfolder.RUN_ARTIFACTS.items()}
        | {"study": runfolder.shown_url(job.search.storage) if job.search.storage else str(job.out / runfolder.STUDY)},
    }


class Clock:
    """Seconds spent in each stage, in order."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self._last = now - self._last, now
