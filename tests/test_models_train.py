"""Model registry, the MLP's shape and gradients, and fit() keeping the best epoch."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch

from conftest import synthetic_image
from lungxray.config import TrainConfig
from lungxray.models import REGISTRY, UnknownModelError, create_model, get_spec
from lungxray.train import fit, to_tensor


def _toy(n_per_class=10, size=16, start=0):
    images = np.stack([synthetic_image(c, i, size) for c in range(3) for i in range(start, start + n_per_class)])
    labels = np.repeat(np.arange(3), n_per_class)
    return to_tensor(images), torch.from_numpy(labels)


def test_unknown_model_lists_known_ones():
    with pytest.raises(UnknownModelError, match="known models: mlp"):
        create_model("resnet999", (1, 16, 16), 3)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_model_forward_backward_finite_with_gradient_everywhere(name):
    torch.manual_seed(0)
    model = create_model(name, (1, 16, 16), 3, **get_spec(name).defaults)
    x, y = _toy(2)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_mlp_matches_the_tutorial_architecture():
    model = create_model("mlp", (1, 128, 128), 3, activation="tanh", layer_1=128, layer_2=32, layer_3=16,
                         dropout_1=0.3, dropout_2=0.1, learning_rate=1e-3)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(16384, 128), (128, 32), (32, 16), (16, 3)]
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.3, 0.1, 0.1]
    assert sum(isinstance(m, torch.nn.Tanh) for m in model.modules()) == 3


def test_mlp_search_space_is_the_tutorials():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {k: set() for k in ("activation", "layer_1", "dropout_1", "learning_rate")}
    for _ in range(200):
        trial = study.ask()
        hp = get_spec("mlp").space(trial)
        for k in seen:
            seen[k].add(hp[k])
        study.tell(trial, 0.0)
    assert seen["activation"] == {"relu", "tanh"}
    assert seen["layer_1"] == set(range(16, 129, 16))
    assert seen["dropout_1"] == {0.0, 0.1, 0.2, 0.3}
    assert seen["learning_rate"] == {1e-2, 1e-3, 1e-4}


def test_fit_learns_and_keeps_the_best_epoch():
    train, val = _toy(10), _toy(4, start=50)
    hp = dict(get_spec("mlp").defaults)
    result = fit("mlp", hp, train, val, 3, TrainConfig(epochs=12, batch_size=8, patience=0))
    losses = [h.val_loss for h in result.history]
    assert result.best_epoch == int(np.argmin(losses)) + 1
    assert result.best.val_accuracy >= 0.9
    # the returned model holds the kept epoch's weights
    from lungxray.train import evaluate_loss

    loss, _ = evaluate_loss(result.model, *val)
    assert loss == pytest.approx(result.best.val_loss, rel=1e-5)


def test_fit_is_reproducible_from_its_seed():
    train, val = _toy(6), _toy(3, start=50)
    hp = {**get_spec("mlp").defaults, "dropout_1": 0.3, "dropout_2": 0.2}
    a = fit("mlp", hp, train, val, 3, TrainConfig(epochs=3, seed=5))
    b = fit("mlp", hp, train, val, 3, TrainConfig(epochs=3, seed=5))
    c = fit("mlp", hp, train, val, 3, TrainConfig(epochs=3, seed=6))
    assert [h.train_loss for h in a.history] == [h.train_loss for h in b.history]
    assert [h.train_loss for h in a.history] != [h.train_loss for h in c.history]


def test_patience_stops_a_run_that_stopped_improving():
    train, val = _toy(6), _toy(3, start=50)
    hp = {**get_spec("mlp").defaults, "learning_rate": 1e-2}
    result = fit("mlp", hp, train, val, 3, TrainConfig(epochs=60, patience=3))
    assert len(result.history) == result.best_epoch + 3 < 60
