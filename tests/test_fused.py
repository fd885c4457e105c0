"""The MLP's first layer stepped in one pass (``lungxray.fused``) against torch's own Adam and AdamW."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import settings, toy
from torch import nn

from lungxray import fused as fused_module
from lungxray.fused import FirstLayerAdam
from lungxray.models import create_model, get_spec
from lungxray.train import FitData, fit, make_optimizer

HP = {"activation": "tanh", "layer_1": 24, "layer_2": 16, "layer_3": 16, "dropout_1": 0.0, "dropout_2": 0.0,
      "learning_rate": 1e-2, "weight_decay": 0.05}  # fmt: skip


def _trained(optimizer: str, batch: int, fused: bool, steps: int = 3, cores: int = 1) -> nn.Module:
    """The MLP after ``steps`` steps on fixed batches, its first layer stepped by torch or fused."""
    torch.manual_seed(0)
    model = create_model("mlp", (1, 16, 16), 3, **HP).train()
    opt = make_optimizer(model, HP, optimizer)
    generator = torch.Generator().manual_seed(1)
    with FirstLayerAdam(model.net[1], opt, cores) if fused else contextlib.nullcontext() as first:
        for _ in range(steps):
            x, y = torch.rand(batch, 1, 16, 16, generator=generator), torch.randint(0, 3, (batch,), generator=generator)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if first is not None:
                first.step()
    return model


@pytest.mark.parametrize(("optimizer", "batch"), [("adam", 8), ("adamw", 5), ("adamw", 13), ("adam", 16)])
def test_the_fused_step_is_torchs_adam_to_float32_rounding(optimizer, batch):
    """Batches of 8 (in registers), padded (5), and over 8 (summed in groups, the last padded)."""
    plain, fused = _trained(optimizer, batch, False), _trained(optimizer, batch, True)
    w_plain, w_fused = plain.net[1].weight.detach(), fused.net[1].weight.detach()
    start = _trained(optimizer, batch, False, steps=0).net[1].weight.detach()
    assert (w_plain - start).abs().min() > 0  # every weight moved
    # each step moves a weight by about lr = 1e-2; the forward's and the gradient's sums run in
    # another order, which Adam's first steps magnify only where a gradient is near its eps
    assert torch.allclose(w_fused, w_plain, rtol=0, atol=1e-5)
    assert (w_fused - w_plain).abs().gt(1e-6).float().mean() < 1e-3
    for (name, a), b in zip(plain.state_dict().items(), fused.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), name  # the later layers saw nearly the same first layer
    assert fused.net[1].weight.requires_grad  # handed back


@pytest.mark.parametrize("batch", [8, 13])
def test_a_layer_stepping_alone_splits_its_rows_among_the_cores_with_the_same_result(batch, monkeypatch):
    """One layer attached and 3 cores: its 24 rows are stepped by 3 threads, 8 rows each (the layer
    is far below the size where a split pays, so the test lowers that size)."""
    monkeypatch.setattr(fused_module, "_WEIGHTS_PER_THREAD", 1)
    one = _trained("adamw", batch, True, cores=1)
    kernel, ranges = fused_module._compile(), []

    def recording(*args):
        ranges.append(args[4:6])  # (lo, hi) of the rows this call steps
        return kernel(*args)

    monkeypatch.setattr(fused_module, "_compile", lambda: recording)
    three = _trained("adamw", batch, True, cores=3)
    assert sorted(ranges) == sorted([(0, 8), (8, 16), (16, 24)] * 3)  # 3 steps, 3 threads each
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), three.state_dict().values(), strict=True))


def test_the_fused_step_takes_only_what_it_implements():
    model = create_model("mlp", (1, 16, 16), 3, **HP)
    cpu = torch.device("cpu")
    assert FirstLayerAdam.applies(model, make_optimizer(model, HP, "adam"), cpu) is model.net[1]
    assert FirstLayerAdam.applies(model, make_optimizer(model, HP, "adamw"), cpu) is model.net[1]
    l2 = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)  # Adam's L2 term: left to torch
    assert FirstLayerAdam.applies(model, l2, cpu) is None
    assert FirstLayerAdam.applies(model, torch.optim.Adam(model.parameters(), amsgrad=True), cpu) is None
    assert FirstLayerAdam.applies(model, torch.optim.SGD(model.parameters(), lr=0.1), cpu) is None
    assert FirstLayerAdam.applies(model, make_optimizer(model, HP, "adam"), torch.device("cuda")) is None
    cnn = create_model("cnn", (1, 16, 16), 3, **{**get_spec("cnn").defaults, "depth": 1, "width": 4})
    assert FirstLayerAdam.applies(cnn, make_optimizer(cnn, HP, "adam"), cpu) is None


def test_a_fit_with_the_fused_step_repeats_exactly_and_learns_as_torchs():
    train, val = toy(8), toy(3, start=50)
    hp = {**get_spec("mlp").defaults, "dropout_1": 0.2}
    data = FitData(train, val, 3)
    runs = [fit("mlp", hp, data, settings("mlp", hp, epochs=4, seed=3, fused_step=f)) for f in (True, True, False)]
    (a, b, plain) = ([h.train_loss for h in r.history] for r in runs)
    assert a == b  # bitwise, run to run
    assert a != plain  # the fused path ran: its sums differ from torch's in the last bits
    assert a == pytest.approx(plain, rel=1e-3)
    first, second = runs[0].model.state_dict(), runs[1].model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(p.requires_grad for p in runs[0].model.parameters())


def test_the_fused_step_follows_a_schedule_and_a_moving_average_as_torchs_does():
    """The learning rate is read after optimizer.step() and before the scheduler's step; the moving
    average reads the weights after the fused update."""
    train, val = toy(8), toy(3, start=50)
    hp = dict(get_spec("mlp").defaults)
    cfg = {"epochs": 3, "seed": 2, "schedule": "cosine", "optimizer": "adamw", "ema": 0.9, "keep": "last"}
    data = FitData(train, val, 3)
    fused, plain = (fit("mlp", hp, data, settings("mlp", hp, **cfg, fused_step=f)) for f in (True, False))
    assert [h.train_loss for h in fused.history] == pytest.approx([h.train_loss for h in plain.history], rel=1e-4)
    a, b = fused.model.state_dict(), plain.model.state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the fused path ran


def test_a_fit_that_fails_midway_hands_the_weight_back():
    train, val = toy(4), toy(2, start=50)
    hp = dict(get_spec("mlp").defaults)

    attached_during = []

    def stop(stats):
        attached_during.append(fused_module._attached[0])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit("mlp", hp, FitData(train, val, 3), settings("mlp", hp, epochs=3), on_epoch=stop)
    assert attached_during == [1]  # the fused step ran in the fit
    assert fused_module._attached[0] == 0


@pytest.mark.parametrize(("rows", "batch", "cores"), [(24, 8, 1), (25, 5, 1), (25, 13, 3), (7, 16, 2)])
def test_the_forward_product_in_training_is_linears_to_float32_rounding(rows, batch, cores, monkeypatch):
    """The numba product (rows in pairs, an odd last row alone, batches padded to groups of 8, rows
    split among threads at even rows) against nn.Linear; evaluation is nn.Linear's own, bit for bit."""
    monkeypatch.setattr(fused_module, "_WEIGHTS_PER_THREAD", 1)  # split even these small layers
    torch.manual_seed(0)
    linear = nn.Linear(300, rows)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-3)
    x = torch.randn(batch, 300)
    expected = nn.functional.linear(x, linear.weight, linear.bias)
    kernel, ranges = fused_module._compile_forward(), []

    def recording(w, xs, bias, out, lo, hi):
        ranges.append((lo, hi))
        return kernel(w, xs, bias, out, lo, hi)

    monkeypatch.setattr(fused_module, "_compile_forward", lambda: recording)
    with FirstLayerAdam(linear, opt, cores):
        got = linear(x)
        threads = min(cores, rows // 2)
        assert len(ranges) == threads and all(lo % 2 == 0 for lo, _ in ranges)
        assert sorted(ranges)[0][0] == 0 and sorted(ranges)[-1][1] == rows
        assert got.shape == (batch, rows) and got.requires_grad
        assert torch.allclose(got, expected, rtol=0, atol=1e-5)
        got.sum().backward()
        assert torch.equal(linear.bias.grad, torch.ones(batch, rows).sum(0))  # the bias's gradient, as Linear's
        assert linear.weight.grad is None  # the step makes the weight's
        linear.eval()
        assert torch.equal(linear(x), expected) and len(ranges) == threads  # no kernel call
    linear.train()
    assert torch.equal(linear(x), expected)  # nn.Linear's forward again


def test_an_odd_layer_split_among_threads_trains_bit_for_bit_as_on_one(monkeypatch):
    """25 rows on 3 threads: the forward's ranges start at even rows, so the last row is computed
    alone whatever the split; the products and the weights after three steps are those of 1 thread."""
    monkeypatch.setattr(fused_module, "_WEIGHTS_PER_THREAD", 1)
    runs = []
    for cores in (1, 3):
        torch.manual_seed(0)
        linear = nn.Linear(300, 25)
        opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
        generator, outputs = torch.Generator().manual_seed(1), []
        with FirstLayerAdam(linear, opt, cores) as first:
            for batch in (8, 5, 13):
                out = linear(torch.randn(batch, 300, generator=generator))
                outputs.append(out.detach().clone())
                opt.zero_grad(set_to_none=True)
                out.square().mean().backward()
                opt.step()
                first.step()
        runs.append((outputs, linear.weight.detach().clone(), linear.bias.detach().clone()))
    (a, wa, ba), (b, wb, bb) = runs
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert torch.equal(wa, wb) and torch.equal(ba, bb)
    torch.manual_seed(0)
    assert (wa - nn.Linear(300, 25).weight.detach()).abs().min() > 0  # the steps moved every weight


def test_the_fused_layer_refuses_inputs_its_kernel_cannot_read():
    linear = nn.Linear(300, 32)
    with FirstLayerAdam(linear, torch.optim.Adam(linear.parameters()), 1):
        for bad in (torch.randn(8, 299), torch.randn(8, 300, dtype=torch.float64), torch.randn(2, 8, 300)):
            with pytest.raises(ValueError, match="--no-fused-step"):
                linear(bad)
        assert linear(torch.randn(8, 300)).shape == (8, 32)
