"""The model bundle's format: a folder of safetensors weights, config.json, checksums.json and,
optionally, metrics.json, seen.json, ood.safetensors, MODEL_CARD.md, headline.json and model.onnx.

``save_bundle`` writes one, ``attach_metrics`` and ``restaged`` change one, ``verify_bundle`` and
``verify_manifest`` check every file against its SHA-256 and the config's values before anything
is built from them, and ``bundle_config`` / ``bundle_metrics`` read what a report shows. Every
file is written to a temporary name (the whole bundle to a staging folder), then renamed. Loading
a bundle to predict is ``predictor.Predictor``; ONNX export is ``onnx_export``. Imports nothing
from the training modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from lungxray.config import DICOM_KEEP, EQUALIZE, Preprocessing
from lungxray.errors import BundleError, OutputExistsError
from lungxray.ood import METHOD, THRESHOLD_RANGE, OODScore
from lungxray.runfolder import MODEL, read_json, write_text
from lungxray.version import __version__

FORMAT = "lungxray-bundle"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
ONNX = "model.onnx"
CONFIG = "config.json"
METRICS = "metrics.json"  # the test metrics of the run that trained it, when it had a test split
CHECKSUMS = "checksums.json"
SEEN = "seen.json"  # SHA-256 of the files the model was trained and validated on
CARD = "MODEL_CARD.md"  # the model card (card.py), written by run and train
HEADLINE = "headline.json"  # the test's and external sets' figures against chance (card.headline), written by run
OOD = "ood.safetensors"  # the out-of-distribution score's fitted tensors (lungxray.ood)


@dataclass(frozen=True)
class BundleConfig:
    """config.json's content: the classes, the model to rebuild, how its input is preprocessed, and
    how it was trained and calibrated. ``to_json`` is what ``save_bundle`` writes; ``from_json``
    reads a config.json that ``verify_manifest`` checked."""

    classes: tuple[str, ...]
    model: dict
    """name, members, hyperparameters and input_shape ([1, size, size])."""
    preprocessing: Preprocessing
    training: dict = field(default_factory=dict)
    """The final training's settings and what came of them (epochs run, the kept epoch, the split)."""
    calibration: dict = field(default_factory=dict)
    """The temperature fitted on validation (``metrics.calibrate``) and whether it is applied."""
    training_data: dict = field(default_factory=dict)
    """Where the images came from, in words (``--data-sources``)."""
    ood: dict | None = None
    """The out-of-distribution score's method and threshold (its tensors: ood.safetensors)."""
    task: str = "single"
    """"multilabel": a sigmoid per class (each a finding), else one softmax over the classes."""
    thresholds: dict | None = None
    """Multi-label: each finding's decision threshold, on its calibrated probability."""
    temperatures: dict | None = None
    """Multi-label: each finding's temperature T, its probability sigmoid(logit / T)."""

    @property
    def temperature(self) -> float:
        """The temperature probabilities are scaled by (1.0: none)."""
        return float(self.calibration.get("temperature", 1.0))

    @property
    def class_bias(self) -> list[float] | None:
        """Offsets added to the logits before the temperature (``--val-by site``), or None."""
        return self.calibration.get("class_bias")

    def to_json(self) -> dict:
        sections = {
            "classes": list(self.classes),
            "model": self.model,
            "preprocessing": self.preprocessing.to_json(),
            "training": self.training,
            "calibration": self.calibration,
            "training_data": self.training_data,
        }
        if self.task == "multilabel":  # a single-label config.json names no task
            sections |= {"task": self.task, "thresholds": self.thresholds, "temperatures": self.temperatures}
        return sections | ({"ood": self.ood} if self.ood is not None else {})

    @classmethod
    def from_json(cls, config: dict) -> BundleConfig:
        """The sections of a checked config.json (absent optional ones: empty)."""
        optional = {k: config.get(k) or {} for k in ("training", "calibration", "training_data")}
        preprocessing = Preprocessing.from_json(config["preprocessing"])
        multilabel = {k: config.get(k) for k in ("thresholds", "temperatures")} | {"task": config.get("task", "single")}
        return cls(
            tuple(config["classes"]), config["model"], preprocessing, **optional, ood=config.get("ood"), **multilabel
        )


