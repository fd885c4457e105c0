"""lungxray: a folder of labelled chest X-rays in, a tuned, honestly evaluated, safely saved classifier out.

The package's modules sit in layers (README, "Development"): reading data, learning, serving,
judging, the stages (``job``, ``pipeline``, ``cv``) and what users call (this API and the CLI).
Importing it does no work and imports no heavy dependency; the functions below are the Python
API, each a thin call into those modules and named as the CLI command it repeats:

    import lungxray
    result = lungxray.run("DATA", "runs/api", model="mlp", trials=4, epochs=8)
    print(result.metrics["accuracy"], result.metrics["ci95"]["accuracy"])
    predictor = lungxray.load("runs/api")          # the run folder or its model/
    predictor.predict(["x1.jpeg", "x2.png"])       # [{"path", "class", "probabilities", "ood_score",
                                                   #   "in_distribution"}, ...]
    lungxray.evaluate("runs/api", "OTHER", "runs/other")   # metrics.json's content
    lungxray.explain("runs/api", ["x1.jpeg"], "runs/why")  # explain.json's content
    lungxray.audit("runs/api", "OTHER", "runs/audit")      # audit.json's content

Options are the settings' field names (``lungxray.config``): ``trials``, ``epochs``, ``img_size``,
``seed``, ``rotation``, ... as keyword arguments; they build one ``job.Job``, as the CLI's flags do.
A keyword a function does not take is a ``ConfigError`` that names the closest one.
"""

from lungxray.version import __version__

__all__ = ["__version__", "audit", "cross_validate", "evaluate", "explain", "load", "run"]


def _job_options() -> set[str]:
    """The keywords a ``job.Job`` is built from (``Job.from_options``)."""
    from dataclasses import fields

    from lungxray.job import SETTINGS, Job, option_names

    own = {f.name for f in fields(Job) if f.init and f.name not in SETTINGS}
    return own | {"params"} | {n for c in SETTINGS.values() for n in option_names(c)}


def _scoring_options() -> set[str]:
    """The keywords of ``evaluate`` and ``audit``: their flags, less MODEL, DATA and --out."""
    from lungxray.config import DataConfig, Preprocessing
    from lungxray.job import option_names

    # the bundle's preprocessing is used, as the CLI's evaluate and audit take no --img-size
    reading = option_names(DataConfig) - option_names(Preprocessing) - {"sources"}
    return reading | {"splits", "include_seen", "force", "progress"}


def _keywords(options=set):
    """A keyword the decorated function does not take is an error naming the closest one, as the
    CLI answers a mistyped flag. ``options``: the names its ``**options`` accepts."""
    import functools

    def wrap(function):
        code = function.__code__
        named = set(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])

        @functools.wraps(function)
        def checked(*args, **kwargs):
            known = named | options()
            unknown = sorted(set(kwargs) - known)
            if unknown:
                _unknown(unknown, known, function.__name__)
            return function(*args, **kwargs)

        return checked

    return wrap


def _unknown(unknown: list[str], known: set[str], function: str) -> None:
    import difflib

    from lungxray.errors import ConfigError

    close = {name: difflib.get_close_matches(name, known, n=1) for name in unknown}
    hint = "; ".join(f"{k}: did you mean {v[0]}?" for k, v in close.items() if v)
    raise ConfigError(f"unknown option(s) {', '.join(unknown)} of lungxray.{function}",
                      hint=hint or f"known: {', '.join(sorted(known))}")  # fmt: skip


@_keywords(_job_options)
def run(data, out, **options):
    """The whole job, as ``lungxray run``: returns ``pipeline.RunResult`` (``summary``, ``metrics``).
    ``options``: ``model``, ``final_epochs``, ``external`` (folders from other hospitals to evaluate
    the final model on), ``force``, ``progress`` and every setting by its field name."""
    from lungxray.config import CVConfig
    from lungxray.job import Job, option_names
    from lungxray.pipeline import run as run_job

    _refuse(options, {"params"} | option_names(CVConfig), "run", "cross_validate")
    return run_job(Job.from_options(data, out, **options))


