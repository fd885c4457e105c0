"""``export_onnx``: a bundle's model as an ONNX graph (model.onnx, batch size left dynamic), added
to the bundle only once ONNX Runtime's probabilities match PyTorch's on check images.

The graph carries what ONNX Runtime alone needs to use it (classes, preprocessing, temperature) as
metadata. A multi-label model's graph also outputs each finding's calibrated probability
(``sigmoid((logit + bias) / T_finding)``, its temperatures folded in) and carries its task and
thresholds. The ``Predictor`` runs it with ``backend="onnx"``. Imports nothing from the training
modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lungxray.bundle import ONNX, bundle_folder, restaged, write_checksums
from lungxray.errors import BundleError
from lungxray.infer import to_tensor
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


class Probabilities(torch.nn.Module):
    """A multi-label model with its calibration, as one graph: (N, 1, H, W) -> (logits (N, F), each
    finding's probability (N, F), ``sigmoid((logit + bias) / T_finding)``)."""

    def __init__(self, model: torch.nn.Module, bias: np.ndarray, temperatures: np.ndarray) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32))
        self.register_buffer("temperatures", torch.as_tensor(temperatures, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.sigmoid((logits + self.bias) / self.temperatures)


def _add_metadata(path: Path, predictor: Predictor) -> None:
    """What ONNX Runtime alone needs to use the graph: class names, preprocessing, class bias,
    temperature; for a multi-label model its task, thresholds and temperatures instead of the one
    temperature."""
    import onnx

    graph = onnx.load(str(path))
    for key, value in _metadata(predictor):
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(path))


def _metadata(predictor: Predictor) -> list[tuple[str, str]]:
    """The graph's metadata, (key, value) strings."""
    shared = [
        ("lungxray.classes", json.dumps(predictor.classes_)),
        ("lungxray.preprocessing", json.dumps(predictor.config_["preprocessing"])),
    ]
    bias = ("lungxray.class_bias", json.dumps(predictor.bundle_config_.class_bias or [0.0] * len(predictor.classes_)))
    if predictor.temperatures_ is None:
        return [
            *shared,
            ("lungxray.temperature", repr(predictor.temperature_)),
            bias,
            (
                "lungxray.input",
                "image: (N, 1, H, W) float32 grayscale in [0, 1]; output logits: add the class bias, divide by the "
                "temperature, softmax",
            ),
        ]
    temperatures = dict(zip(predictor.classes_, predictor.temperatures_.tolist(), strict=True))
    return [
        *shared,
        ("lungxray.task", predictor.task_),
        ("lungxray.thresholds", json.dumps(predictor.thresholds_)),
        ("lungxray.temperatures", json.dumps(temperatures)),
        bias,
        (
            "lungxray.input",
            "image: (N, 1, H, W) float32 grayscale in [0, 1]; output probabilities: each finding's own "
            "probability (class bias added, its temperature divided by, sigmoid), the finding present at or "
            "above its lungxray.thresholds entry; output logits: the raw logits",
        ),
    ]


def _export_into(torch_predictor: Predictor, staging: Path, dummy: torch.Tensor, check_images: np.ndarray) -> float:
    """Write model.onnx into ``staging`` and return its largest probability gap to PyTorch's."""
    import warnings

    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript; it still writes a standard graph that ONNX Runtime runs.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        model, outputs = _graph_model(torch_predictor)
        torch.onnx.export(
            model,
            (dummy,),
            str(staging / ONNX),
            input_names=["image"],
            output_names=outputs,
            dynamic_axes={"image": {0: "batch"}} | {name: {0: "batch"} for name in outputs},
            opset_version=17,
            dynamo=False,
        )
    _add_metadata(staging / ONNX, torch_predictor)
    write_checksums(staging)
    onnx_predictor = Predictor(staging, backend="onnx")
    expected = torch_predictor.predict_arrays(check_images)
    gap = float(np.abs(onnx_predictor.predict_arrays(check_images) - expected).max())
    if torch_predictor.temperatures_ is not None:  # the graph's own probabilities, for ONNX Runtime alone
        graph = onnx_predictor.session_.run(["probabilities"], {"image": to_tensor(check_images).numpy()})[0]
        gap = max(gap, float(np.abs(graph - expected).max()))
    if gap >= 1e-4:
        raise BundleError(f"ONNX Runtime and PyTorch disagree by {gap:.2e} on the check images; model.onnx not kept")
    return gap


def _graph_model(predictor: Predictor) -> tuple[torch.nn.Module, list[str]]:
    """The module to export and its outputs' names: the model itself (logits) for a single-label
    model, ``Probabilities`` (logits, probabilities) for a multi-label one."""
    if predictor.temperatures_ is None:
        return predictor.model_, ["logits"]
    bias = predictor.class_bias_ if predictor.class_bias_ is not None else np.zeros(len(predictor.classes_))
    return Probabilities(predictor.model_, bias, predictor.temperatures_).eval(), ["logits", "probabilities"]
