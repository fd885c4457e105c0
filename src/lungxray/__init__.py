"""lungxray: a folder of labelled chest X-rays in, a tuned, honestly evaluated, safely saved classifier out.

The package holds one module per pipeline stage (config, data, splits, models, train, tune, evaluate,
bundle, pipeline, cv, cli). Importing it does no work and imports no heavy dependency; the three
functions below are the Python API, each a thin call into those modules:

    import lungxray
    result = lungxray.run("DATA", "runs/api", model="mlp", trials=4, epochs=8)
    print(result.metrics["accuracy"], result.metrics["ci95"]["accuracy"])
    predictor = lungxray.load("runs/api")          # the run folder or its model/
    predictor.predict(["x1.jpeg", "x2.png"])       # [{"path", "class", "probabilities", "ood_score",
                                                   #   "in_distribution"}, ...]

Options are the settings' field names (``lungxray.config``): ``trials``, ``epochs``, ``img_size``,
``seed``, ``rotation``, ... as keyword arguments.
"""

from __future__ import annotations

from lungxray.version import __version__

__all__ = ["__version__", "cross_validate", "load", "run"]


def run(data, out, **options):
    """The whole job, as ``lungxray run``: returns ``pipeline.RunResult`` (``summary``, ``metrics``).
    ``options``: ``model``, ``final_epochs``, ``external`` (folders from other hospitals to evaluate
    the final model on), ``force``, ``progress`` and every setting by its field name."""
    from lungxray.job import Job
    from lungxray.pipeline import run as run_job

    return run_job(Job.from_options(data, out, **options))


def cross_validate(data, out, *, params: dict | None = None, **options) -> dict:
    """k-fold cross-validation, as ``lungxray cv``: returns cv.json's content. ``params``: fixed
    hyperparameters for every fold (default: the model's); ``options`` as for ``run``, with
    ``folds``, ``repeats`` and ``tune``."""
    from lungxray.cv import cross_validate as cv
    from lungxray.job import Job

    return cv(Job.from_options(data, out, **options), params)


def load(bundle, backend: str = "auto"):
    """A verified, loaded model bundle (a run folder works too): ``predictor.Predictor``."""
    from lungxray.predictor import Predictor

    return Predictor(bundle, backend=backend)
