"""lungxray: a folder of labelled chest X-rays in, a tuned, honestly evaluated, safely saved classifier out.

The package's modules sit in layers (README, "Development"): reading data, learning, serving,
judging, the stages (``job``, ``pipeline``, ``cv``) and what users call (this API and the CLI).
Importing it does no work and imports no heavy dependency; the three functions below are the
Python API, each a thin call into those modules:

    import lungxray
    result = lungxray.run("DATA", "runs/api", model="mlp", trials=4, epochs=8)
    print(result.metrics["accuracy"], result.metrics["ci95"]["accuracy"])
    predictor = lungxray.load("runs/api")          # the run folder or its model/
    predictor.predict(["x1.jpeg", "x2.png"])       # [{"path", "class", "probabilities", "ood_score",
                                                   #   "in_distribution"}, ...]

Options are the settings' field names (``lungxray.config``): ``trials``, ``epochs``, ``img_size``,
``seed``, ``rotation``, ... as keyword arguments; they build one ``job.Job``, as the CLI's flags do.
"""

from __future__ import annotations

from lungxray.version import __version__

__all__ = ["__version__", "cross_validate", "load", "run"]


def run(data, out, **options):
    """The whole job, as ``lungxray run``: returns ``pipeline.RunResult`` (``summary``, ``metrics``).
    ``options``: ``model``, ``final_epochs``, ``external`` (folders from other hospitals to evaluate
    the final model on), ``force``, ``progress`` and every setting by its field name."""
    from lungxray.config import CVConfig
    from lungxray.job import Job, option_names
    from lungxray.pipeline import run as run_job

    _refuse(options, {"params"} | option_names(CVConfig), "run", "cross_validate")
    return run_job(Job.from_options(data, out, **options))


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


def load(bundle, backend: str = "auto"):
    """A verified, loaded model bundle (a run folder works too): ``predictor.Predictor``."""
    from lungxray.predictor import Predictor

    return Predictor(bundle, backend=backend)
