"""Which convolution shapes torch's CPU kernels get wrong in bfloat16 mixed precision: the output,
the input gradient and the weight gradient of every case against float32 on the same
bfloat16-rounded numbers, each case run on memory filled with NaN first (a kernel that leaves part
of its result unwritten then shows it). Prints the cases off by more than 5% of the reference's
largest value, and section "onednn-bf16" of BENCHMARKS.md.

Cases: 1x1, 3x3 and 7x7 kernels (7x7 from one channel, the stem), stride 1 and 2 (1x1 at stride 2
only), padding k // 2, square inputs of 1-16 pixels, 1-64 input channels, NCHW and channels-last,
three draws each, on one thread and on every core.

    .venv/bin/python bench/onednn_check.py
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, update_section  # noqa: E402

SIZES, CHANNELS = (1, 2, 3, 4, 5, 8, 9, 16), (1, 8, 16, 24, 64)


def worst_error(layout: str, kernel: int, stride: int, size: int, channels: int) -> float:
    """The largest error of three draws, as a share of the reference's largest value."""
    worst = 0.0
    for _ in range(3):
        dirty = [torch.full((1 << 16,), float("nan")) for _ in range(30)]  # freed memory that holds NaN
        del dirty
        conv = nn.Conv2d(channels, 32, kernel, stride, kernel // 2, bias=False)
        x = torch.rand(8, channels, size, size)
        if layout == "channels-last":
            conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        upstream = torch.randn(out.shape)
        out.float().backward(upstream)
        weight = conv.weight.detach().to(torch.bfloat16).float().requires_grad_()
        image = x.detach().to(torch.bfloat16).float().requires_grad_()
        reference = nn.functional.conv2d(image, weight, stride=stride, padding=kernel // 2)
        reference.backward(upstream.to(torch.bfloat16).float())
        for got, want in ((out.float(), reference), (conv.weight.grad, weight.grad), (x.grad, image.grad)):
            error = (got - want).abs().max().item() / max(1e-3, want.abs().max().item())
            worst = max(worst, error if error == error else float("inf"))  # NaN: as bad as it gets
    return worst


def main() -> None:
    cases = [
        (layout, k, s, size, c)
        for layout, k, s, size, c in itertools.product(("NCHW", "channels-last"), (1, 3, 7), (1, 2), SIZES, CHANNELS)
        if not (k == 7 and c > 1) and not (k == 1 and s == 1)
    ]
    lines = []
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        wrong = [(case, e) for case in cases if (e := worst_error(*case)) > 0.05]
        print(f"{threads} thread(s): {len(wrong)} of {len(cases)} cases wrong", flush=True)
        lines.append(f"- {threads} thread(s): {len(wrong)} of {len(cases)} cases off by more than 5%"
                     + (":" if wrong else "."))  # fmt: skip
        lines += [
            f"  - {layout}, {k}x{k} stride {s}, {size}x{size} input, {c} channels: {e:.3g}"
            for (layout, k, s, size, c), e in wrong
        ]
    body = "\n".join(
        [
            "### bfloat16 convolutions on this CPU, case by case",
            "",
            f"Command: `.venv/bin/python bench/onednn_check.py` ({machine()}, the oneDNN torch ships). "
            "Error of the output, the input gradient and the weight gradient against float32 on the same "
            "bfloat16-rounded numbers, as a share of the reference's largest value, worst of three draws. "
            "(A kernel that writes past its own memory, as oneDNN#6035's strided 1x1 one does, can leave "
            "its own result right: this check does not see that.)",
            "",
            *lines,
        ]
    )
    print(body)
    update_section("onednn-bf16", body)


if __name__ == "__main__":
    main()