def _sha256(path: Path) -> str:
    """The file's SHA-256, read in chunks: a listed file may be larger than memory."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class BundleExtras:
    """What a bundle may hold besides its weights and config.json.

    ``metrics``: the test metrics (metrics.json). ``seen``: the SHA-256 of every file's bytes by
    part (``{"train": [...], "val": [...]}``), so that evaluation anywhere recognises the images
    the model has already seen, whatever their path. ``ood``: the fitted out-of-distribution score
    (its tensors in ood.safetensors, its threshold and method in config.json's "ood"). ``card``:
    the model card's Markdown (MODEL_CARD.md, ``card.model_card``)."""

    metrics: dict | None = None
    seen: dict[str, list[str]] | None = None
    ood: OODScore | None = None
    card: str | None = None


def save_bundle(
    folder: Path, model: torch.nn.Module, config: dict, extras: BundleExtras | None = None, *, overwrite: bool = False
) -> Path:
    """Write the bundle of ``model`` and its ``config`` (with ``extras``) to ``folder``; an existing
    non-empty folder needs ``overwrite=True``."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{folder} already holds a model", hint="pass --force to replace it, or choose another --out"
        )
    # Written whole into a temporary folder, then renamed into place: a failure half-way (a full
    # disk) leaves the old bundle, or none, never a partial one that blocks the next run.
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    staging.mkdir()
    try:
        _write_files(staging, model, config, extras or BundleExtras())
        write_checksums(staging)
        _swap_in(staging, folder)
    except SafetensorError as exc:  # safetensors' own error for what Python raises as OSError (a full disk)
        reason = str(exc).removeprefix("Error while serializing: ").split(" at path ")[0]  # the staging path
        raise BundleError(f"cannot write the model bundle {folder}: {reason}",
                          hint=f"free space on the disk of {folder.parent}, or choose another --out; "
                          "the folder holds no half-written bundle") from exc  # fmt: skip
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _write_files(staging: Path, model: torch.nn.Module, config: dict, extras: BundleExtras) -> None:
    """Every file of the bundle but checksums.json, into ``staging``."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, staging / WEIGHTS, metadata={"format": FORMAT})
    # "created": when the bundle was written, at the end of its training (UTC); a config passed
    # in whole from another bundle keeps its own.
    made = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__, "created": _now()}
    config = made | config
    if extras.ood is not None:
        from safetensors.numpy import save_file as save_arrays

        ood = extras.ood
        save_arrays(ood.tensors(), str(staging / OOD), metadata={"format": FORMAT, "method": ood.info["method"]})
        config["ood"] = ood.info
    write_text(staging / CONFIG, json.dumps(config, indent=2, default=str) + "\n")
    if extras.seen is not None:
        write_text(staging / SEEN, json.dumps({part: sorted(set(h)) for part, h in extras.seen.items()}) + "\n")
    if extras.metrics is not None:
        write_text(staging / METRICS, json.dumps(extras.metrics, indent=2) + "\n")
    if extras.card is not None:
        write_text(staging / CARD, extras.card)


def _now() -> str:
    """The current UTC time, ``YYYY-MM-DDTHH:MM:SSZ``."""
    import datetime

    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _swap_in(staging: Path, folder: Path) -> None:
    """Rename the finished ``staging`` folder to ``folder``: an old bundle there is renamed aside
    first and removed after, so the two renames are a moment apart and neither leaves a mix."""
    if folder.exists():
        old = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.old")
        os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, folder)


