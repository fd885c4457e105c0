"""The ``Job``: everything a command needs, built once from the command line or the Python API.

A Job holds the data, the output folder, the model's name and every settings dataclass of
``config.py``; its constructor resolves them once against the model's recipe
into the trial and final training settings, and fails for an unknown model or a missing GPU before
any data is read. Stages (``pipeline``, ``cv``) take the Job whole and never re-derive a default.

Options keep one name everywhere: a settings field's name is its keyword in the Python API
(``lungxray.run(..., equalize="clahe")``), the attribute the CLI's flag sets, and its key in
config.json and run.json. ``Job.from_options`` builds a Job from such names; nothing here reads
files.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from lungxray import config
from lungxray.config import CVConfig, DataConfig, Preprocessing, SplitConfig, TrainConfig, TuneConfig
from lungxray.errors import ConfigError

# The settings dataclasses a Job holds, by the Job field that holds them.
SETTINGS = {"dataset": DataConfig, "split": SplitConfig, "search": TuneConfig, "train": TrainConfig, "cv": CVConfig}


def nested(cls) -> dict[str, type]:
    """The fields of dataclass ``cls`` that hold settings dataclasses themselves, with their class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def option_names(cls) -> set[str]:
    """Every option name of dataclass ``cls``: its plain fields and those of the dataclasses it nests."""
    inner = nested(cls)
    return {f.name for f in fields(cls) if f.name not in inner} | {n for c in inner.values() for n in option_names(c)}


def build(cls, values: dict):
    """An instance of settings dataclass ``cls`` from ``values`` (option name -> value); a name
    absent from ``values`` keeps its default. Nested settings are built from the same names."""
    inner = nested(cls)
    given = {f.name: values[f.name] for f in fields(cls) if f.name in values and f.name not in inner}
    return cls(**given | {name: build(c, values) for name, c in inner.items()})


@dataclass(frozen=True)
class Job:
    """One command's whole input, resolved. ``trial`` and ``final`` are ``train`` filled from the
    model's recipe: the settings of each trial of the search, and of the final training."""

    data: tuple[Path, ...]
    """The dataset: a folder of class folders, a CSV manifest, or several (each a site); one path
    may be given as such."""
    out: Path | None = None
    """The run (or cv) folder written; None: nothing is written (a worker)."""
    model: str = "cnn"
    """Registered model name (``models.REGISTRY``)."""
    dataset: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    search: TuneConfig = field(default_factory=TuneConfig)
    """The search's settings, with the trials run side by side filled from the recipe."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training settings as given (unset fields: the recipe's)."""
    cv: CVConfig = field(default_factory=CVConfig)
    final_epochs: int | None = None
    """Epochs of the final training (None: ``train.epochs``)."""
    params: Path | str | None = None
    """Hyperparameters of a final training or of every cv fold: a JSON file, or "defaults" for the
    model's registered ones; None: the run folder's best_params.json (train), the defaults (cv)."""
    external: tuple[Path, ...] = ()
    """Datasets from other hospitals the final model is evaluated on after the internal test."""
    force: bool = False
    """Replace what an earlier command left in ``out``."""
    progress: bool = True
    """Progress bars and lines on the terminal."""
    trial: TrainConfig = field(init=False)
    final: TrainConfig = field(init=False)

    def __post_init__(self) -> None:
        from lungxray.devices import autocast_dtype, resolve_device  # raise for a device or precision not there
        from lungxray.models import get_spec  # raises for an unknown model, listing the known ones

        recipe = get_spec(self.model).recipe
        autocast_dtype(self.train.precision, resolve_device(self.train.device))  # float16 on the CPU: refused now
        search = config.resolve_tune(self.search, recipe)
        given = config.resolve_train(self.train, recipe)  # the one place the recipe fills training settings
        final = replace(given, epochs=self.final_epochs) if self.final_epochs is not None else given
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("data", tuple(Path(d) for d in ([self.data] if isinstance(self.data, (str, Path)) else self.data)))
        if not self.data:
            raise ConfigError("no DATA given", hint="pass a folder of class folders or a CSV manifest")
        set_("out", Path(self.out) if self.out is not None else None)
        set_("external", tuple(Path(e) for e in self.external))
        set_("search", search)
        set_("trial", config.trial_settings(given, search))
        set_("final", final)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.dataset.preprocessing

    @property
    def data_named(self) -> str | list[str]:
        """DATA as run.json and cv.json record it: the path, or the list of paths."""
        return str(self.data[0]) if len(self.data) == 1 else [str(d) for d in self.data]

    @property
    def seed(self) -> int:
        """The seed of the split, the search and training (``--seed``)."""
        return self.split.seed

    @classmethod
    def from_options(cls, data, out=None, *, strict: bool = True, **options) -> Job:
        """A Job from option names (settings' field names and the Job's own plain fields), as the
        Python API and the CLI give them; with ``strict`` an unknown name is an error that lists
        the known ones (the CLI passes every parsed flag, some of them for itself)."""
        own = {f.name for f in fields(cls) if f.init and f.name not in SETTINGS} - {"data", "out"}
        known = own | {n for c in SETTINGS.values() for n in option_names(c)}
        unknown = sorted(set(options) - known)
        if strict and unknown:
            import difflib

            close = {name: difflib.get_close_matches(name, known, n=1) for name in unknown}
            hint = "; ".join(f"{k}: did you mean {v[0]}?" for k, v in close.items() if v)
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)}", hint=hint or f"known: {', '.join(sorted(known))}"
            )
        settings = {name: build(c, options) for name, c in SETTINGS.items()}
        return cls(data, out, **{k: v for k, v in options.items() if k in own}, **settings)
