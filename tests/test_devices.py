"""Training arithmetic and layout: --precision, bfloat16 where the CPU has it, channels-last convolutions."""

from __future__ import annotations

import pytest
import torch
from conftest import settings, toy
from torch import nn

import lungxray.devices as devices
from lungxray.config import TrainConfig, resolve_train
from lungxray.devices import (
    autocast_dtype,
    bfloat16_safe,
    channels_last_safe,
    training_arithmetic,
    trains_channels_last,
)
from lungxray.errors import ConfigError
from lungxray.models import SubsampledPointwise, create_model, get_spec, small_cnn
from lungxray.train import FitData, fit

CPU = torch.device("cpu")


def test_precision_resolves_per_model_and_device(monkeypatch):
    assert resolve_train(TrainConfig(), get_spec("mlp").recipe).precision == "float32"  # the tutorial's
    assert resolve_train(TrainConfig(), get_spec("cnn").recipe).precision == "auto"
    assert resolve_train(TrainConfig(precision="bfloat16"), get_spec("mlp").recipe).precision == "bfloat16"
    assert autocast_dtype("float32", CPU) is None
    assert autocast_dtype("bfloat16", CPU) is torch.bfloat16
    for native, expected in ((True, torch.bfloat16), (False, None)):  # emulated bfloat16 is slower than float32
        monkeypatch.setattr(devices, "native_bfloat16", lambda n=native: n)
        assert autocast_dtype("auto", CPU) is expected
    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        autocast_dtype("float16", CPU)
    with pytest.raises(ConfigError, match="--precision must be one of"):
        TrainConfig(precision="half")