def attach_metrics(folder: Path, metrics: dict) -> None:
    """Add (or replace) metrics.json in a bundle and update its checksums, through a staging copy."""
    with restaged(folder) as staging:
        write_text(staging / METRICS, json.dumps(metrics, indent=2) + "\n")


@contextlib.contextmanager
def restaged(folder: Path) -> Iterator[Path]:
    """A staging copy of the bundle to change; when the block succeeds its checksums are rewritten
    and it replaces the bundle (``_swap_in``), so a crash or a full disk while writing leaves the
    old bundle whole, never an unlisted or half-written file that would refuse it."""
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    shutil.copytree(folder, staging)
    try:
        yield staging
        write_checksums(staging)
        _swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_checksums(folder: Path) -> None:
    """(Re)write checksums.json over every other file in the bundle."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name != CHECKSUMS)
    sums = {p.name: _sha256(p) for p in files}
    write_text(Path(folder) / CHECKSUMS, json.dumps(sums, indent=2) + "\n")


def is_bundle(folder: Path) -> bool:
    """Whether ``folder`` holds a bundle (its checksums.json), checked or not."""
    return (Path(folder) / CHECKSUMS).is_file()


def bundle_folder(folder: Path) -> Path:
    """``folder``, or its model/ when given a run folder (which holds the bundle there)."""
    folder = Path(folder)
    if not is_bundle(folder) and is_bundle(folder / MODEL):
        return folder / MODEL
    return folder


def bundle_config(folder: Path) -> dict | None:
    """config.json of the bundle in ``folder`` as written, for display (the files are not checked:
    ``verify_bundle`` is for loading); None when ``folder`` holds no bundle."""
    return read_json(folder, CONFIG) if is_bundle(folder) else None


def bundle_metrics(folder: Path) -> dict | None:
    """The test metrics stored in the bundle in ``folder``, when its checksums.json lists them; else None."""
    if not is_bundle(folder):
        return None
    listed = read_json(folder, CHECKSUMS) or {}
    return read_json(folder, METRICS) if METRICS in listed else None


def verify_bundle(folder: Path) -> dict:
    """Check every file against checksums.json; return the parsed config.json."""
    return verify_manifest(folder)[0]


def verify_manifest(folder: Path) -> tuple[dict, dict[str, str]]:
    """``verify_bundle``, also returning the manifest it checked (read once): (config, {file: sha256})."""
    folder = Path(folder)
    if not is_bundle(folder):
        inside = folder / MODEL
        hint = (
            f"did you mean {inside}? A run folder holds the bundle in model/"
            if is_bundle(inside)
            else "pass the model/ folder written by `lungxray run` or `lungxray train`"
        )
        what = "is not a lungxray model bundle (no checksums.json)" if folder.exists() else "does not exist"
        raise BundleError(f"{folder} {what}", hint=hint)
    sums = _read_manifest(folder)
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{path} is missing from the bundle; re-export the model")
        if _sha256(path) != expected:
            raise BundleError(
                f"{path} does not match its checksum: the file was altered or damaged; "
                "re-export the model rather than loading it"
            )
    try:
        config = json.loads((folder / CONFIG).read_text())
    except ValueError as exc:
        raise BundleError(f"{folder / CONFIG} is not valid JSON: {exc}") from None
    validate_config(config, folder)
    return config, sums


def _read_manifest(folder: Path) -> dict[str, str]:
    """checksums.json as {file name: sha256}: a bundle is exactly its manifest, so a file present
    but unlisted, a listed name that is not a plain file name in the folder, or a malformed
    manifest refuses the bundle."""
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except ValueError as exc:
        raise BundleError(f"{folder}/checksums.json is not valid JSON: {exc}") from None
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise BundleError(f"{folder}/checksums.json is not an object of file name -> SHA-256 strings")
    for name in sums:
        if Path(name).name != name or name in ("", ".", "..") or name == CHECKSUMS:
            raise BundleError(f"{folder}/checksums.json lists {name!r}, which is not a file of the bundle folder")
    for name in (CONFIG, WEIGHTS):
        if name not in sums:
            raise BundleError(f"{folder}/checksums.json does not list {name}; the bundle is incomplete")
    unlisted = sorted(p.name for p in folder.iterdir() if p.name != CHECKSUMS and p.name not in sums)
    if unlisted:
        raise BundleError(
            f"{folder} holds {', '.join(unlisted)}, which checksums.json does not list: the bundle was altered",
            hint="remove the file(s), or re-export the model (a file added to a bundle is never used unchecked)",
        )
    return sums


def validate_config(config: dict, folder: Path) -> None:
    """config.json's values, checked before anything is allocated: format, classes, image size,
    model and its hyperparameters within the registry's limits, a finite positive temperature, a
    multi-label model's thresholds and temperatures (``_check_task``). The checks run in that
    order; the first that fails is the error."""

    def bad(what: str) -> BundleError:
        return BundleError(f"{folder / CONFIG}: {what}", hint="re-export the model; a bundle is not edited by hand")

    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        found = (config.get("format"), config.get("format_version")) if isinstance(config, dict) else None
        raise BundleError(f"{folder} holds format {found}; this lungxray reads {FORMAT} v{FORMAT_VERSION}")
    for section in ("model", "preprocessing"):
        if not isinstance(config.get(section), dict):
            raise bad(f"{section} must be an object")
    if not isinstance(config.get("calibration", {}), dict):
        raise bad("calibration must be an object")
    classes, fewest = config.get("classes"), 1 if config.get("task") == "multilabel" else 2  # one finding is a model
    if not isinstance(classes, list) or not fewest <= len(classes) <= 1000 or len(set(classes)) != len(classes):
        raise bad(f"classes must be a list of {fewest} to 1000 distinct names")
    if not all(isinstance(c, str) and c for c in classes):
        raise bad("every class name must be a non-empty string")
    size = _checked_preprocessing(config.get("preprocessing") or {}, bad)
    _check_model(config.get("model"), len(classes), size, bad)
    _check_ood_and_temperature(config, bad)
    _check_task(config, classes, bad)


# The temperatures lungxray fits (metrics.TEMPERATURE_BOUNDS, not imported: it would bring
# scikit-learn to the serving side), and 1.0, which lies inside.
TEMPERATURE_RANGE = (0.05, 20.0)


def _within(value, bounds: tuple[float, float]) -> bool:
    """``value`` is a number (not a bool) in ``bounds``, ends included: NaN and infinities never are."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and bounds[0] <= value <= bounds[1]


