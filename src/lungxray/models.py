"""Model registry: ``create_model(name, **hp)`` and one Optuna search space per model.

Each entry pairs a constructor with its search space and its training recipe, so the tuner never
hard-codes a model. Hyperparameters that belong to training (learning rate, weight decay, batch
size) travel in the same dict and are ignored by the constructor. The convolutional networks are
MONAI's (``monai.networks.nets``), built for one input channel. Also loads ``--init-weights``
files. Holds no training loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from lungxray.config import Recipe
from lungxray.errors import InitWeightsError, ParamsError, UnknownModelError

TRAINING_KEYS = ("learning_rate", "weight_decay", "batch_size")


class Dropout(nn.Dropout):
    """Dropout that draws its mask from its own generator when one is set.

    ``nn.Dropout`` draws from torch's global generator, which trials trained side by side in
    threads would share; a generator per model keeps every trial reproducible from its seed.
    """

    generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.generator is None:
            return super().forward(x)
        keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=self.generator)
        return x * keep / (1 - self.p)


def seed_dropout(model: nn.Module, generator: torch.Generator) -> None:
    """Make every lungxray Dropout in ``model`` draw from ``generator``."""
    for module in model.modules():
        if isinstance(module, Dropout):
            module.generator = generator


@dataclass(frozen=True)
class MLPShape:
    """The MLP's architecture hyperparameters, named as in the tutorial's search space."""

    activation: str = "relu"
    layer_1: int = 64
    layer_2: int = 64
    layer_3: int = 64
    dropout_1: float = 0.0
    dropout_2: float = 0.0


class MLP(nn.Module):
    """The tutorial's multilayer perceptron: flatten -> 3 dense layers with dropout -> class logits.

    Like the Keras original, dropout_1 follows the first layer and dropout_2 the second and third.
    The softmax is left to the loss and to ``predict`` (logits are numerically safer to train on).
    ``hp``: fields of ``MLPShape``; an unknown one is a TypeError.
    """

    hyperparameters = MLPShape  # what ``hp`` may hold (``check_hyperparameters`` reads it)

    def __init__(self, in_shape: tuple[int, int, int], n_classes: int, **hp) -> None:
        super().__init__()
        shape = MLPShape(**hp)
        act = {"relu": nn.ReLU, "tanh": nn.Tanh}
        if shape.activation not in act:
            raise ParamsError(f"activation must be one of {sorted(act)}, got {shape.activation!r}")
        n_in = in_shape[0] * in_shape[1] * in_shape[2]
        activation = act[shape.activation]
        self.net = nn.Sequential(
            nn.Flatten(),  # (N, 1, H, W) -> (N, H*W)
            nn.Linear(n_in, shape.layer_1),
            activation(),
            Dropout(shape.dropout_1),
            nn.Linear(shape.layer_1, shape.layer_2),
            activation(),
            Dropout(shape.dropout_2),
            nn.Linear(shape.layer_2, shape.layer_3),
            activation(),
            Dropout(shape.dropout_2),
            nn.Linear(shape.layer_3, n_classes),
        )
        # Keras defaults (Glorot-uniform weights, zero biases) so the tutorial's search space and
        # learning rates mean the same thing here.
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, H, W) -> (N, n_classes)
        return self.net(x)


def mlp_space(trial) -> dict:
    """The tutorial's KerasTuner space, value for value."""
    return {
        "activation": trial.suggest_categorical("activation", ["relu", "tanh"]),
        "layer_1": trial.suggest_int("layer_1", 16, 128, step=16),
        "layer_2": trial.suggest_int("layer_2", 16, 128, step=16),
        "layer_3": trial.suggest_int("layer_3", 16, 128, step=16),
        "dropout_1": trial.suggest_categorical("dropout_1", [0.0, 0.1, 0.2, 0.3]),
        "dropout_2": trial.suggest_categorical("dropout_2", [0.0, 0.1, 0.2, 0.3]),
        "learning_rate": trial.suggest_categorical("learning_rate", [1e-2, 1e-3, 1e-4]),
    }


