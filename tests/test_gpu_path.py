"""Training data and augmentation on a GPU: ``infer.Images`` held on the device as uint8 and gathered
there, the same batches as read lazily from the CPU's pixels; ``BatchAugment`` drawing its noise on
the device while its CPU draws stay what they are. The CUDA tests run where torch sees a GPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import settings

from lungxray.augment import BatchAugment
from lungxray.config import AugmentConfig
from lungxray.infer import Images, to_tensor
from lungxray.models import get_spec
from lungxray.train import FitData, fit

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
KEYS = [3, -1, np.int64(2), slice(1, 5), slice(None, None, 2), torch.tensor([4, 0, 4]), np.array([5, 1]),
        torch.tensor(2)]  # fmt: skip


def _pixels(n: int = 12, size: int = 9, seed: int = 0) -> np.ndarray:
    """(n, size, size) uint8, every grey level likely."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def _cpu_augment_reference(cfg: AugmentConfig, generator: torch.Generator, x: torch.Tensor) -> torch.Tensor:
    """One batch augmented as ``BatchAugment`` does on the CPU, written with MONAI's defaults: (row,
    column) 2x3 matrices to ``AffineTransform``, each batch's noise drawn at full size by torch.randn
    from ``generator``, and the draws in the same order."""
    from monai.networks.layers import AffineTransform

    n = len(x)
    uniform = lambda half: ((torch.rand(n, generator=generator) * 2 - 1) * half).view(n, 1, 1, 1)  # noqa: E731
    out = x
    if cfg.enabled is not False:
        warp = AffineTransform(normalized=True, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = warp(x, BatchAugment(cfg, generator).theta(n))
        contrast, brightness = 1 + uniform(cfg.contrast), uniform(cfg.brightness)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * contrast + mean + brightness).clamp(0.0, 1.0)
    if cfg.scanner:
        out = out.clamp(0.0, 1.0) ** torch.exp(uniform(1.0) * 0.5 * math.log(2.0)).clamp(0.7, 1.4)
        kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]).view(1, 1, 3, 3) / 16
        blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(out, (1, 1, 1, 1), mode="replicate"), kernel)
        out = out + uniform(1.0) * (blurred - out)
        noise = torch.randn(x.shape, generator=generator)
        out = out + noise * (torch.rand(n, generator=generator) * 0.03).view(n, 1, 1, 1)
        levels = torch.randint(16, 257, (n,), generator=generator).float().view(n, 1, 1, 1) - 1
        out = (torch.round(out.clamp(0.0, 1.0) * levels) / levels).clamp(0.0, 1.0)
    return out


def test_resident_images_give_the_lazy_batches_bit_for_bit(tmp_path):
    """Held as one uint8 tensor (on the CPU here), the images index as the memory-mapped ones do:
    same values, dtype and shape for an int, a slice, an index tensor and an index array."""
    pixels = _pixels()
    stack = np.memmap(tmp_path / "stack.u8", dtype=np.uint8, mode="w+", shape=pixels.shape)
    stack[:] = pixels
    stack = np.memmap(tmp_path / "stack.u8", dtype=np.uint8, mode="r", shape=pixels.shape)
    lazy = Images(stack, np.array([7, 2, 11, 0, 5, 3, 9]))
    held = lazy.resident()
    assert held.rows.dtype == torch.uint8 and tuple(held.rows.shape) == (7, 9, 9)
    assert (len(held), held.shape, held.device) == (len(lazy), lazy.shape, lazy.device)
    for key in KEYS:
        batch = held[key]
        assert batch.dtype == torch.float32 and torch.equal(batch, lazy[key]), key
    assert torch.equal(held[torch.tensor([1, 0])], to_tensor(pixels[[2, 7]]))


def test_resident_images_are_copied_once_and_lazy_ones_stay_lazy_on_the_cpu():
    """``resident`` copies the rows once: later changes to the pixels do not reach it. ``to("cpu")``
    keeps reading the pixels batch by batch (no copy), and keeps resident images resident."""
    pixels = _pixels()
    lazy = Images(pixels, np.array([4, 1, 6]))
    held = lazy.resident()
    before = held[0:3]
    pixels[[4, 1, 6]] = 255 - pixels[[4, 1, 6]]
    assert torch.equal(held[0:3], before)
    assert torch.equal(lazy[0:3], to_tensor(pixels[[4, 1, 6]])) and not torch.equal(lazy[0:3], before)
    on_cpu = lazy.to("cpu")
    assert on_cpu.rows is None and on_cpu.pixels is pixels
    assert held.to("cpu") is held


def test_training_on_resident_images_is_training_on_lazy_ones():
    """fit() on the resident images (index tensors gathered from the held rows) trains exactly as on
    the memory-mapped ones: the same losses and weights."""
    pixels = np.stack([(np.random.default_rng(i).random((32, 32)) * 255).astype(np.uint8) for i in range(24)])
    y = torch.arange(24) % 3
    hp = {**get_spec("cnn").defaults, "batch_size": 4, "depth": 1, "width": 4}
    cfg = settings("cnn", hp, epochs=2, seed=3, device="cpu")  # the cnn's recipe augments each batch
    runs = []
    for x in (Images(pixels), Images(pixels).resident()):
        result = fit("cnn", hp, FitData((x, y), (Images(pixels[:9]), y[:9]), 3), cfg)
        runs.append(([h.train_loss for h in result.history], result.model.state_dict()))
    (losses, weights), (held_losses, held_weights) = runs
    assert held_losses == losses
    assert all(torch.equal(weights[k], held_weights[k]) for k in weights)