@_keywords(_job_options)
def cross_validate(data, out, *, params: dict | None = None, **options) -> dict:
    """k-fold cross-validation, as ``lungxray cv``: returns cv.json's content. ``params``: fixed
    hyperparameters for every fold (default: the model's); ``options`` as for ``run``, with
    ``folds``, ``repeats`` and ``tune``."""
    from lungxray.cv import cross_validate as cv
    from lungxray.job import Job

    _refuse(options, {"final_epochs", "external"}, "cross_validate", "run")
    return cv(Job.from_options(data, out, **options), params)


def _refuse(options: dict, names: set[str], function: str, other: str) -> None:
    """Options of another function are an error, not silently ignored."""
    from lungxray.errors import ConfigError

    given = sorted(set(options) & names)
    if given:
        raise ConfigError(f"{', '.join(given)}: not an option of lungxray.{function}", hint=f"see lungxray.{other}")


@_keywords(_scoring_options)
def evaluate(model, data, out, **options) -> dict:
    """Metrics, predictions, the shortcut audit and report.html of a bundle on a labelled dataset,
    written to ``out``, as ``lungxray evaluate``: returns metrics.json's content.

    ``model``: a bundle (or run) folder, or a loaded ``Predictor``; ``data``: a folder, a CSV
    manifest, or a list of them (one dataset, each a site). ``options``, with the CLI's defaults:
    ``splits`` (a run's splits.json: score only its test images; None: every image),
    ``include_seen`` (False: the images the model was trained or validated on are left out),
    ``force`` (False: an earlier evaluation in ``out`` is kept, and refused), ``progress`` (True),
    and how to read ``data`` by ``config.DataConfig``'s field names (``cache_dir``, ``label_col``,
    ``workers``, ...); the images are preprocessed as the bundle was trained."""
    from lungxray.evaluation import evaluate_bundle

    return evaluate_bundle(_scoring(model, data, out, options))[0]


@_keywords(_scoring_options)
def audit(model, data, out, **options) -> dict:
    """The shortcut audit of a bundle on a labelled dataset (scores with the lungs hidden and with
    the borders hidden), written to ``out``/audit.json, as ``lungxray audit``: returns its content.
    ``model``, ``data`` and ``options`` as for ``evaluate``."""
    from lungxray.evaluation import audit_bundle

    return audit_bundle(_scoring(model, data, out, options))[0]


def _scoring(model, data, out, options: dict):
    """The ``evaluation.Scoring`` that ``lungxray evaluate`` and ``audit`` build from their flags."""
    from pathlib import Path

    from lungxray.config import DataConfig
    from lungxray.evaluation import Scoring
    from lungxray.job import build

    splits = options.get("splits")
    return Scoring(
        Path(model) if isinstance(model, str) else model,
        [Path(d) for d in data] if isinstance(data, list | tuple) else Path(data),
        build(DataConfig, options),
        Path(out),
        Path(splits) if splits is not None else None,
        **{k: options[k] for k in ("include_seen", "force", "progress") if k in options},
    )


@_keywords()
def explain(model, images, out) -> list[dict]:
    """Probabilities and an overlay PNG (Grad-CAM for a CNN, the input gradient for an MLP) per
    image, written to ``out`` with explain.json, as ``lungxray explain``: returns explain.json's
    content (a file that cannot be used gets ``{"path", "error"}``). ``model``: a bundle (or run)
    folder, or a loaded ``Predictor``; ``images``: a file or folder, or a list of them."""
    from pathlib import Path

    from lungxray.decode import image_files
    from lungxray.predictor import Predictor
    from lungxray.saliency import explain_files

    paths = [Path(images)] if isinstance(images, str | Path) else [Path(p) for p in images]
    folders = tuple(p for p in paths if p.is_dir())  # out inside one: its overlays would be explained next
    predictor = model if isinstance(model, Predictor) else Predictor(model)
    return explain_files(predictor, image_files(paths), Path(out), folders)


@_keywords()
def load(bundle, backend: str = "auto"):
    """A verified, loaded model bundle (a run folder works too): ``predictor.Predictor``."""
    from lungxray.predictor import Predictor

    return Predictor(bundle, backend=backend)