def _checked_preprocessing(prep: dict, bad) -> int:
    """The preprocessing section's values; returns the image size."""
    flags = (prep.get("crop_borders", False), prep.get("site_normalise", False))
    if prep.get("equalize", "none") not in EQUALIZE or any(v not in (True, False) for v in flags):
        raise bad(
            f"preprocessing.equalize must be one of {', '.join(EQUALIZE)}; "
            "crop_borders and site_normalise true or false"
        )
    keep = prep.get("dicom_keep", [])
    if not isinstance(keep, list) or not set(keep) <= set(DICOM_KEEP):
        raise bad(f"preprocessing.dicom_keep must be a list of {', '.join(DICOM_KEEP)}")
    size = prep.get("img_size")
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 1024:
        raise bad(f"preprocessing.img_size must be a whole number in 8..1024, got {size!r}")
    return size


def _check_model(model, n_classes: int, size: int, bad) -> None:
    """The model section: a registered name, the input shape of the image size, the ensemble's
    members and hyperparameters within the registry's limits, and a size lungxray loads."""
    from lungxray.models import REGISTRY, check_hyperparameters

    if not isinstance(model, dict) or model.get("name") not in REGISTRY:
        raise bad(f"model.name must be one of {', '.join(sorted(REGISTRY))}")
    if model.get("input_shape") != [1, size, size]:
        raise bad(f"model.input_shape must be [1, {size}, {size}], got {model.get('input_shape')!r}")
    members = model.get("members", 1)
    if isinstance(members, bool) or not isinstance(members, int) or not 1 <= members <= 32:
        raise bad(f"model.members must be a whole number in 1..32, got {members!r}")
    hp = model.get("hyperparameters")
    problems = check_hyperparameters(model["name"], hp) if isinstance(hp, dict) else ["it is not an object"]
    if problems:
        raise bad("model.hyperparameters: " + "; ".join(problems))
    _check_size(model, n_classes, size, bad)


