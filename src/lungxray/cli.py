"""Command line: one subcommand per stage, each a thin call into the library.

``lungxray run`` does everything; ``scan``, ``tune``, ``train``, ``evaluate`` and ``predict`` run
one stage each; ``cv`` cross-validates; ``labels`` ranks doubtful labels from cv runs; ``explain``
and ``audit`` show where a model looks. The flags come from the settings dataclasses
(``flags.py``) and become one ``Job``; this module only dispatches and prints (``console.py``). A
``LungxrayError`` (a failure the user can fix) is printed as one line with its hint, exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings

from lungxray import console
from lungxray.config import DataConfig, ServeTimeouts, TuneConfig
from lungxray.errors import ConfigError, LungxrayError
from lungxray.flags import build_parser, from_args, given
from lungxray.version import __version__


def _job(args: argparse.Namespace):
    """The Job the parsed flags describe (flags that are not settings are the command's own)."""
    from lungxray.job import Job

    values = {k: v for k, v in vars(args).items() if k not in ("data", "out")} | {"progress": not args.quiet}
    return Job.from_options(args.data, getattr(args, "out", None), strict=False, **values)


def cmd_scan(args) -> int:
    from lungxray.confound import audit
    from lungxray.data import load_dataset

    ds = load_dataset(args.data, from_args(DataConfig, args), progress=not args.quiet and not args.json)
    summary = ds.summary() | {"confound": audit(ds)}
    if args.json:
        console.print_json(summary)
    else:
        console.print_scan(summary)
    return 0


def _tracked(command):
    """``--mlflow``: MLflow and its store are checked before ``command`` runs (nothing trains when
    they fail), and the folder it wrote is logged there once it succeeded (``tracking``)."""
    import functools

    @functools.wraps(command)
    def tracked(args) -> int:
        if args.mlflow is None:
            return command(args)
        from lungxray.runfolder import shown_url
        from lungxray.tracking import open_tracker

        tracker = open_tracker(args.mlflow, args.mlflow_experiment, args.out)
        code = command(args)
        if code == 0:
            try:
                run_id = tracker.log(args.out, getattr(args, "model_dir", None))
            except Exception as exc:  # MLflow's errors and a lost server: the job's results are safe on disk
                from lungxray.errors import LungxrayError

                raise LungxrayError(
                    f"{args.out} is complete, but logging it to MLflow at {shown_url(tracker.uri)} failed: "
                    f"{' '.join(str(exc).split())[:300]}",
                    hint=f"check that the store answers; what the job wrote in {args.out} is complete",
                ) from None
            print(f"logged to MLflow: run {run_id} of experiment {tracker.experiment!r} in {shown_url(tracker.uri)}")
        return code

    return tracked


@_tracked
def cmd_run(args) -> int:
    from lungxray import pipeline

    result = pipeline.run(_job(args))
    console.print_run(result.summary, result.metrics, result.external)
    return 0


def cmd_tune(args) -> int:
    from lungxray import pipeline, runfolder

    job = _job(args)  # a bad model or device fails before the scan
    pipeline.check_storage(job)
    with runfolder.writer_lock(job.out, job.data):
        ds, split = pipeline.prepare(job)
        result = pipeline.tune_stage(job, ds, split)
    print(
        f"best trial {result.best_trial}: {job.trial.select_by} {result.best_value:.4f}, "
        f"params {json.dumps(result.best_params)}"
    )
    print(f"written: {job.out / runfolder.BEST_PARAMS}, {job.out / runfolder.TRIALS}")
    print(console.study_hint(runfolder.shown_url(runfolder.study_storage(job.out, job.search.storage))))
    return 0


def cmd_worker(args) -> int:
    from lungxray import pipeline
    from lungxray.study import FINISHED, best_trial

    job = _job(args)
    if not job.search.storage:
        raise ConfigError(
            "worker needs --storage: the study's database URL (postgresql+psycopg://USER@HOST/DB)",
            hint="start the study with `lungxray tune ... --storage URL --study-name NAME`, or give the same URL here",
        )
    done, study = pipeline.work(job)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    print(f"this worker finished {done} trial(s); the study holds {finished} of {job.search.trials}")
    best = best_trial(study)
    if best is not None:
        print(f"best so far: trial {best.number}, {job.trial.select_by} {best.value:.4f}, "
              f"params {json.dumps(best.params)}")  # fmt: skip
    return 0


def cmd_train(args) -> int:
    """Train once, or in ``--nproc`` processes through torchrun (``launch``)."""
    import os

    from lungxray import launch, runfolder

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        failed = launch.launch(args.argv, args.nproc)
        if failed is None:
            return 0
        _error(f"lungxray train: error: a training process failed ({failed}); its output is above")
        return 1
    job = _job(args)  # a bad model or device fails before the scan
    result, folder, processes, rank = launch.train(job)
    if rank == 0:
        shared = f" ({processes} processes, batch {job.final.batch_size} shared among them)" if processes > 1 else ""
        print(f"kept epoch {result.best_epoch}{shared}: val accuracy {result.best.val_accuracy:.4f}, "
              f"val loss {result.best.val_loss:.4f}")  # fmt: skip
        print(f"written: {folder}, {job.out / runfolder.CURVES}, {job.out / runfolder.HISTORY}")
    return 0


def _scoring(args):
    from lungxray.evaluation import Scoring

    data = args.data[0] if len(args.data) == 1 else args.data  # several: one dataset, each a site
    return Scoring(args.model_dir, data, from_args(DataConfig, args), args.out, args.splits,
                   args.include_seen, args.force, not args.quiet)  # fmt: skip


@_tracked
def cmd_evaluate(args) -> int:
    from lungxray.evaluation import evaluate_bundle

    metrics, seen = evaluate_bundle(_scoring(args))
    print(console.seen_line(seen))
    console.print_evaluation(metrics, args.out)
    from lungxray import runfolder

    if args.csv:
        predictions = runfolder.read_json(args.out, runfolder.PREDICTIONS)
        table = runfolder.predictions_csv(predictions["images"], predictions["classes"])
        print(f"written: {runfolder.write_text(args.out / runfolder.PREDICTIONS_CSV, table)}")
    else:  # an earlier evaluation's table (replaced with --force) no longer matches predictions.json
        (args.out / runfolder.PREDICTIONS_CSV).unlink(missing_ok=True)
    return 0


def cmd_audit(args) -> int:
    from lungxray.evaluation import audit_bundle

    report, seen = audit_bundle(_scoring(args))
    print(console.seen_line(seen))
    console.print_audit(report, args.out)
    return 0


@_tracked
def cmd_cv(args) -> int:
    from lungxray import runfolder
    from lungxray.cv import cross_validate

    searched = given(TuneConfig, args)
    if searched and not getattr(args, "tune", False):  # a search option would be ignored without a search
        raise ConfigError(
            f"{' '.join(searched)} only apply with --tune: without it every fold trains with fixed hyperparameters",
            hint="add --tune to search inside each fold, or leave the search options out",
        )
    job = _job(args)
    report = cross_validate(job, runfolder.read_params(args.params) if args.params else None)
    console.print_cv(report, job, job.out)
    return 0


def cmd_labels(args) -> int:
    from lungxray.labels import write_label_issues

    csv_path, html_path, n = write_label_issues(args.cv_dirs, args.out or args.cv_dirs[0], args.top)
    print(f"confident learning flags {n} image(s) whose given label the out-of-fold predictions doubt")
    print(f"written: {csv_path} (every image, most suspect first), {html_path} (the top {args.top} as thumbnails)")
    print("check them by eye: nothing is relabelled")
    print("to leave confirmed ones out: copy their rows into a file and pass it to --exclude")
    return 0


def cmd_report(args) -> int:
    from lungxray.report import write_report

    print(f"written: {write_report(args.run_dir, args.model_dir)}")
    return 0


def _refuse_an_existing_csv(args) -> None:
    """``--csv FILE`` never replaces a file ("-" prints the table instead)."""
    from lungxray.errors import OutputExistsError

    if args.csv not in (None, "-") and args.csv.exists():
        raise OutputExistsError(f"{args.csv} already exists", hint="choose another --csv file, or delete it first")


def cmd_compare(args) -> int:
    from lungxray import runfolder
    from lungxray.compare import compare, to_csv, to_markdown

    _refuse_an_existing_csv(args)
    records, skipped = compare(args.run_dirs)
    for folder, why in skipped:
        _error(f"lungxray compare: skipped {folder}: {why}")
    if not records:
        _error("lungxray compare: error: none of the folders holds a run, cv or evaluation",
               "pass folders written by `lungxray run`, `cv` or `evaluate` with --out")  # fmt: skip
        return 1
    if args.csv == "-":
        sys.stdout.write(to_csv(records))
        return 0
    print(to_markdown(records), end="")
    if args.csv is not None:
        print(f"written: {runfolder.write_text(args.csv, to_csv(records))}")
    return 0


def cmd_explain(args) -> int:
    from lungxray import runfolder
    from lungxray.decode import image_files
    from lungxray.predictor import Predictor
    from lungxray.saliency import explain_files

    folders = tuple(p for p in args.images if p.is_dir())  # --out inside one: its overlays would be explained next
    predictor = Predictor(args.model_dir)
    results = explain_files(predictor, image_files(args.images), args.out, folders)
    console.print_predictions(results, predictor.thresholds_)
    print(f"written: {args.out / runfolder.EXPLAIN}")
    return 0 if any("error" not in r for r in results) else 1  # as predict: skipped files are listed, with why


def cmd_export(args) -> int:
    from lungxray.onnx_export import export_onnx

    path, gap = export_onnx(args.model_dir)
    print(f"written: {path} (ONNX Runtime vs PyTorch: largest probability difference {gap:.1e})")
    return 0


def cmd_serve(args) -> int:
    from lungxray.predictor import Predictor
    from lungxray.serve import serve

    timeouts = from_args(ServeTimeouts, args)  # a bad timeout fails before the model loads
    Predictor(args.model_dir, backend=args.backend)  # a broken bundle fails here, in one line
    serve(args.model_dir, args.host, args.port, args.backend, args.allowed_hosts, timeouts)
    return 0


def cmd_predict(args) -> int:
    from lungxray import runfolder
    from lungxray.decode import image_files
    from lungxray.predictor import Predictor

    _refuse_an_existing_csv(args)  # before the model loads: nothing is lost, no time wasted
    predictor = Predictor(args.model_dir)
    results = predictor.predict_files(image_files(args.images))
    if args.csv is not None:
        table = runfolder.predictions_csv(results, predictor.classes_)
        if args.csv == "-":
            sys.stdout.write(table)
        else:
            print(f"written: {runfolder.write_text(args.csv, table)}")
    elif args.json:
        console.print_json(results)
    else:
        console.print_predictions(results, predictor.thresholds_)
    # a folder may also hold a manifest or notes: such files are listed as skipped, with why; it is
    # a failure only when nothing could be predicted
    return 0 if any("error" not in r for r in results) else 1


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


COMMANDS = {
    "scan": cmd_scan,
    "run": cmd_run,
    "tune": cmd_tune,
    "worker": cmd_worker,
    "train": cmd_train,
    "cv": cmd_cv,
    "labels": cmd_labels,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
    "compare": cmd_compare,
    "explain": cmd_explain,
    "export": cmd_export,
    "serve": cmd_serve,
    "audit": cmd_audit,
    "predict": cmd_predict,
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, and answer a mistyped command or flag with what it may have meant."""
    import difflib

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # name -> the command's own parser
    # the top level takes only -h and --version, which argparse answers: otherwise the first word is the command
    words = sys.argv[1:] if argv is None else argv
    word = words[0] if words and not words[0].startswith("-") else None
    if word is not None and word not in commands:
        close = difflib.get_close_matches(word, commands, n=1)
        parser.error(
            f"no command {word!r}: " + (f"did you mean {close[0]}?" if close else f"one of {', '.join(commands)}")
        )
    args, extras = parser.parse_known_args(argv)
    if extras:
        sub = commands[args.command]
        flags = [s for action in sub._actions for s in action.option_strings]
        hints = []
        for extra in extras:
            close = difflib.get_close_matches(extra.split("=")[0], flags, n=2)
            hints.append(f"{extra} (did you mean {' or '.join(close)}?)" if close else extra)
        sub.error(f"unrecognized arguments: {' '.join(hints)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # as given: train --nproc passes them on
    warnings.showwarning = _one_line_warning
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints escaped, never crashes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    from lungxray import progress

    try:
        from lungxray.runfolder import shown_url

        # a storage URL's password stays out of the log (--storage postgresql://user:secret@host/db)
        command = shlex.join(["lungxray", *(shown_url(a) if "://" in a else a for a in args.argv)])
        progress.log_to(getattr(args, "log_file", None), f"{command} (lungxray {__version__}, pid {os.getpid()})")
    except OSError as exc:
        print(f"lungxray {args.command}: error: cannot write the log file: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        with progress.stdout_copied_to_log():
            return _dispatch(args)
    finally:
        progress.log_to(None)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command](args)
    except LungxrayError as exc:  # user-fixable: one line and a hint; anything else keeps its traceback
        _error(f"lungxray {args.command}: error: {exc}", exc.hint)
        return 2
    except OSError as exc:  # the file system: a read-only or missing folder, a full disk, a bad port
        where = f": {exc.filename}" if exc.filename else ""
        _error(f"lungxray {args.command}: error: {exc.strerror or exc}{where}",
               "check the path, its permissions and the free space")  # fmt: skip
        return 2
    except KeyboardInterrupt:
        _error("interrupted; finished trials are kept in the study and resume on the next run")
        return 130
    except Exception as exc:  # a bug: its traceback follows on stderr, and the log says it happened
        from lungxray.progress import logged

        logged(f"lungxray {args.command}: crashed: {type(exc).__name__}: {exc} (traceback on stderr)")
        raise


def _error(line: str, hint: str | None = None) -> None:
    """An error on standard error, and in the log file when there is one."""
    from lungxray.progress import logged

    for text in [line] + ([f"  hint: {hint}"] if hint else []):
        print(text, file=sys.stderr)
        logged(text)


if __name__ == "__main__":
    sys.exit(main())
