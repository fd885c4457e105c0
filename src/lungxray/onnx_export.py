"""``export_onnx``: a bundle's model as an ONNX graph (model.onnx, batch size left dynamic), added
to the bundle only once ONNX Runtime's probabilities match PyTorch's on check images.

The graph carries what ONNX Runtime alone needs to use it (classes, preprocessing, temperature) as
metadata. The ``Predictor`` runs it with ``backend="onnx"``. Imports nothing from the training
modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lungxray.bundle import ONNX, bundle_folder, restaged, write_checksums
from lungxray.errors import BundleError
from lungxray.predictor import Predictor


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
    """What ONNX Runtime alone needs to use the graph: class names, preprocessing, class bias, temperature."""
    import onnx

    graph = onnx.load(str(path))
    for key, value in (
        ("lungxray.classes", json.dumps(predictor.classes_)),
        ("lungxray.preprocessing", json.dumps(predictor.config_["preprocessing"])),
        ("lungxray.temperature", repr(predictor.temperature_)),
        ("lungxray.class_bias", json.dumps(predictor.bundle_config_.class_bias or [0.0] * len(predictor.classes_))),
        (
            "lungxray.input",
            "image: (N, 1, H, W) float32 grayscale in [0, 1]; output logits: add the class bias, divide by the "
            "temperature, softmax",
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
