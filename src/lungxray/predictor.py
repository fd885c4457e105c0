"""The ``Predictor``: a verified model bundle, loaded to predict class probabilities of image files,
their bytes, Pillow images or arrays, with their out-of-distribution scores. A multi-label bundle
(config.json's ``"task": "multilabel"``) answers one independent probability per finding instead,
and the findings at or above their thresholds.

Loading never unpickles: the weights come from safetensors (or the ONNX graph, run by ONNX
Runtime), everything else is JSON, and ``bundle.verify_manifest`` checks every file first. The
bundle's format (writing, checking) is ``bundle``; explanations are ``explain``. Imports nothing
from the training modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from lungxray.bundle import (
    CARD,
    CONFIG,
    HEADLINE,
    METRICS,
    ONNX,
    OOD,
    SEEN,
    WEIGHTS,
    BundleConfig,
    bundle_folder,
    verify_manifest,
)
from lungxray.config import Preprocessing
from lungxray.decode import decode, equalize_together, preprocess_image, read_image_file
from lungxray.errors import BundleError, MissingInputError, UnusableImage
from lungxray.infer import predict_logits, to_tensor
from lungxray.models import create_model
from lungxray.ood import METHOD, N_STATISTICS, THUMB, OODScore, ood_fields, tensor_problem


class Predictor:
    """A loaded bundle: ``predict_arrays`` and ``predict_files`` return class probabilities.

    ``backend``: "torch", "onnx" (ONNX Runtime on the bundle's model.onnx), or "auto": ONNX
    Runtime when the bundle holds a verified model.onnx. Explanations always use the torch model.
    ``threads``: ONNX Runtime's threads per call (0: one per core).
    """

    def __init__(self, folder: Path, backend: str = "auto", threads: int = 0) -> None:
        self.folder = bundle_folder(folder)
        self.config_, self.checksums_ = verify_manifest(self.folder)
        if backend not in ("auto", "torch", "onnx"):
            raise ValueError(f"backend must be auto, torch or onnx, got {backend!r}")
        if backend == "onnx" and not (self.folder / ONNX).is_file():
            raise BundleError(f"{self.folder} has no {ONNX}; run `lungxray export {self.folder} --onnx` first")
        self.backend_ = "onnx" if backend != "torch" and (self.folder / ONNX).is_file() else "torch"
        self.session_ = self._onnx_session(threads) if self.backend_ == "onnx" else None
        self.bundle_config_ = BundleConfig.from_json(self.config_)
        self.classes_: list[str] = list(self.bundle_config_.classes)
        # How files are decoded for this model, as in training.
        self.preprocessing_: Preprocessing = self.bundle_config_.preprocessing
        # "single" (softmax over classes) or "multilabel" (a sigmoid per finding); for the second,
        # per finding: the probability from which it is present, and the temperature its logit is
        # divided by ((F,), in output order). None for a single-label model.
        self.task_: str = self.bundle_config_.task
        multilabel = self.task_ == "multilabel"
        self.thresholds_: dict[str, float] | None = (
            {f: float(self.bundle_config_.thresholds[f]) for f in self.classes_} if multilabel else None
        )
        self.temperatures_: np.ndarray | None = (
            np.array([self.bundle_config_.temperatures[f] for f in self.classes_], dtype=np.float64)
            if multilabel
            else None
        )
        self.model_ = self._load_model()
        # The run's test metrics, only when checksums.json lists them (an unlisted file is ignored).
        self.metrics_: dict | None = (
            json.loads((self.folder / METRICS).read_text()) if METRICS in self.checksums_ else None
        )
        # The model card (MODEL_CARD.md), written by run and train; None for a bundle without one.
        self.card_: str | None = (self.folder / CARD).read_text() if CARD in self.checksums_ else None
        # The figures against chance the card leads with (card.headline): the test split, its
        # held-out or worst site, each external set; None for a bundle without them.
        self.headline_: list[dict] | None = (
            json.loads((self.folder / HEADLINE).read_text()) if HEADLINE in self.checksums_ else None
        )
        # Content hashes of the training and validation files (empty: a bundle that did not record them).
        seen = json.loads((self.folder / SEEN).read_text()) if SEEN in self.checksums_ else {}
        self.seen_: frozenset[str] = frozenset(h for hashes in seen.values() for h in hashes)
        # Temperature scaling fitted on the validation split at training time (1.0: none).
        self.temperature_: float = self.bundle_config_.temperature
        bias = self.bundle_config_.class_bias
        self.class_bias_: np.ndarray | None = np.asarray(bias, dtype=np.float64) if bias is not None else None
        # The out-of-distribution score (None: a bundle saved without one).
        self.ood_: OODScore | None = self._load_ood()

    def _onnx_session(self, threads: int):
        """ONNX Runtime's session on the bundle's model.onnx (verified with the other files)."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per core
        try:
            return onnxruntime.InferenceSession(str(self.folder / ONNX), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own classes for a broken graph
            raise BundleError(
                f"{self.folder / ONNX} is not a graph ONNX Runtime can run ({type(exc).__name__})",
                hint=f"run `lungxray export {self.folder} --onnx` again, or pass --backend torch",
            ) from None

    def _load_model(self) -> torch.nn.Module:
        """The torch model that config.json describes, its weights from the safetensors file, in eval mode."""
        model_cfg = self.config_["model"]
        model = create_model(
            model_cfg["name"],
            tuple(model_cfg["input_shape"]),
            len(self.classes_),
            members=int(model_cfg.get("members", 1)),
            task=self.task_,  # an ensemble averages softmax or, multi-label, sigmoid probabilities
            **model_cfg["hyperparameters"],
        )
        state = load_file(self.folder / WEIGHTS)  # safetensors: tensors only, nothing executed
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BundleError(
                f"weights in {self.folder / WEIGHTS} do not fit the model in config.json: {exc}"
            ) from None
        return model.eval()

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
        tensors = {k: v.astype(np.float64) for k, v in tensors.items()}
        problem = tensor_problem(tensors)
        if problem:
            raise BundleError(f"{self.folder / OOD} cannot score images: {problem}", hint="re-export the model")
        return OODScore(tensors, self.config_["ood"])

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
                    self.session_.run(["logits"], {"image": x[i : i + batch_size].numpy()})[0]
                    for i in range(0, len(x), batch_size)
                ]
            )
        return predict_logits(self.model_, x, batch_size).numpy()

    def predict_arrays(self, images: np.ndarray, batch_size: int = 256, calibrated: bool = True) -> np.ndarray:
        """(N, H, W) uint8 preprocessed images -> (N, n_classes) probabilities: with the class
        offsets fitted on a held-out site, when the bundle has them, and temperature-scaled unless
        ``calibrated=False``. For a multi-label model each column is its finding's own sigmoid,
        ``sigmoid(logit / T_finding)``: a row need not sum to 1."""
        return self.probabilities(self.predict_logits(images, batch_size), calibrated)

    def probabilities(self, logits: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """``predict_arrays`` from the network's ``logits`` (N, n_classes): the scores of one pass
        read with and without the temperatures."""
        logits = torch.from_numpy(np.asarray(logits)).double()  # float32 rounds 1 - 1e-8 to 1
        if self.class_bias_ is not None:
            logits = logits + torch.from_numpy(self.class_bias_)
        if self.temperatures_ is not None:
            probs = torch.sigmoid(logits / (torch.from_numpy(self.temperatures_) if calibrated else 1.0)).numpy()
        else:
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
        return self._as_site(decode(data, self.preprocessing_, name))

    def _as_site(self, image: np.ndarray) -> np.ndarray:
        """(H, W) uint8 -> the same, as a site of one image (``site_normalise``: its own grey levels,
        as load_dataset maps a whole site's)."""
        return equalize_together(image[None])[0] if self.preprocessing_.site_normalise else image

    def preprocess(self, images) -> np.ndarray:
        """The bytes of an image file, a Pillow image, an (H, W) or (N, H, W) array, or a list of
        these -> (N, img_size, img_size) uint8, each as a decoded file is for this model (see
        ``predict``)."""
        if isinstance(images, (bytes, bytearray, memoryview)):
            return self.decode(bytes(images))[None]
        if isinstance(images, Image.Image):
            return self._as_site(preprocess_image(images, self.preprocessing_))[None]
        if isinstance(images, np.ndarray):
            return self._from_array(images)
        if isinstance(images, (list, tuple)) and images:
            return np.concatenate([self.preprocess(x) for x in images])
        raise TypeError(
            f"predict takes image paths, the bytes of an image file, a Pillow image or a NumPy array, "
            f"or a list of them; got {type(images).__name__}"
        )

    def _from_array(self, array: np.ndarray) -> np.ndarray:
        """(H, W) or (N, H, W) grayscale of any size -> (N, img_size, img_size) uint8 as decoded files."""
        colour = array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] > 4  # (H, W, RGB[A])
        if array.ndim not in (2, 3) or colour or 0 in array.shape or array.dtype.kind not in "biuf":
            raise UnusableImage(
                f"an array of shape {array.shape} and dtype {array.dtype}: predict takes one grayscale image "
                "(H, W) or a batch (N, H, W) of numbers",
                hint="pass a colour image as a Pillow image, or convert it to grayscale first",
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise UnusableImage("the array holds NaN or infinite values; pass finite grey levels")
        batch = array if array.ndim == 3 else array[None]  # (N, H, W)
        # uint8 as it is; any other dtype as a 16-bit file: stretched from its own range (mode F)
        pictures = (Image.fromarray(np.ascontiguousarray(a) if a.dtype == np.uint8 else a.astype(np.float32))
                    for a in batch)  # fmt: skip
        return np.stack([self._as_site(preprocess_image(p, self.preprocessing_)) for p in pictures])

    def display(self, data: bytes, name: str = "") -> np.ndarray:
        """An image file's bytes -> (H, W) uint8 at its own aspect ratio (at most 1024 px), cropped
        as the model's input is: the picture an explanation is drawn on."""
        from lungxray.decode import display_gray

        return display_gray(data, self.preprocessing_, name)

    def describe(self, probs: np.ndarray, ood_score: float | None = None) -> dict:
        """One image's probabilities (n_classes,) and out-of-distribution score -> ``{"class",
        "probabilities": {name: p}, "ood_score", "in_distribution"}`` (the last two None for a
        bundle without the score). A multi-label model's answer is ``{"task": "multilabel",
        "probabilities", "findings", "class", "ood_score", "in_distribution"}``: "findings" those at
        or above their threshold, most probable first; "class" the most probable finding."""
        if self.thresholds_ is not None:
            order = np.argsort(-probs, kind="stable")  # most probable first; a tie keeps output order
            return {
                "task": "multilabel",
                "probabilities": {c: float(v) for c, v in zip(self.classes_, probs, strict=True)},
                "findings": [self.classes_[i] for i in order if probs[i] >= self.thresholds_[self.classes_[i]]],
                "class": self.classes_[int(order[0])],
                **ood_fields(ood_score),
            }
        return {
            "class": self.classes_[int(probs.argmax())],
            "probabilities": {c: float(v) for c, v in zip(self.classes_, probs, strict=True)},
            **ood_fields(ood_score),
        }

    def predict(self, images) -> list[dict]:
        """One dict per image, ``{"class", "probabilities", "ood_score", "in_distribution"}`` (a
        multi-label model's: see ``describe``), with its "path" for a file. ``images``, each decoded
        and preprocessed as the model was trained:

        - a path (str or Path) of an image file or of a folder of them, or a list of paths;
        - the bytes of one image file (JPEG, PNG, DICOM, ...);
        - a Pillow image (any mode a file may have; colour is made grayscale);
        - a NumPy array of grayscale images at any size: (H, W) one image, (N, H, W) a batch of N
          (axis 0 the images, then rows, then columns). uint8 is taken as it is; any other dtype
          (uint16, float) is stretched from its own minimum and maximum, as a 16-bit file is;
        - a list of bytes, Pillow images or arrays.

        A missing path raises ``MissingInputError``, a file or an array that cannot be used
        ``UnusableImage`` (both ``LungxrayError``, naming it); ``predict_files`` answers a bad file
        with ``{"path", "error"}`` instead. ``predict_arrays`` takes images already preprocessed
        to (N, img_size, img_size) and gives the bare (N, C) probabilities."""
        if isinstance(images, (str, Path)):
            return self._predict_paths([Path(images)])
        if isinstance(images, (list, tuple)) and all(isinstance(p, (str, Path)) for p in images):
            return self._predict_paths([Path(p) for p in images])
        return self._answers(self.preprocess(images))

    def _predict_paths(self, paths: list[Path]) -> list[dict]:
        """``predict`` of files and folders: a missing or unusable file raises."""
        from lungxray.decode import image_files

        for path in paths:
            if not path.exists():
                raise MissingInputError(f"{path}: no such file or folder", hint="check the path")
        results, images = self.decode_files(image_files(paths))
        bad = [r for r in results if "error" in r]
        if bad:
            more = f" (and {len(bad) - 1} other file(s))" if len(bad) > 1 else ""
            raise UnusableImage(
                f"{bad[0]['path']}: {bad[0]['error']}{more}",
                hint="leave it out, or call predict_files, which answers each file with its error",
            )
        for r, answer in zip(results, self._answers(images), strict=True):
            r.update(answer)
        return results

    def _answers(self, images: np.ndarray) -> list[dict]:
        """(N, H, W) uint8 preprocessed images -> ``describe`` of each."""
        if not len(images):
            return []
        scores = self.ood_scores(images)
        probs = self.predict_arrays(images)
        return [self.describe(p, None if scores is None else scores[k]) for k, p in enumerate(probs)]

    def predict_files(self, paths: list[Path]) -> list[dict]:
        """One dict per path: ``{"path", "class", "probabilities", "ood_score", "in_distribution"}``
        or ``{"path", "error"}``."""
        results, images = self.decode_files(paths)
        good = [r for r in results if "error" not in r]
        for r, answer in zip(good, self._answers(images), strict=True):
            r.update(answer)
        return results
