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

__version__ = "0.1.0"


def _configs(options: dict) -> dict:
    """The settings dataclasses from keyword ``options`` (field names); an unknown name is an error."""
    from dataclasses import fields

    from lungxray.config import AugmentConfig, DataConfig, SplitConfig, TrainConfig, TuneConfig
    from lungxray.errors import ConfigError

    classes = {"data": DataConfig, "split": SplitConfig, "tune": TuneConfig, "augment": AugmentConfig}
    known = {f.name for cls in (*classes.values(), TrainConfig) for f in fields(cls)} - {"augment"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}", hint=f"known: {', '.join(sorted(known))}")
    pick = lambda cls: {f.name: options[f.name] for f in fields(cls) if f.name in options}  # noqa: E731
    built = {name: cls(**pick(cls)) for name, cls in classes.items()}
    built["train"] = TrainConfig(**{k: v for k, v in pick(TrainConfig).items() if k != "augment"},
                                 augment=built.pop("augment"))  # fmt: skip
    return built


def run(data, out, *, model: str = "cnn", final_epochs: int | None = None, external=(), force: bool = False,
        progress: bool = True, **options):  # fmt: skip
    """The whole job, as ``lungxray run``: returns ``pipeline.RunResult`` (``summary``, ``metrics``).
    ``external``: folders from other hospitals to evaluate the final model on (``--external``)."""
    from pathlib import Path

    from lungxray.pipeline import run as run_pipeline

    c = _configs(options)
    return run_pipeline(Path(data), Path(out), model, c["data"], c["split"], c["tune"], c["train"],
                        final_epochs=final_epochs, external=[Path(e) for e in external], force=force,
                        progress=progress)  # fmt: skip


def cross_validate(data, out, *, model: str = "cnn", folds: int = 5, repeats: int = 1, params: dict | None = None,
                   tune: bool = False, force: bool = False, progress: bool = True, **options) -> dict:  # fmt: skip
    """k-fold cross-validation, as ``lungxray cv``: returns cv.json's content."""
    from pathlib import Path

    from lungxray.cv import cross_validate as cv

    c = _configs(options)
    return cv(Path(data), Path(out), model, c["data"], c["train"], folds=folds, repeats=repeats, params=params,
              tune=tune, tune_cfg=c["tune"], force=force, progress=progress)  # fmt: skip


def load(bundle, backend: str = "auto"):
    """A verified, loaded model bundle (a run folder works too): ``bundle.Predictor``."""
    from lungxray.bundle import Predictor

    return Predictor(bundle, backend=backend)
