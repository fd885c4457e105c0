"""Where and in what arithmetic a model trains: the device (``--device``), mixed precision
(``--precision``) and the memory layout of its convolutions.

``--device auto`` takes CUDA when torch sees a GPU. ``--precision auto`` trains in bfloat16 mixed
precision on a GPU (float16 with loss scaling on one without bfloat16) and in float32 on the CPU.
Convolutional networks train channels-last (NHWC), the layout oneDNN and cuDNN run fastest, where
that is safe. On the CPU the two do not go together: after torch 2.13's oneDNN trained the small
CNN in bfloat16 channels-last, float32 predictions later in the same process came out NaN (in
some loads of a saved model, never after float32 channels-last or bfloat16 NCHW training; the
issue's notes have the counts), and on one core float32 channels-last stepped faster than
bfloat16 NCHW in a timing by hand. Holds no training loop.
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
    return None


def channels_last_safe(model: nn.Module) -> bool:
    """Whether ``model`` may train channels-last on the CPU: it has convolutions, and none is a
    strided 1x1 convolution with fewer than 16 input channels. oneDNN's kernel for that case writes
    past its workspace in the weight gradient (uxlfoundation/oneDNN#6035: crashes, or wrong
    gradients); the width-8 small CNN's first downsampling convolution hit it on this project's machine."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return bool(convs) and not any(m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels < 16 for m in convs)


def trains_channels_last(model: nn.Module, device: torch.device, autocast: torch.dtype | None) -> bool:
    """Whether ``model`` trains channels-last on ``device`` with mixed precision ``autocast``: a
    convolutional network; on the CPU only in float32 and where ``channels_last_safe``."""
    if device.type == "cuda":
        return any(isinstance(m, nn.Conv2d) for m in model.modules())
    return autocast is None and channels_last_safe(model)
