"""Model registry: ``create_model(name, **hp)`` and one Optuna search space per model.

Each entry pairs a constructor with its search space, so the tuner never hard-codes a model. A
hyperparameter that belongs to the optimiser (``learning_rate``) travels in the same dict and is
ignored by the constructor. Holds no training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

OPTIMIZER_KEYS = ("learning_rate",)


class UnknownModelError(KeyError):
    """The model name is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


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


class MLP(nn.Module):
    """The tutorial's multilayer perceptron: flatten -> 3 dense layers with dropout -> class logits.

    Like the Keras original, dropout_1 follows the first layer and dropout_2 the second and third.
    The softmax is left to the loss and to ``predict`` (logits are numerically safer to train on).
    """

    def __init__(self, in_shape: tuple[int, int, int], n_classes: int, activation: str = "relu",
                 layer_1: int = 64, layer_2: int = 64, layer_3: int = 64,
                 dropout_1: float = 0.0, dropout_2: float = 0.0) -> None:
        super().__init__()
        act = {"relu": nn.ReLU, "tanh": nn.Tanh}
        if activation not in act:
            raise ValueError(f"activation must be one of {sorted(act)}, got {activation!r}")
        n_in = in_shape[0] * in_shape[1] * in_shape[2]
        self.net = nn.Sequential(
            nn.Flatten(),  # (N, 1, H, W) -> (N, H*W)
            nn.Linear(n_in, layer_1), act[activation](), Dropout(dropout_1),
            nn.Linear(layer_1, layer_2), act[activation](), Dropout(dropout_2),
            nn.Linear(layer_2, layer_3), act[activation](), Dropout(dropout_2),
            nn.Linear(layer_3, n_classes),
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


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]
    space: Callable[..., dict]
    defaults: dict


REGISTRY: dict[str, ModelSpec] = {
    "mlp": ModelSpec(MLP, mlp_space, {"activation": "relu", "layer_1": 64, "layer_2": 64,
                                      "layer_3": 64, "dropout_1": 0.0, "dropout_2": 0.0,
                                      "learning_rate": 1e-3}),
}


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def create_model(name: str, in_shape: tuple[int, int, int], n_classes: int, **hp) -> nn.Module:
    """Build a registered model; optimiser keys in ``hp`` (learning_rate) are ignored."""
    spec = get_spec(name)
    arch = {k: v for k, v in hp.items() if k not in OPTIMIZER_KEYS}
    return spec.build(in_shape, n_classes, **arch)