def test_channels_last_only_where_onednn_computes_it_right():
    # a stride-2 1x1 convolution from 8 channels: oneDNN#6035's case
    assert not channels_last_safe(nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 16, 1, stride=2)))
    assert channels_last_safe(nn.Sequential(nn.Conv2d(1, 16, 3), nn.Conv2d(16, 32, 1, stride=2)))
    # the ResNets' strided shortcuts subsample first, so every width of the small CNN is safe
    for width in (8, 16, 24):
        net = small_cnn((1, 32, 32), 3, depth=2, width=width)
        assert channels_last_safe(net) and trains_channels_last(net, CPU)
        assert sum(isinstance(m, SubsampledPointwise) for m in net.modules()) == 3  # layers 2-4's shortcuts
    assert sum(isinstance(m, SubsampledPointwise) for m in create_model("resnet18", (1, 32, 32), 3).modules()) == 3
    mlp = create_model("mlp", (1, 16, 16), 3, **get_spec("mlp").defaults)
    assert not trains_channels_last(mlp, CPU)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_subsampled_pointwise_convolution_is_the_strided_one(layout):
    """The same parameters (names included), output and gradients, on an odd-sized input; and the
    built network's initial weights kept."""
    torch.manual_seed(0)
    strided = nn.Conv2d(16, 32, 1, stride=2).to(memory_format=layout)
    pointwise = SubsampledPointwise(strided)
    assert [n for n, _ in pointwise.named_parameters()] == ["weight", "bias"]
    assert pointwise.weight is strided.weight
    x = torch.rand(3, 16, 9, 9).contiguous(memory_format=layout)
    grads = []
    for conv in (strided, pointwise):
        conv.zero_grad()
        xi = x.clone().requires_grad_()
        out = conv(xi)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        grads.append((out.detach(), xi.grad, conv.weight.grad.clone(), conv.bias.grad.clone()))
    for a, b in zip(*grads, strict=True):  # another oneDNN kernel: float32 rounding of sums apart
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * b.abs().max()
    torch.manual_seed(0)
    built = small_cnn((1, 32, 32), 3, width=8)
    torch.manual_seed(0)
    monai = _monai_resnet(width=8)
    for (name, a), b in zip(built.state_dict().items(), monai.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # MONAI's initialisation, under MONAI's names


def _monai_resnet(width: int) -> nn.Module:
    """The small CNN as MONAI builds it, before lungxray changes its shortcuts."""
    from monai.networks.nets import ResNet

    from lungxray.models import Dropout

    net = ResNet("basic", (1,) * 4, [width * 2**i for i in range(4)], spatial_dims=2, n_input_channels=1,
                 conv1_t_stride=2, num_classes=3)  # fmt: skip
    net.fc = nn.Sequential(Dropout(0.1), net.fc)
    return net


def test_bfloat16_on_the_cpu_keeps_out_of_a_strided_convolution_of_one_pixel(monkeypatch):
    """At 16 px the small CNN's last stage reads a 1x1 map with a stride-2 3x3 convolution, whose
    bfloat16 weight gradient oneDNN gets wrong: auto falls back to float32 there, an explicit
    bfloat16 is refused, and at 32 px (a 2x2 map) bfloat16 trains."""
    monkeypatch.setattr(devices, "native_bfloat16", lambda: True)
    small, larger = small_cnn((1, 16, 16), 3), small_cnn((1, 32, 32), 3)
    assert not bfloat16_safe(small, (1, 16, 16)) and bfloat16_safe(larger, (1, 32, 32))
    assert small.training  # the shape pass leaves the mode as it found it
    assert training_arithmetic("auto", CPU, small, (1, 16, 16)) == (None, True)
    assert training_arithmetic("auto", CPU, larger, (1, 32, 32)) == (torch.bfloat16, True)
    assert training_arithmetic("float32", CPU, larger, (1, 32, 32)) == (None, True)
    with pytest.raises(ConfigError, match="bfloat16 on the CPU computes wrong weight gradients") as info:
        training_arithmetic("bfloat16", CPU, small, (1, 16, 16))
    assert "--img-size" in info.value.hint


def test_native_bfloat16_is_read_from_the_cpu(monkeypatch):
    for avx512, amx in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert devices.native_bfloat16() is (avx512 or amx)


@pytest.mark.parametrize("size", [32, 64])
def test_bfloat16_gradients_follow_float32_where_it_trains(size):
    """Where ``bfloat16_safe`` lets the CPU train in bfloat16 channels-last, the gradient is finite
    and near float32's, call after call. bfloat16's rounding moves one step's gradient (every
    parameter's together) by tens of percent of its norm on this network, batch norm's
    cancellations magnifying it; the weight gradients oneDNN got wrong were whatever memory held,
    NaN or 1e33 (bench/onednn_check.py), which no bound near 1 lets through."""
    torch.manual_seed(0)
    net = small_cnn((1, size, size), 3, width=16, dropout=0.0).train().to(memory_format=torch.channels_last)
    assert bfloat16_safe(net, (1, size, size))
    x = torch.rand(8, 1, size, size)
    y = torch.arange(8) % 3
    for _ in range(3):
        grads = {}
        for low in (True, False):
            net.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
                logits = net(x)
            nn.functional.cross_entropy(logits.float(), y).backward()
            grads[low] = torch.cat([p.grad.flatten() for p in net.parameters()])
        assert torch.isfinite(grads[True]).all()
        assert (grads[True] - grads[False]).norm() <= 0.5 * grads[False].norm()


@pytest.mark.parametrize(("depth", "width"), [(1, 8), (1, 16), (2, 24)])
def test_channels_last_gradients_equal_the_contiguous_ones(depth, width):
    """The layouts the CPU trains channels-last give the gradients of NCHW, batch sizes changing
    as an epoch's last batch does (where oneDNN#6035 corrupted memory); width 8 too, whose strided
    shortcut from 8 channels met it before ``SubsampledPointwise``."""
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
    assert seen and set(seen) == {(torch.bfloat16, True)}  # bfloat16, channels-last
    seen.clear()
    full = fit("cnn", hp, data, settings("cnn", hp, epochs=2, precision="float32"))  # float32, channels-last
    assert seen and set(seen) == {(torch.float32, True)}
    second = fit("cnn", hp, data, cfg)
    assert (first.arithmetic, full.arithmetic) == ("bfloat16, channels-last", "float32, channels-last")
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


def test_the_bundle_records_what_auto_precision_came_to(trained_run):
    """The shared run trains at 16 px, where bfloat16 would meet the stride-2 convolution of a 1x1
    map: float32 on every CPU, said in config.json and the model card."""
    import json

    _, out, _ = trained_run
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["training"]["precision"] == "auto"
    assert config["training"]["arithmetic"] == "float32, channels-last"
    assert "in float32, channels-last." in (out / "model" / "MODEL_CARD.md").read_text()


def test_a_cnn_validated_a_batch_at_a_time_gives_the_same_figures():
    """fit validates a channels-last CNN on the CPU a training batch at a time (its activations stay
    in cache); the loss and accuracy are those of one pass over every image, bit for bit."""
    from lungxray.train import evaluate_loss

    torch.manual_seed(0)
    net = small_cnn((1, 64, 64), 3, depth=2, width=24).to(memory_format=torch.channels_last).eval()
    x, y = toy(7, size=64)  # 21 images: chunks of 8, 8 and 5
    whole = evaluate_loss(net, x, y)
    assert evaluate_loss(net, x, y, 8) == whole
    assert 0.0 <= whole[1] <= 1.0 and whole[0] > 0