def _check_ood_and_temperature(config: dict, bad) -> None:
    """The out-of-distribution score's method and threshold, and the calibration temperature."""
    ood = config.get("ood")
    if ood is not None:
        threshold = ood.get("threshold") if isinstance(ood, dict) else None
        if not isinstance(ood, dict) or ood.get("method") != METHOD:
            raise bad(f"ood must be an object with method {METHOD!r}")
        if not _within(threshold, THRESHOLD_RANGE):  # beyond it, every image flagged or none
            low, high = THRESHOLD_RANGE
            raise bad(f"ood.threshold must be a distance in {low:g}..{high:g}, got {threshold!r}")
    temperature = config.get("calibration", {}).get("temperature", 1.0)
    if not _within(temperature, TEMPERATURE_RANGE):  # beyond it, probabilities of 0 and 1, or all alike
        low, high = TEMPERATURE_RANGE
        raise bad(f"calibration.temperature must be a number in {low:g}..{high:g}, got {temperature!r}")
    bias = config.get("calibration", {}).get("class_bias")
    if bias is not None and not (
        isinstance(bias, list)
        and len(bias) == len(config.get("classes", []))
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bias)
    ):
        raise bad(f"calibration.class_bias must list one finite number per class, got {bias!r}")


def _check_task(config: dict, findings: list[str], bad) -> None:
    """A multi-label bundle's thresholds and temperatures: one per finding of ``classes``, each
    threshold in (0, 1), each temperature in TEMPERATURE_RANGE. A single-label one holds neither."""
    task = config.get("task", "single")
    if task not in ("single", "multilabel"):
        raise bad(f'task must be "multilabel", or absent for a single-label model, got {task!r}')
    if task == "single":
        if extra := [k for k in ("thresholds", "temperatures") if k in config]:
            raise bad(f'{extra[0]} belongs to a multilabel model, and this one names no task "multilabel"')
        return
    low, high = TEMPERATURE_RANGE
    for key, valid, what in (
        ("thresholds", lambda v: _within(v, (0, 1)) and 0 < v < 1, "a number strictly between 0 and 1"),
        ("temperatures", lambda v: _within(v, TEMPERATURE_RANGE), f"a number in {low:g}..{high:g}"),
    ):
        values = config.get(key)
        if not isinstance(values, dict) or set(values) != set(findings):
            found = sorted(values) if isinstance(values, dict) else values
            raise bad(f"{key} must give every finding of classes ({', '.join(findings)}) and no other, got {found!r}")
        if wrong := [f for f in findings if not valid(values[f])]:
            raise bad(f"{key}[{wrong[0]!r}] must be {what}, got {values[wrong[0]]!r}")


MAX_PARAMETERS = 200_000_000  # ~800 MB of float32 weights; the registry's defaults hold 0.3-11 M


def _check_size(model: dict, n_classes: int, size: int, bad) -> None:
    """Build the architecture on the meta device (no memory) and refuse one too large to load."""
    from lungxray.models import create_model

    with torch.device("meta"):
        net = create_model(model["name"], (1, size, size), n_classes, members=model.get("members", 1),
                           **model["hyperparameters"])  # fmt: skip
    count = sum(p.numel() for p in net.parameters())
    if count > MAX_PARAMETERS:
        raise bad(f"the model would hold {count:,} parameters, more than the {MAX_PARAMETERS:,} lungxray loads")
