"""Training arithmetic and layout: --precision, bfloat16 where the CPU has it, channels-last convolutions."""

from __future__ import annotations

import pytest
import torch
from conftest import settings, toy
from torch import nn

from lungxray.config import TrainConfig, resolve_train
from lungxray.devices import autocast_dtype, channels_last_safe, trains_channels_last
from lungxray.errors import ConfigError
from lungxray.models import create_model, get_spec, small_cnn
from lungxray.train import FitData, fit

CPU = torch.device("cpu")


def test_precision_resolves_per_model_and_device():
    assert resolve_train(TrainConfig(), get_spec("mlp").recipe).precision == "float32"  # the tutorial's
    assert resolve_train(TrainConfig(), get_spec("cnn").recipe).precision == "auto"
    assert resolve_train(TrainConfig(precision="bfloat16"), get_spec("mlp").recipe).precision == "bfloat16"
    assert autocast_dtype("float32", CPU) is None
    assert autocast_dtype("bfloat16", CPU) is torch.bfloat16
    assert autocast_dtype("auto", CPU) is None  # float32 channels-last beat bfloat16 here, and is safe
    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        autocast_dtype("float16", CPU)
    with pytest.raises(ConfigError, match="--precision must be one of"):
        TrainConfig(precision="half")


def test_channels_last_only_where_onednn_computes_it_right():
    # width 8: the first downsampling is a stride-2 1x1 convolution from 8 channels (oneDNN#6035)
    assert not channels_last_safe(small_cnn((1, 32, 32), 3, width=8))
    assert channels_last_safe(small_cnn((1, 32, 32), 3, width=16))
    assert channels_last_safe(small_cnn((1, 32, 32), 3, depth=2, width=24))
    mlp = create_model("mlp", (1, 16, 16), 3, **get_spec("mlp").defaults)
    assert not trains_channels_last(mlp, CPU, None)
    assert not trains_channels_last(small_cnn((1, 32, 32), 3, width=8), CPU, None)
    assert trains_channels_last(small_cnn((1, 32, 32), 3, width=16), CPU, None)
    # bfloat16 channels-last on the CPU corrupted later float32 predictions in the same process
    assert not trains_channels_last(small_cnn((1, 32, 32), 3, width=16), CPU, torch.bfloat16)


@pytest.mark.parametrize(("depth", "width"), [(1, 16), (2, 24)])
def test_channels_last_gradients_equal_the_contiguous_ones(depth, width):
    """The layouts the CPU trains channels-last give the gradients of NCHW, batch sizes changing
    as an epoch's last batch does (where oneDNN#6035 corrupted memory)."""
    torch.manual_seed(0)
    plain = small_cnn((1, 64, 64), 3, depth=depth, width=width, dropout=0.0).train()
    nhwc = small_cnn((1, 64, 64), 3, depth=depth, width=width, dropout=0.0).train()
    nhwc.load_state_dict(plain.state_dict())
    nhwc.to(memory_format=torch.channels_last)
    for batch in (8, 5, 8):
        x = torch.rand(batch, 1, 64, 64)
        y = torch.arange(batch) % 3
        for model, xb in ((plain, x), (nhwc, x.contiguous(memory_format=torch.channels_last))):
            model.zero_grad()
            nn.functional.cross_entropy(model(xb), y).backward()
        for (name, a), b in zip(plain.named_parameters(), nhwc.parameters(), strict=True):
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5), name


def test_auto_precision_on_a_gpu_is_bfloat16_only_where_the_card_computes_it(monkeypatch):
    cuda = torch.device("cuda")
    for native, expected in ((True, torch.bfloat16), (False, torch.float16)):  # float16: with loss scaling
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert autocast_dtype("auto", cuda) is expected
    assert autocast_dtype("float32", cuda) is None


def test_float16_on_the_cpu_is_refused_before_any_work():
    from pathlib import Path

    from lungxray.job import Job

    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        Job(Path("data"), model="cnn", train=TrainConfig(precision="float16", device="cpu"))


def _watched(monkeypatch) -> list[tuple[torch.dtype, bool]]:
    """(dtype, channels-last) of every convolution's output while ``train.fit`` trains (outputs of one
    pixel, or from one channel, are contiguous in both layouts and left out)."""
    import lungxray.train as train_module

    seen, build = [], train_module.create_model

    def watched(*args, **kwargs):
        model = build(*args, **kwargs)
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.in_channels > 1:  # one channel in: every layout is both
                m.register_forward_hook(
                    lambda _, __, out: (
                        seen.append((out.dtype, out.is_contiguous(memory_format=torch.channels_last)))
                        if torch.is_grad_enabled() and min(out.shape[-2:]) > 1
                        else None
                    )  # fmt: skip
                )
        return model

    monkeypatch.setattr(train_module, "create_model", watched)
    return seen


@pytest.mark.slow
def test_a_cnn_trained_channels_last_or_in_bfloat16_repeats_and_saves_as_nchw(monkeypatch):
    x, y = toy(8, size=32)
    data = FitData((x, y), (x, y), 3)
    hp = dict(get_spec("cnn").defaults, width=16)
    cfg = settings("cnn", hp, epochs=2, precision="bfloat16")
    seen = _watched(monkeypatch)
    first = fit("cnn", hp, data, cfg)
    assert seen and set(seen) == {(torch.bfloat16, False)}  # bfloat16, and NCHW with it on the CPU
    seen.clear()
    full = fit("cnn", hp, data, settings("cnn", hp, epochs=2))  # float32, channels-last
    assert seen and set(seen) == {(torch.float32, True)}
    second = fit("cnn", hp, data, cfg)
    assert all(p.is_contiguous() for p in full.model.parameters())
    for (name, a), b, c in zip(
        first.model.state_dict().items(),
        second.model.state_dict().values(),
        full.model.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name  # same seed, same machine: the same weights
        assert a.is_contiguous(), name  # safetensors and ONNX take it as it is
        assert a.dtype == c.dtype, name  # mixed precision keeps float32 weights
    assert first.history[-1].train_loss == pytest.approx(full.history[-1].train_loss, rel=0.2)  # tracks float32