def _use_seeded_dropout(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Dropout`` of a MONAI network for lungxray's, which ``seed_dropout`` can seed."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p))
    return model


class Standardize(nn.Module):
    """Each image to zero mean and unit variance (over its own pixels), before the network sees it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> same
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / (std + 1e-5)


class SubsampledPointwise(nn.Module):
    """A strided 1x1 convolution computed as a unit-stride one on every ``stride``-th pixel: the same
    parameters (under the same names), output and gradients, without oneDNN's strided 1x1 kernel.

    That kernel's weight gradient first copies every s-th pixel to a workspace, which for a
    channels-last source with few channels it sizes too small and writes past
    (uxlfoundation/oneDNN#6035: crashes or wrong gradients in float32 below 16 channels; the
    bfloat16 1x1 kernel copies the same way, not checked for the defect). Taking the pixels here
    leaves oneDNN a unit-stride convolution, so MONAI's ResNets train channels-last at every width.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias  # the built network's initialisation, kept
        self.stride, self.groups = conv.stride, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a 1x1 pool of this stride is the subsampling, in the input's layout both ways (a slice's
        # backward made its gradient NCHW, and adding it to the channels-last one was slow)
        x = nn.functional.avg_pool2d(x, 1, self.stride)
        return nn.functional.conv2d(x, self.weight, self.bias, groups=self.groups)


def _subsample_pointwise(net: nn.Module) -> nn.Module:
    """``net`` with each strided, unpadded 1x1 convolution (a ResNet's downsampling shortcut) made a
    ``SubsampledPointwise``."""
    for module in list(net.modules()):
        for name, conv in list(module.named_children()):
            pointwise = isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.padding == (0, 0)
            if pointwise and conv.stride != (1, 1) and conv.dilation == (1, 1):
                setattr(module, name, SubsampledPointwise(conv))
    return net


def small_cnn(
    in_shape: tuple[int, int, int],
    n_classes: int,
    depth: int = 1,
    width: int = 16,
    dropout: float = 0.1,
    standardize: bool = False,
) -> nn.Module:
    """A small MONAI ResNet: four stages of ``depth`` basic residual blocks, ``width`` channels
    doubling per stage, global average pooling, dropout, then the class layer.

    depth 1, width 16 is a ResNet-10 at a quarter of the width: 0.3 M parameters, ~200 training
    images/s at 128 px on two CPU cores (measured). MONAI's plain ``Classifier`` ran as fast but
    flattens the last feature map into its class layer (8,192 inputs per class at 128 px), which
    overfit 250 images: cross-validated macro-F1 0.89 against this net's. ``standardize`` gives
    each image zero mean and unit variance first (no gain on the shared data: BENCHMARKS.md).
    """
    from monai.networks.nets import ResNet

    net = ResNet(
        block="basic",
        layers=(depth,) * 4,
        block_inplanes=[width * 2**i for i in range(4)],
        spatial_dims=2,
        n_input_channels=in_shape[0],
        conv1_t_stride=2,
        num_classes=n_classes,
    )
    net.fc = nn.Sequential(Dropout(dropout), net.fc)
    if standardize:  # inside the stem, so layer names (Grad-CAM's layer4) stay the same
        net.conv1 = nn.Sequential(Standardize(), net.conv1)
    return _subsample_pointwise(net)


def resnet18(in_shape: tuple[int, int, int], n_classes: int) -> nn.Module:
    """MONAI ResNet-18 with the usual stride-2 stem (MONAI's default stride 1 costs 4x the compute)."""
    from monai.networks.nets import resnet18 as monai_resnet18

    net = monai_resnet18(spatial_dims=2, n_input_channels=in_shape[0], num_classes=n_classes, conv1_t_stride=2)
    return _subsample_pointwise(net)


def densenet121(in_shape: tuple[int, int, int], n_classes: int, dropout: float = 0.0) -> nn.Module:
    """MONAI DenseNet-121 (CheXNet's architecture)."""
    from monai.networks.nets import DenseNet121

    net = DenseNet121(spatial_dims=2, in_channels=in_shape[0], out_channels=n_classes, dropout_prob=dropout)
    return _use_seeded_dropout(net)


def _optimiser_space(trial, batch_sizes: list[int]) -> dict:
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-3, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-5, 1e-1, log=True),
        "batch_size": trial.suggest_categorical("batch_size", batch_sizes),
    }


