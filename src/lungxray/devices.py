"""Where and in what arithmetic a model trains: the device (``--device``), mixed precision
(``--precision``) and the memory layout of its convolutions.

``--device auto`` takes CUDA when torch sees a GPU. ``--precision auto`` trains in bfloat16 mixed
precision on a GPU (float16 with loss scaling on one without bfloat16) and on a CPU that computes
bfloat16 in hardware (AVX512-BF16 or AMX), else in float32. Convolutional networks train
channels-last (NHWC), the layout oneDNN and cuDNN run fastest, where that is safe. On the CPU two
oneDNN kernels of torch 2.13 are kept out of: a strided 1x1 convolution's weight gradient from a
channels-last source with few channels (``channels_last_safe``; the ResNets' shortcuts no longer
call it, ``models.SubsampledPointwise``), and bfloat16's weight gradient of a strided convolution
reading a 1x1 input (``bfloat16_safe``). Holds no training loop.
"""

from __future__ import annotations

import torch
from torch import nn

from lungxray.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda, but torch sees no CUDA GPU (the CPU build of torch, or no driver); use --device cpu or auto"
        )
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype training steps autocast to under ``--precision`` on ``device``; None: float32."""
    if precision == "float32":
        return None
    if precision == "float16":
        if device.type != "cuda":
            raise ConfigError(
                "--precision float16 needs a GPU (torch's CPU steps have no float16 mixed precision)",
                hint="use --precision bfloat16 or float32 on the CPU",
            )
        return torch.float16
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":  # auto
        # emulated bfloat16 (a T4's, a V100's) is slower than float16 with loss scaling
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if native_bfloat16() else None


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), asked of torch at run time.
    Elsewhere oneDNN emulates bfloat16 with float32 arithmetic and conversions, slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def bfloat16_safe(model: nn.Module, in_shape: tuple[int, ...]) -> bool:
    """Whether ``model`` may train in bfloat16 on the CPU: no convolution of stride above 1 reads a
    1x1 input (the small CNN's last stage at 16 px). There torch 2.13's oneDNN (``jit_bf16``
    backward weights, in either layout) returns whatever memory held as the weight gradient of the
    kernel taps that fall on padding, where it should be 0: NaN or numbers near 1e35 in many calls,
    and a float32 model with those weights predicts NaN. Each convolution's input size is read from
    one forward pass of a blank ``in_shape`` image."""
    sizes: list[tuple[int, ...]] = []

    def record(module: nn.Module, args: tuple) -> None:
        if max(module.stride) > 1:
            sizes.append(tuple(args[0].shape[2:]))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *in_shape, device=next(model.parameters(), torch.empty(0)).device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    return all(min(size) > 1 for size in sizes)


def training_arithmetic(
    precision: str, device: torch.device, model: nn.Module, in_shape: tuple[int, ...]
) -> tuple[torch.dtype | None, bool]:
    """(the dtype training steps autocast to, None for float32; whether they run channels-last) for
    ``model`` taking ``in_shape`` images on ``device`` under ``--precision``. ``auto`` falls back to
    float32 where bfloat16 is not ``bfloat16_safe``; an explicit ``bfloat16`` there is refused."""
    autocast = autocast_dtype(precision, device)
    if autocast == torch.bfloat16 and device.type == "cpu" and not bfloat16_safe(model, in_shape):
        if precision == "bfloat16":
            raise ConfigError(
                f"--precision bfloat16 on the CPU computes wrong weight gradients for this network at "
                f"{'x'.join(map(str, in_shape[1:]))} px: a strided convolution reads a 1x1 input (a oneDNN defect)",
                hint="use --precision float32 or auto, or a larger --img-size",
            )
        autocast = None
    return autocast, trains_channels_last(model, device)


def channels_last_safe(model: nn.Module) -> bool:
    """Whether ``model`` may train channels-last on the CPU: it has convolutions, and none is a
    strided 1x1 convolution with fewer than 16 input channels. oneDNN's kernel for that case writes
    past its workspace in the weight gradient (uxlfoundation/oneDNN#6035: crashes, or wrong
    gradients); the width-8 small CNN's first shortcut hit it on this project's machine, before
    ``models.SubsampledPointwise`` took the ResNets' shortcuts off that kernel."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return bool(convs) and not any(m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels < 16 for m in convs)


def trains_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model`` trains channels-last on ``device``: a convolutional network; on the CPU
    where ``channels_last_safe``, in float32 and bfloat16 alike."""
    if device.type == "cuda":
        return any(isinstance(m, nn.Conv2d) for m in model.modules())
    return channels_last_safe(model)
