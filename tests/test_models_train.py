"""Model registry, the MLP's shape and gradients, and fit() keeping the best epoch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import optuna
import pytest
import torch
from conftest import settings, toy

from lungxray.augment import BatchAugment
from lungxray.config import AugmentConfig
from lungxray.models import REGISTRY, UnknownModelError, create_model, get_spec
from lungxray.train import FitData, fit


def test_unknown_model_lists_known_ones():
    with pytest.raises(UnknownModelError, match="known models: cnn, densenet121, mlp, resnet18"):
        create_model("resnet999", (1, 16, 16), 3)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_model_forward_backward_finite_with_gradient_everywhere(name):
    torch.manual_seed(0)
    model = create_model(name, (1, 32, 32), 3, **get_spec(name).defaults)
    x, y = toy(2, size=32)  # (6, 1, 32, 32): the smallest side DenseNet-121's four poolings allow
    logits = model(x)
    assert logits.shape == (6, 3)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    # every dropout can be seeded (MONAI's nn.Dropout swapped for lungxray's)
    assert all(type(m) is not torch.nn.Dropout for m in model.modules())


def test_mlp_matches_the_tutorial_architecture():
    model = create_model(
        "mlp",
        (1, 128, 128),
        3,
        activation="tanh",
        layer_1=128,
        layer_2=32,
        layer_3=16,
        dropout_1=0.3,
        dropout_2=0.1,
        learning_rate=1e-3,
    )
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(16384, 128), (128, 32), (32, 16), (16, 3)]
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.3, 0.1, 0.1]
    assert sum(isinstance(m, torch.nn.Tanh) for m in model.modules()) == 3


def test_the_mlp_takes_exactly_the_hyperparameters_of_its_shape():
    from dataclasses import fields

    from lungxray.models import MLPShape, check_hyperparameters

    arch = {f.name for f in fields(MLPShape)}
    assert arch == set(get_spec("mlp").defaults) - {"learning_rate"}
    assert check_hyperparameters("mlp", get_spec("mlp").defaults) == []
    assert check_hyperparameters("mlp", {"depth": 2}) == [
        f"depth is not a hyperparameter of mlp (it takes {', '.join(sorted(arch))})"
    ]
    with pytest.raises(TypeError, match="depth"):
        create_model("mlp", (1, 16, 16), 3, depth=2)


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
    train, val = toy(10), toy(4, start=50)
    hp = dict(get_spec("mlp").defaults)
    result = fit("mlp", hp, FitData(train, val, 3), settings("mlp", hp, epochs=12, batch_size=8, patience=0))
    losses = [h.val_loss for h in result.history]
    assert result.best_epoch == int(np.argmin(losses)) + 1
    assert result.best.val_accuracy >= 0.9
    # the returned model holds the kept epoch's weights
    from lungxray.train import evaluate_loss

    loss, _ = evaluate_loss(result.model, *val)
    assert loss == pytest.approx(result.best.val_loss, rel=1e-5)


def test_fit_is_reproducible_from_its_seed():
    train, val = toy(6), toy(3, start=50)
    hp = {**get_spec("mlp").defaults, "dropout_1": 0.3, "dropout_2": 0.2}
    a = fit("mlp", hp, FitData(train, val, 3), settings("mlp", hp, epochs=3, seed=5))
    b = fit("mlp", hp, FitData(train, val, 3), settings("mlp", hp, epochs=3, seed=5))
    c = fit("mlp", hp, FitData(train, val, 3), settings("mlp", hp, epochs=3, seed=6))
    assert [h.train_loss for h in a.history] == [h.train_loss for h in b.history]
    assert [h.train_loss for h in a.history] != [h.train_loss for h in c.history]


def test_patience_stops_a_run_that_stopped_improving():
    train, val = toy(6), toy(3, start=50)
    hp = {**get_spec("mlp").defaults, "learning_rate": 1e-2}
    result = fit("mlp", hp, FitData(train, val, 3), settings("mlp", hp, epochs=60, patience=3))
    assert len(result.history) == result.best_epoch + 3 < 60


def test_cnn_fit_with_augmentation_schedule_and_seeded_dropout_is_reproducible():
    train, val = toy(6, size=32), toy(3, size=32, start=50)
    hp = {**get_spec("cnn").defaults, "depth": 1, "width": 8, "dropout": 0.3, "batch_size": 8}
    cfg = settings("cnn", hp, epochs=3, seed=2, class_weighted=True)  # recipe: AdamW, cosine, augmentation
    a, b = fit("cnn", hp, FitData(train, val, 3), cfg), fit("cnn", hp, FitData(train, val, 3), cfg)
    assert [h.train_loss for h in a.history] == [h.train_loss for h in b.history]
    assert all(np.isfinite(h.train_loss) for h in a.history)
    off_cfg = settings("cnn", hp, epochs=3, seed=2, class_weighted=True, augment=False)
    off = fit("cnn", hp, FitData(train, val, 3), off_cfg)
    assert [h.train_loss for h in off.history] != [h.train_loss for h in a.history]


def test_ema_update_warms_up_and_copies_integer_buffers():
    from lungxray.train import ema_with_warmup

    update = ema_with_warmup(0.99)
    weights, steps = [torch.tensor([0.0, 10.0])], [torch.tensor(3)]
    update(weights, [torch.tensor([1.0, 0.0])], torch.tensor(0))  # decay min(0.99, 1/10) = 0.1
    assert weights[0].tolist() == pytest.approx([0.9, 1.0])
    update(weights, [torch.tensor([0.0, 0.0])], torch.tensor(990))  # decay min(0.99, 991/1000) = 0.99
    assert weights[0].tolist() == pytest.approx([0.891, 0.99])
    update(steps, [torch.tensor(7)], torch.tensor(5))
    assert steps[0].item() == 7


def test_ema_fit_validates_and_returns_the_averaged_weights():
    train, val = toy(10, size=32), toy(4, size=32, start=50)
    hp = {**get_spec("cnn").defaults, "width": 8, "batch_size": 10}
    cfg = settings("cnn", hp, epochs=20, patience=0, augment=False, ema=0.99, keep="last")
    ema = fit("cnn", hp, FitData(train, val, 3), cfg)
    plain = fit("cnn", hp, FitData(train, val, 3), replace(cfg, ema=0.0))
    from lungxray.train import evaluate_loss

    # the returned weights are the average's: they score what validation saw, and differ from
    # the raw weights of the same training run
    assert evaluate_loss(ema.model, *val)[0] == pytest.approx(ema.history[-1].val_loss, rel=1e-5)
    assert [h.train_loss for h in ema.history] == [h.train_loss for h in plain.history]
    assert ema.history[-1].val_loss != plain.history[-1].val_loss
    # and they learned: torch's EMA without warm-up still predicted one class for 14 of these 20
    # epochs and ended at 0.67 (the batch-norm statistics of step 0 dominate its average)
    assert ema.history[-1].val_accuracy >= 0.9


def test_keep_last_returns_the_last_epoch_and_never_stops_early():
    train, val = toy(6), toy(3, start=50)
    hp = {**get_spec("mlp").defaults, "learning_rate": 1e-2}
    result = fit("mlp", hp, FitData(train, val, 3), settings("mlp", hp, epochs=12, patience=2, keep="last"))
    assert len(result.history) == 12 and result.best_epoch == 12


def test_label_smoothing_changes_the_loss_by_the_formula():
    from lungxray.train import StepOptions, train_one_epoch

    torch.manual_seed(0)
    x, y = toy(2)
    losses = []
    for smoothing in (0.0, 0.3):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 3))
        torch.nn.init.zeros_(model[1].weight), torch.nn.init.zeros_(model[1].bias)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        options = StepOptions(label_smoothing=smoothing)
        losses.append(train_one_epoch(model, opt, x, y, 6, torch.Generator().manual_seed(0), options)[0])
    # all-zero logits: cross-entropy is log(3) whatever the smoothing
    assert losses == pytest.approx([np.log(3), np.log(3)])
    logits = torch.tensor([[4.0, 0.0, 0.0]])
    smoothed = torch.nn.functional.cross_entropy(logits, torch.tensor([0]), label_smoothing=0.3)
    logp = torch.log_softmax(logits, 1)[0]
    assert smoothed.item() == pytest.approx(-(0.8 * logp[0] + 0.1 * logp[1] + 0.1 * logp[2]).item())


def test_standardized_cnn_gives_each_image_zero_mean_and_unit_variance():
    torch.manual_seed(0)
    model = create_model("cnn", (1, 32, 32), 3, width=8, standardize=True)
    seen = {}
    model.conv1[1].register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))  # returns None: output kept
    x = toy(1, size=32)[0] * 0.5 + 0.2
    model.eval()(x)
    assert seen["x"].mean(dim=(1, 2, 3)).abs().max() < 1e-5
    assert seen["x"].std(dim=(1, 2, 3)) == pytest.approx(torch.ones(3), abs=1e-3)
    assert dict(model.named_modules())["layer4"] is model.layer4  # Grad-CAM's layer keeps its name


def test_augmentation_keeps_shape_and_range_changes_images_and_follows_its_seed():
    x = toy(2, size=32)[0]  # (6, 1, 32, 32)
    make = lambda seed, **kw: BatchAugment(AugmentConfig(**kw), torch.Generator().manual_seed(seed))  # noqa: E731
    out = make(0)(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().mean() > 0.01  # it did change the images
    assert torch.equal(out, make(0)(x)) and not torch.equal(out, make(1)(x))
    # all ranges zero: the warp is the identity and intensities are untouched
    still = make(0, rotation=0, shift=0, scale=0, brightness=0, contrast=0)(x)
    assert torch.allclose(still, x, atol=1e-5)
    # a pure shift moves the bright band of class 1 (columns 12..19 at 32 px) sideways
    shifted = make(3, rotation=0, shift=0.2, scale=0, brightness=0, contrast=0)(x)
    assert not torch.allclose(shifted, x, atol=1e-3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_init_weights_round_trip_a_file_the_test_writes(tmp_path, suffix):
    from safetensors.torch import save_file

    from lungxray.models import load_init_weights

    torch.manual_seed(0)
    source = create_model("cnn", (1, 32, 32), 3, depth=1, width=8)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    torch.manual_seed(1)
    target = create_model("cnn", (1, 32, 32), 3, depth=1, width=8)
    assert not torch.equal(target.state_dict()["conv1.weight"], state["conv1.weight"])
    load_init_weights(target, path)
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key
    # and fit() starts from it: one epoch at learning rate ~0 leaves the weights where the file put them
    train, val = toy(3, size=32), toy(2, size=32, start=50)
    hp = {"depth": 1, "width": 8, "dropout": 0.0, "learning_rate": 1e-12, "weight_decay": 0.0, "batch_size": 9}
    result = fit("cnn", hp, FitData(train, val, 3), settings("cnn", hp, epochs=1, augment=False, init_weights=path))
    conv = result.model.state_dict()["conv1.weight"]
    assert torch.allclose(conv, state["conv1.weight"], atol=1e-6)


def test_init_weights_refuses_a_mismatched_file_and_lists_the_keys(tmp_path):
    from safetensors.torch import save_file

    from lungxray.models import InitWeightsError, load_init_weights

    wider = create_model("cnn", (1, 32, 32), 3, depth=1, width=16).state_dict()
    wider["extra.weight"] = torch.zeros(2)
    del wider["fc.1.weight"]
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in wider.items()}, path)
    model = create_model("cnn", (1, 32, 32), 3, depth=1, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InitWeightsError) as info:
        load_init_weights(model, path)
    message = str(info.value)
    assert "missing from the file: fc.1.weight" in message
    assert "unexpected in the file: extra.weight" in message
    assert "conv1.weight (file (16, 1, 7, 7), model (8, 1, 7, 7))" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InitWeightsError, match="weights_only=True"):
        load_init_weights(model, tmp_path / "junk.pt")


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_gathering_many_batches_at_once_trains_exactly_as_one_batch_at_a_time(monkeypatch, model):
    """Training gathers an epoch's images up to ``_GATHER_BYTES`` at a time; the chunk size changes
    nothing: one batch per gather, three per gather and the whole epoch at once give the same
    losses and the same weights, from a tensor and from ``infer.Images`` over uint8 pixels alike."""
    from lungxray import train as train_module
    from lungxray.infer import Images

    pixels = np.stack([(np.random.default_rng(i).random((32, 32)) * 255).astype(np.uint8) for i in range(30)])
    y = torch.arange(30) % 3
    val = (Images(pixels[:9]), y[:9])
    hp = {**get_spec(model).defaults, "batch_size": 4}
    if model == "cnn":
        hp.update(depth=1, width=4)
    cfg = settings(model, hp, epochs=2, seed=5)  # the cnn's recipe augments each batch
    runs = []
    for batches_per_gather in (1, 3, 1000):
        monkeypatch.setattr(train_module, "_GATHER_BYTES", batches_per_gather * 4 * 4 * 32 * 32)
        for x in (Images(pixels), torch.from_numpy(pixels).unsqueeze(1).float().div_(255.0)):
            result = fit(model, hp, FitData((x, y), val, 3), cfg)
            runs.append(([h.train_loss for h in result.history], result.model.state_dict()))
    losses, weights = runs[0]
    for other_losses, other_weights in runs[1:]:
        assert other_losses == losses
        assert all(torch.equal(weights[k], other_weights[k]) for k in weights)