def small_cnn_space(trial) -> dict:
    return {
        "depth": trial.suggest_int("depth", 1, 2),
        "width": trial.suggest_categorical("width", [8, 16, 24]),
        "dropout": trial.suggest_categorical("dropout", [0.0, 0.1, 0.2, 0.3]),
        **_optimiser_space(trial, [8, 16, 32]),
    }


def resnet18_space(trial) -> dict:
    return _optimiser_space(trial, [16, 32])


def densenet121_space(trial) -> dict:
    return {"dropout": trial.suggest_categorical("dropout", [0.0, 0.2]), **_optimiser_space(trial, [16, 32])}


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]
    space: Callable[..., dict]
    defaults: dict
    recipe: Recipe = field(default_factory=Recipe)
    cam_layer: str | None = None  # the module Grad-CAM reads; None: explain by input gradient
    # What a saved bundle may ask of the architecture: (low, high) for a number, a tuple of choices
    # otherwise. Wider than the search space, narrow enough that no config allocates gigabytes.
    limits: dict = field(default_factory=dict)


REGISTRY: dict[str, ModelSpec] = {
    # The tutorial's model and training, unchanged: Adam, constant learning rate, no augmentation.
    "mlp": ModelSpec(
        MLP,
        mlp_space,
        {
            "activation": "relu",
            "layer_1": 64,
            "layer_2": 64,
            "layer_3": 64,
            "dropout_1": 0.0,
            "dropout_2": 0.0,
            "learning_rate": 1e-3,
        },
        Recipe(
            optimizer="adam", schedule="constant", augment=False, epochs=64, batch_size=8, jobs=2, mixed_precision=False
        ),
        limits={
            "activation": ("relu", "tanh"),
            "layer_1": (1, 4096),
            "layer_2": (1, 4096),
            "layer_3": (1, 4096),
            "dropout_1": (0.0, 0.95),
            "dropout_2": (0.0, 0.95),
        },  # fmt: skip
    ),
    "cnn": ModelSpec(
        small_cnn,
        small_cnn_space,
        {"depth": 1, "width": 16, "dropout": 0.1, "learning_rate": 2e-3, "weight_decay": 1e-2, "batch_size": 16},
        # scanner augmentation: the best external AUROC of the variants measured (BENCHMARKS.md);
        # two trials side by side, one core each: one trial's small-batch steps left the second
        # core mostly idle (bench/cnn_search_bench.py: the search's time with one and two training)
        Recipe(epochs=30, scanner=True, jobs=2),
        cam_layer="layer4",
        limits={"depth": (1, 4), "width": (1, 128), "dropout": (0.0, 0.95), "standardize": (False, True)},
    ),
    "resnet18": ModelSpec(
        resnet18,
        resnet18_space,
        {"learning_rate": 1e-3, "weight_decay": 1e-2, "batch_size": 16},
        Recipe(epochs=12),
        cam_layer="layer4",
    ),
    "densenet121": ModelSpec(
        densenet121,
        densenet121_space,
        {"dropout": 0.0, "learning_rate": 1e-3, "weight_decay": 1e-2, "batch_size": 16},
        Recipe(epochs=12),
        cam_layer="class_layers.relu",
    ),
}


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}", hint="choose one with --model"
        )
    return REGISTRY[name]