@pytest.mark.parametrize(
    "cfg",
    [AugmentConfig(enabled=True, scanner=True), AugmentConfig(enabled=False, scanner=True),
     AugmentConfig(enabled=True, scanner=False, hflip=True, rotation=20, shift=0.2)],
)  # fmt: skip
def test_cpu_augmentation_draws_its_noise_and_parameters_from_the_cpu_generator(cfg):
    """On the CPU every draw, the full-size noise included, comes from the trial's generator in a
    fixed order: batch after batch, torch's path gives bit for bit the reference computation, the
    numba kernel the same images but for float rounding, and both leave the generator in the
    reference's state."""
    x = torch.from_numpy(_pixels(7, 24, seed=1)).unsqueeze(1).float() / 255  # (7, 1, 24, 24)
    by_torch = BatchAugment(cfg, torch.Generator().manual_seed(11), kernel=False)
    by_kernel = BatchAugment(cfg, torch.Generator().manual_seed(11))
    reference = torch.Generator().manual_seed(11)
    for batch in (x, x[:1], x[2:6]):
        expected = _cpu_augment_reference(cfg, reference, batch)
        assert torch.equal(by_torch(batch), expected)
        apart = (by_kernel(batch) - expected).abs()
        # a pixel on a quantisation step's edge may round to the next of its 15-255 levels
        assert apart.max() <= 1 / 15 + 1e-6 and (apart > 1e-4).float().mean() < 0.01 and apart.mean() < 1e-4
        if not cfg.scanner:  # no quantisation: float rounding alone
            assert apart.max() < 1e-4
    for augment in (by_torch, by_kernel):
        assert torch.equal(augment.generator.get_state(), reference.get_state())


@cuda
def test_images_on_a_gpu_are_resident_and_gathered_there_without_a_host_sync():
    pixels = _pixels(20, 16)
    lazy = Images(pixels, np.arange(19, -1, -2))
    gpu = lazy.to("cuda")
    assert gpu.rows.is_cuda and gpu.rows.dtype == torch.uint8 and tuple(gpu.rows.shape) == (10, 16, 16)
    assert gpu.to("cuda") is gpu and gpu.device.type == "cuda"
    for key in KEYS:
        batch = gpu[key]
        assert batch.is_cuda and torch.equal(batch.cpu(), lazy[key]), key
    order = torch.tensor([9, 0, 4, 4], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a host sync inside raises
    try:
        batch = gpu[order]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(batch.cpu(), lazy[order.cpu()])


@cuda
def test_augmentation_on_a_gpu_waits_for_no_kernel_and_follows_its_seed():
    """After its first batch (which makes the blur kernel and seeds the noise generator there), a
    batch is augmented with no host sync; the same seed gives the same batches, another seed others."""
    x = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)).cuda()
    cfg = AugmentConfig(enabled=True, scanner=True)
    make = lambda seed: BatchAugment(cfg, torch.Generator().manual_seed(seed))  # noqa: E731
    augment = make(0)
    first = augment(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = augment(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    again = make(0)
    assert torch.equal(again(x), first) and torch.equal(again(x), second)
    assert not torch.equal(make(1)(x), first) and not torch.equal(first, second)
    assert second.is_cuda and second.shape == x.shape and second.min() >= 0 and second.max() <= 1


@cuda
@pytest.mark.slow
def test_fit_on_a_gpu_trains_in_bfloat16_channels_last_and_returns_a_finite_cpu_model(monkeypatch):
    """On a GPU, fit() steps the cnn under bfloat16 autocast (float16 where the GPU lacks bfloat16)
    with channels-last activations, from resident images, and returns a finite NCHW model on the CPU."""
    from lungxray import train as train_module

    seen = []
    build = train_module.create_model

    def watched(*args, **kwargs):
        model = build(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_hook(
                    lambda m, inp, out: (
                        seen.append((out.dtype, out.is_contiguous(memory_format=torch.channels_last)))
                        if m.training
                        else None
                    )
                )
        return model

    monkeypatch.setattr(train_module, "create_model", watched)
    pixels = np.stack([(np.random.default_rng(i).random((32, 32)) * 255).astype(np.uint8) for i in range(48)])
    y = torch.arange(48) % 3
    hp = {**get_spec("cnn").defaults, "width": 8}
    result = fit("cnn", hp, FitData((Images(pixels), y), (Images(pixels[:12]), y[:12]), 3),
                 settings("cnn", hp, epochs=2, device="cuda"))  # fmt: skip
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    assert seen and {dtype for dtype, _ in seen} == {expected}
    assert all(channels_last for _, channels_last in seen)
    assert all(math.isfinite(h.train_loss) and math.isfinite(h.val_loss) for h in result.history)
    for name, weight in result.model.state_dict().items():
        assert weight.device.type == "cpu" and weight.is_contiguous(), name
        assert not weight.is_floating_point() or torch.isfinite(weight).all(), name
