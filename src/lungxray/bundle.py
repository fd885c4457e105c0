"""The model bundle (a folder: safetensors weights, config.json, metrics.json, checksums.json,
optionally model.onnx), the ``Predictor`` that loads one, and ``export_onnx``.

Loading never unpickles: weights come from safetensors (or the ONNX graph, run by ONNX Runtime),
everything else is JSON, and every file is checked against its SHA-256 before use. Every file is
written to a temporary name, then renamed. Imports nothing from the training modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lungxray import __version__
from lungxray.config import DICOM_KEEP, EQUALIZE, Preprocessing
from lungxray.decode import decode, read_image_file
from lungxray.errors import BundleError, OutputExistsError, UnusableImage
from lungxray.infer import predict_logits, to_tensor
from lungxray.models import create_model
from lungxray.ood import METHOD, N_STATISTICS, THUMB, OODScore, ood_fields
from lungxray.runfolder import MODEL, write_text

FORMAT = "lungxray-bundle"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
ONNX = "model.onnx"
CONFIG = "config.json"
METRICS = "metrics.json"  # the test metrics of the run that trained it, when it had a test split
CHECKSUMS = "checksums.json"
SEEN = "seen.json"  # SHA-256 of the files the model was trained and validated on
CARD = "MODEL_CARD.md"  # the model card (card.py), written by run and train
OOD = "ood.safetensors"  # the out-of-distribution score's fitted tensors (lungxray.ood)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_bundle(
    folder: Path,
    model: torch.nn.Module,
    config: dict,
    metrics: dict | None = None,
    *,
    seen: dict[str, list[str]] | None = None,
    ood: OODScore | None = None,
    card: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the bundle to ``folder``; an existing non-empty folder needs ``overwrite=True``.
    ``card``: the model card's Markdown (MODEL_CARD.md, ``card.model_card``).

    ``seen``: the SHA-256 of every file's bytes by part (``{"train": [...], "val": [...]}``), so that
    evaluation anywhere recognises the images the model has already seen, whatever their path.
    ``ood``: the fitted out-of-distribution score (its tensors in ood.safetensors, its threshold
    and method in config.json's "ood")."""
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
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, staging / WEIGHTS, metadata={"format": FORMAT})
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__, **config}
        if ood is not None:
            from safetensors.numpy import save_file as save_arrays

            save_arrays(ood.tensors(), str(staging / OOD), metadata={"format": FORMAT, "method": ood.info["method"]})
            config["ood"] = ood.info
        write_text(staging / CONFIG, json.dumps(config, indent=2, default=str) + "\n")
        if seen is not None:
            write_text(staging / SEEN, json.dumps({part: sorted(set(h)) for part, h in seen.items()}) + "\n")
        if metrics is not None:
            write_text(staging / METRICS, json.dumps(metrics, indent=2) + "\n")
        if card is not None:
            write_text(staging / CARD, card)
        write_checksums(staging)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.old")
            os.replace(folder, old)
            os.replace(staging, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def attach_metrics(folder: Path, metrics: dict) -> None:
    """Add (or replace) metrics.json in a bundle and update its checksums, through a staging copy."""
    with restaged(folder) as staging:
        write_text(staging / METRICS, json.dumps(metrics, indent=2) + "\n")


@contextlib.contextmanager
def restaged(folder: Path) -> Iterator[Path]:
    """A staging copy of the bundle to change; when the block succeeds its checksums are rewritten
    and it replaces the bundle (the old one renamed aside, the new one renamed in, a moment apart),
    so a crash or a full disk while writing leaves the old bundle whole, never an unlisted or
    half-written file that would refuse it."""
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    shutil.copytree(folder, staging)
    try:
        yield staging
        write_checksums(staging)
        old = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.old")
        os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_checksums(folder: Path) -> None:
    """(Re)write checksums.json over every other file in the bundle."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name != CHECKSUMS)
    sums = {p.name: _sha256(p) for p in files}
    write_text(Path(folder) / CHECKSUMS, json.dumps(sums, indent=2) + "\n")


def bundle_folder(folder: Path) -> Path:
    """``folder``, or its model/ when given a run folder (which holds the bundle there)."""
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file() and (folder / MODEL / CHECKSUMS).is_file():
        return folder / MODEL
    return folder


def verify_bundle(folder: Path) -> dict:
    """Check every file against checksums.json; return the parsed config.json."""
    return _verify(folder)[0]


def _verify(folder: Path) -> tuple[dict, dict[str, str]]:
    """``verify_bundle``, also returning the manifest it checked (read once)."""
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        inside = folder / MODEL
        hint = (
            f"did you mean {inside}? A run folder holds the bundle in model/"
            if (inside / CHECKSUMS).is_file()
            else "pass the model/ folder written by `lungxray run` or `lungxray train`"
        )
        raise BundleError(f"{folder} is not a lungxray model bundle (no checksums.json)", hint=hint)
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
    model and its hyperparameters within the registry's limits, a finite positive temperature."""
    from lungxray.models import REGISTRY, check_hyperparameters

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
    classes = config.get("classes")
    if not isinstance(classes, list) or not 2 <= len(classes) <= 1000 or len(set(classes)) != len(classes):
        raise bad("classes must be a list of 2 to 1000 distinct names")
    if not all(isinstance(c, str) and c for c in classes):
        raise bad("every class name must be a non-empty string")
    prep = config.get("preprocessing") or {}
    if prep.get("equalize", "none") not in EQUALIZE or prep.get("crop_borders", False) not in (True, False):
        raise bad(f"preprocessing.equalize must be one of {', '.join(EQUALIZE)} and crop_borders true or false")
    keep = prep.get("dicom_keep", [])
    if not isinstance(keep, list) or not set(keep) <= set(DICOM_KEEP):
        raise bad(f"preprocessing.dicom_keep must be a list of {', '.join(DICOM_KEEP)}")
    size = prep.get("img_size")
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 1024:
        raise bad(f"preprocessing.img_size must be a whole number in 8..1024, got {size!r}")
    model = config.get("model")
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
    _check_size(model, len(classes), size, bad)
    ood = config.get("ood")
    if ood is not None:
        threshold = ood.get("threshold") if isinstance(ood, dict) else None
        if not isinstance(ood, dict) or ood.get("method") != METHOD:
            raise bad(f"ood must be an object with method {METHOD!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < float("inf"):
            raise bad(f"ood.threshold must be a finite number above 0, got {threshold!r}")
    temperature = config.get("calibration", {}).get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise bad(f"calibration.temperature must be a finite number above 0, got {temperature!r}")


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


class Predictor:
    """A loaded bundle: ``predict_arrays`` and ``predict_files`` return class probabilities.

    ``backend``: "torch", "onnx" (ONNX Runtime on the bundle's model.onnx), or "auto": ONNX
    Runtime when the bundle holds a verified model.onnx. Explanations always use the torch model.
    ``threads``: ONNX Runtime's threads per call (0: one per core).
    """

    def __init__(self, folder: Path, backend: str = "auto", threads: int = 0) -> None:
        self.folder = bundle_folder(folder)
        self.config_, self.checksums_ = _verify(self.folder)
        if backend not in ("auto", "torch", "onnx"):
            raise ValueError(f"backend must be auto, torch or onnx, got {backend!r}")
        if backend == "onnx" and not (self.folder / ONNX).is_file():
            raise BundleError(f"{self.folder} has no {ONNX}; run `lungxray export {self.folder} --onnx` first")
        self.backend_ = "onnx" if backend != "torch" and (self.folder / ONNX).is_file() else "torch"
        self.session_ = None
        if self.backend_ == "onnx":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per core
            try:
                self.session_ = onnxruntime.InferenceSession(
                    str(self.folder / ONNX), options, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # ONNX Runtime raises its own classes for a broken graph
                raise BundleError(
                    f"{self.folder / ONNX} is not a graph ONNX Runtime can run ({type(exc).__name__})",
                    hint=f"run `lungxray export {self.folder} --onnx` again, or pass --backend torch",
                ) from None
        self.classes_: list[str] = self.config_["classes"]
        # How files are decoded for this model, as in training (validate_config checked the values).
        self.preprocessing_ = Preprocessing.from_json(self.config_["preprocessing"])
        model_cfg = self.config_["model"]
        self.model_ = create_model(
            model_cfg["name"],
            tuple(model_cfg["input_shape"]),
            len(self.classes_),
            members=int(model_cfg.get("members", 1)),
            **model_cfg["hyperparameters"],
        )
        state = load_file(self.folder / WEIGHTS)  # safetensors: tensors only, nothing executed
        try:
            self.model_.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BundleError(
                f"weights in {self.folder / WEIGHTS} do not fit the model in config.json: {exc}"
            ) from None
        self.model_.eval()
        # The run's test metrics, only when checksums.json lists them (an unlisted file is ignored).
        self.metrics_: dict | None = (
            json.loads((self.folder / METRICS).read_text()) if METRICS in self.checksums_ else None
        )
        # The model card (MODEL_CARD.md), written by run and train; None for a bundle without one.
        self.card_: str | None = (self.folder / CARD).read_text() if CARD in self.checksums_ else None
        # Content hashes of the training and validation files (empty: a bundle that did not record them).
        seen = json.loads((self.folder / SEEN).read_text()) if SEEN in self.checksums_ else {}
        self.seen_: frozenset[str] = frozenset(h for hashes in seen.values() for h in hashes)
        # Temperature scaling fitted on the validation split at training time (1.0: none).
        self.temperature_: float = float((self.config_.get("calibration") or {}).get("temperature", 1.0))
        # The out-of-distribution score (None: a bundle from before lungxray fitted one).
        self.ood_: OODScore | None = self._load_ood()

    def _load_ood(self) -> OODScore | None:
        if "ood" not in self.config_:
            return None
        if OOD not in self.checksums_:
            raise BundleError(f"{self.folder / CONFIG} names an out-of-distribution score but {OOD} is not listed")
        from safetensors.numpy import load_file as load_arrays

        try:
            tensors = load_arrays(str(self.folder / OOD))
        except Exception as exc:  # safetensors raises its own SafetensorError on a bad header
            raise BundleError(f"{self.folder / OOD} is not a readable safetensors file ({exc})") from None
        n = tensors.get("location", np.zeros(0)).shape
        shapes = {
            "pca_mean": (THUMB**2,),
            "pca_components": (n[0] - N_STATISTICS if n else -1, THUMB**2),
            "location": n,
            "precision": n * 2,
        }
        misshapen = set(tensors) != set(shapes) or any(tensors[k].shape != v for k, v in shapes.items())
        if misshapen or not n or n[0] <= N_STATISTICS:
            raise BundleError(f"{self.folder / OOD} does not hold the tensors of {METHOD}; re-export the model")
        return OODScore({k: v.astype(np.float64) for k, v in tensors.items()}, self.config_["ood"])

    def ood_scores(self, images: np.ndarray) -> np.ndarray | None:
        """(N, H, W) uint8 preprocessed images -> (N,) out-of-distribution scores (above 1: flagged),
        or None for a bundle without the score."""
        return None if self.ood_ is None else self.ood_.score(images)

    @torch.no_grad()
    def predict_logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, H, W) uint8 preprocessed images -> (N, n_classes) raw logits, before any temperature."""
        x = to_tensor(images)  # (N, 1, H, W)
        if self.session_ is not None:
            return np.concatenate(
                [
                    self.session_.run(None, {"image": x[i : i + batch_size].numpy()})[0]
                    for i in range(0, len(x), batch_size)
                ]
            )
        return predict_logits(self.model_, x, batch_size).numpy()

    def predict_arrays(self, images: np.ndarray, batch_size: int = 256, calibrated: bool = True) -> np.ndarray:
        """(N, H, W) uint8 preprocessed images -> (N, n_classes) probabilities, temperature-scaled
        unless ``calibrated=False``."""
        logits = torch.from_numpy(self.predict_logits(images, batch_size)).double()  # float32 rounds 1 - 1e-8 to 1
        probs = torch.softmax(logits / (self.temperature_ if calibrated else 1.0), dim=1).numpy()
        if not np.isfinite(probs).all():  # never report a class for NaN probabilities
            raise BundleError(
                f"the model in {self.folder} produced non-finite probabilities", hint="re-train or re-export it"
            )
        return probs

    def decode_files(self, paths: list[Path]) -> tuple[list[dict], np.ndarray]:
        """``({"path"} or {"path", "error"} per path, (N_good, H, W) uint8 images of the readable ones)``."""
        results, arrays = [], []
        for path in paths:
            try:
                arrays.append(self.decode(read_image_file(Path(path)), name=Path(path).name))
                results.append({"path": str(path)})
            except (UnusableImage, OSError) as exc:
                results.append({"path": str(path), "error": str(exc)})
        size = self.preprocessing_.img_size
        return results, np.stack(arrays) if arrays else np.zeros((0, size, size), dtype=np.uint8)

    def decode(self, data: bytes, name: str = "") -> np.ndarray:
        """An image file's bytes -> (H, W) uint8, preprocessed as the model was trained; ``name``,
        the file's, marks a DICOM file without its preamble (``.dcm``)."""
        return decode(data, self.preprocessing_, name)

    def display(self, data: bytes, name: str = "") -> np.ndarray:
        """An image file's bytes -> (H, W) uint8 at its own aspect ratio (at most 1024 px), cropped
        as the model's input is: the picture an explanation is drawn on."""
        from lungxray.decode import display_gray

        return display_gray(data, self.preprocessing_, name)

    def describe(self, probs: np.ndarray, ood_score: float | None = None) -> dict:
        """One image's probabilities (n_classes,) and out-of-distribution score -> ``{"class",
        "probabilities": {name: p}, "ood_score", "in_distribution"}`` (the last two None for a
        bundle without the score)."""
        return {
            "class": self.classes_[int(probs.argmax())],
            "probabilities": {c: float(v) for c, v in zip(self.classes_, probs, strict=True)},
            **ood_fields(ood_score),
        }

    def predict(self, images) -> list[dict] | np.ndarray:
        """Image files (paths, str or Path, or folders of them) -> one dict per file, as
        ``predict_files``; a (N, H, W) uint8 array of preprocessed images -> (N, C) probabilities."""
        if isinstance(images, np.ndarray):
            return self.predict_arrays(images)
        from lungxray.decode import image_files

        return self.predict_files(image_files([images] if isinstance(images, (str, Path)) else list(images)))

    def predict_files(self, paths: list[Path]) -> list[dict]:
        """One dict per path: ``{"path", "class", "probabilities", "ood_score", "in_distribution"}``
        or ``{"path", "error"}``."""
        results, images = self.decode_files(paths)
        if len(images):
            good = [r for r in results if "error" not in r]
            scores = self.ood_scores(images)
            for k, (r, probs) in enumerate(zip(good, self.predict_arrays(images), strict=True)):
                r.update(self.describe(probs, None if scores is None else scores[k]))
        return results


def export_onnx(folder: Path, check_images: np.ndarray | None = None) -> tuple[Path, float]:
    """Write model.onnx into the bundle (batch size left dynamic) and update its checksums.

    Returns the path and the largest absolute difference between ONNX Runtime's and PyTorch's
    probabilities on ``check_images`` ((N, H, W) uint8; random images when None); a difference of
    1e-4 or more is an error and leaves no model.onnx behind.
    """

    folder = bundle_folder(folder)
    torch_predictor = Predictor(folder, backend="torch")
    size = torch_predictor.preprocessing_.img_size
    dummy = torch.zeros(1, 1, size, size)
    if check_images is None:
        check_images = np.random.default_rng(0).integers(0, 256, (8, size, size), dtype=np.uint8)
    with restaged(folder) as staging:  # the bundle changes only once the graph passed its check
        gap = _export_into(torch_predictor, staging, dummy, check_images)
    return folder / ONNX, gap


def _add_metadata(path: Path, predictor: Predictor) -> None:
    """What ONNX Runtime alone needs to use the graph: class names, preprocessing, temperature."""
    import onnx

    graph = onnx.load(str(path))
    for key, value in (
        ("lungxray.classes", json.dumps(predictor.classes_)),
        ("lungxray.preprocessing", json.dumps(predictor.config_["preprocessing"])),
        ("lungxray.temperature", repr(predictor.temperature_)),
        (
            "lungxray.input",
            "image: (N, 1, H, W) float32 grayscale in [0, 1]; output logits: divide by the temperature, softmax",
        ),
    ):
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(path))


def _export_into(torch_predictor: Predictor, staging: Path, dummy: torch.Tensor, check_images: np.ndarray) -> float:
    """Write model.onnx into ``staging`` and return its largest probability gap to PyTorch's."""
    import warnings

    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript; it still writes a standard graph that ONNX Runtime runs.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            torch_predictor.model_,
            (dummy,),
            str(staging / ONNX),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    _add_metadata(staging / ONNX, torch_predictor)
    write_checksums(staging)
    onnx_probs = Predictor(staging, backend="onnx").predict_arrays(check_images)
    gap = float(np.abs(onnx_probs - torch_predictor.predict_arrays(check_images)).max())
    if gap >= 1e-4:
        raise BundleError(f"ONNX Runtime and PyTorch disagree by {gap:.2e} on the check images; model.onnx not kept")
    return gap