class Ensemble(nn.Module):
    """Members of one architecture as one model: (N, 1, H, W) -> (N, n_classes) log of the mean of
    the members' softmax probabilities; ``task`` "multilabel": (N, F) logit of the mean of each
    finding's sigmoid probabilities.

    softmax (multi-label: sigmoid) of the output is the mean probability, so temperature scaling,
    evaluation, ONNX export (one graph holding every member) and serving treat an ensemble like any
    model. The task changes no weight: a bundle's state dict is the same either way.
    """

    def __init__(self, members: list[nn.Module], task: str = "single") -> None:
        super().__init__()
        if task not in ("single", "multilabel"):
            raise ValueError(f"task must be 'single' or 'multilabel', got {task!r}")
        self.members, self.task = nn.ModuleList(members), task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "multilabel":
            probs = torch.stack([torch.sigmoid(m(x)) for m in self.members]).mean(dim=0)  # (N, F)
            # bounded where float32 still tells p from 1 (its logit ~16)
            probs = probs.clamp(1e-7, 1 - 1e-7)
            return torch.log(probs) - torch.log1p(-probs)
        probs = torch.stack([torch.softmax(m(x), dim=1) for m in self.members]).mean(dim=0)  # (N, C)
        return torch.log(probs.clamp_min(1e-12))


def check_hyperparameters(name: str, hp: dict) -> list[str]:
    """What is wrong with architecture hyperparameters ``hp`` for model ``name`` (empty: nothing):
    unknown keys, wrong types, values outside the registry's limits."""
    import inspect

    spec = get_spec(name)
    declared = getattr(spec.build, "hyperparameters", None)  # a constructor that takes them as **hp
    if declared is not None:
        allowed = {f.name for f in fields(declared)}
    else:
        allowed = set(inspect.signature(spec.build).parameters) - {"in_shape", "n_classes"}
    problems = []
    for key, value in hp.items():
        if key in TRAINING_KEYS:
            continue
        if key not in allowed:
            problems.append(
                f"{key} is not a hyperparameter of {name} (it takes {', '.join(sorted(allowed)) or 'none'})"
            )
            continue
        limit = spec.limits.get(key)
        numeric = limit is not None and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in limit)
        if numeric and len(limit) == 2:
            low, high = limit
            kind = int if all(isinstance(v, int) for v in limit) else (int, float)  # layer sizes are whole
            if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
                problems.append(
                    f"{key} = {value!r} is outside {low}..{high}" + (" or not whole" if kind is int else "")
                )
        elif limit is not None and value not in limit:
            problems.append(f"{key} = {value!r} is not one of {', '.join(map(str, limit))}")
    return problems


def create_model(
    name: str, in_shape: tuple[int, int, int], n_classes: int, members: int = 1, task: str = "single", **hp
) -> nn.Module:
    """Build a registered model (an ``Ensemble`` of ``members`` copies when more than one, averaging
    softmax or, ``task`` "multilabel", sigmoid probabilities); training keys in ``hp`` (learning
    rate, ...) are ignored."""
    spec = get_spec(name)
    arch = {k: v for k, v in hp.items() if k not in TRAINING_KEYS}
    if members > 1:
        return Ensemble([spec.build(in_shape, n_classes, **arch) for _ in range(members)], task)
    return spec.build(in_shape, n_classes, **arch)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a state dict saved by ``torch.save`` (read with
    ``weights_only=True``: no code in the file runs). A ``{"state_dict": ...}`` wrapper is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise InitWeightsError(f"--init-weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # safetensors raises its own SafetensorError on a bad header
            raise InitWeightsError(f"--init-weights {path}: not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, refused globals: all mean "not a state dict"
        raise InitWeightsError(
            f"--init-weights {path}: not a state dict torch can read with "
            f"weights_only=True ({type(exc).__name__}: {exc}); save it with "
            "torch.save(model.state_dict(), path) or as .safetensors"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InitWeightsError(f"--init-weights {path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def load_init_weights(model: nn.Module, path: Path) -> None:
    """Copy the weights in ``path`` into ``model``; every missing, unexpected or misshapen key is an error."""
    state = read_weights(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or misshapen:

        def listed(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

        problems = [
            f"{len(v)} {name}: {listed(v)}"
            for name, v in (
                ("missing from the file", missing),
                ("unexpected in the file", unexpected),
                ("with another shape", misshapen),
            )
            if v
        ]
        raise InitWeightsError(
            f"--init-weights {path} does not fit this model; "
            + "; ".join(problems)
            + ". Check --model, the number of classes and that the file has one input channel"
        )
    model.load_state_dict(state, strict=True)
