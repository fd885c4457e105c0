"""The failures a user can fix, all under one base: ``LungxrayError``.

Each carries a message (what was received, what was expected) and, where there is one, a hint (what
to do about it). The CLI prints both and exits with code 2; any other exception is a bug in lungxray
or a library and keeps its traceback. The specific classes also derive from the built-in exception
a Python caller would expect (``ValueError``, ``FileExistsError``, ...). Imports nothing.
"""

from __future__ import annotations


class LungxrayError(Exception):
    """A failure the user can fix; ``hint`` says how (None: the message already does)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(LungxrayError, ValueError):
    """A setting is out of range; the message names the flag to change."""


class DataError(LungxrayError, ValueError):
    """The dataset folder cannot be used as given."""


class UnusableImage(LungxrayError, ValueError):
    """One file cannot be used; its message is the one-line reason shown to the user."""


class BundleError(LungxrayError, ValueError):
    """The model bundle folder is missing, incomplete or altered."""


class UnknownModelError(LungxrayError, KeyError):
    """The model name is not registered; the message lists the known ones."""


class InitWeightsError(LungxrayError, ValueError):
    """An ``--init-weights`` file cannot be read or does not fit the model."""


class LeakageError(LungxrayError, RuntimeError):
    """Two parts of a split share an image or a duplicate group."""


class OutputExistsError(LungxrayError, FileExistsError):
    """An output folder already holds results that a command would replace."""


class MissingInputError(LungxrayError, FileNotFoundError):
    """A file or folder a command reads from is not there."""


class ParamsError(LungxrayError, ValueError):
    """A hyperparameter file, or the choice between --params and --tune, is not usable."""


class StudyError(LungxrayError, RuntimeError):
    """The Optuna study cannot be used or produced no usable trial."""


class TrainingDiverged(LungxrayError, FloatingPointError):
    """The training loss became NaN or infinite before any epoch finished."""
