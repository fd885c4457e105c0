"""The MLP's first layer stepped in one pass: its weight gradient and its Adam update fused (CPU).

The tutorial's MLP spends most of a training step on its first layer, a (layer_1, 16384) weight:
torch computes the weight gradient as a matrix product (``dz.T @ x``, writing a gradient as large as
the weight), then its fused Adam reads weight, gradient and both moments and writes three of them
back. ``FirstLayerAdam`` instead computes each gradient value from the batch where the update needs
it and never stores the gradient: one pass over weight and moments per step (``bench/step_bench.py``
measures the step against torch's, BENCHMARKS.md has the figures). Its forward product in training is
a numba kernel too, two weight rows at a time, each image's values loaded once for both: at batch 8
MKL's product of this skinny shape took ~1.6x as long on the machine measured.

Written by hand (with numba) because no library fuses a layer's gradient with its optimiser step:
torch's fused Adam starts from a stored gradient. The arithmetic is torch's Adam/AdamW, in float32,
summed in another order: the weights agree with torch's to float32 rounding, not bit for bit, and
are the same from run to run (each weight's sums in a fixed order, whichever thread steps its row).
Holds no training loop (``train.py``).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from lungxray.models import MLP

_GROUP = 8  # images summed in registers at once; a batch is padded with zero images to a multiple
_WEIGHTS_PER_THREAD = 1 << 18  # below this a thread's share (~0.25 ms) costs less than handing it over
# Larger batches are left to torch: the kernel reads the whole batch again for every row, where
# torch's matrix product blocks it (bench/step_bench.py --batch 16: 1.10x torch's speed side by
# side; --batch 32: 0.96x).
_MAX_BATCH = 16
_attached = [0]  # FirstLayerAdam objects attached in this process (trials side by side)
_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _compile():
    """The numba kernel (compiled on first use; numba caches it on disk for the next process)."""
    from lungxray._fused_kernel import adam_rows

    return adam_rows


class FirstLayerAdam:
    """Takes over the Adam (or AdamW) step of ``linear``'s weight from ``optimizer`` for one fit.

    Used as a context manager around the fit. While attached, the weight has ``requires_grad`` off,
    so backward computes no weight gradient and the optimiser skips it; the layer's forward in
    training is this object's (``_forward``), which keeps the layer's input with the gradient that
    reaches its output, and ``step()`` (called right after
    ``optimizer.step()``) applies the update with the group's learning rate, betas, eps and (AdamW)
    weight decay. Leaving the context hands the weight back.

    ``cores``: the process's CPU budget. Shared out among the layers attached at once, so a trial
    left training alone uses both cores: its rows are split among threads,
    which changes no result (each row's arithmetic is the same whichever thread does it). The
    forward product is split the same way.
    """

    def __init__(self, linear: nn.Linear, optimizer: torch.optim.Optimizer, cores: int = 1) -> None:
        self.linear, self.optimizer, self.cores = linear, optimizer, max(1, cores)

    @staticmethod
    def applies(
        model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, batch_size: int = _MAX_BATCH
    ) -> nn.Linear | None:
        """The layer to fuse: the first Linear of an MLP training on the CPU with plain Adam/AdamW,
        in batches of at most ``_MAX_BATCH`` images, numba installed; else None (torch's step)."""
        if not isinstance(model, MLP) or device.type != "cpu" or batch_size > _MAX_BATCH:
            return None
        linear = model.net[1]
        group = _group_of(linear.weight, optimizer)
        adamw = isinstance(optimizer, torch.optim.AdamW) or group is not None and group.get("decoupled_weight_decay")
        if (
            not isinstance(optimizer, torch.optim.Adam)
            or group is None
            or group.get("amsgrad")
            or group.get("maximize")
            or group.get("weight_decay", 0)
            and not adamw  # Adam's L2 term: left to torch
            or linear.bias is None
            or linear.weight.dtype != torch.float32
            or not linear.weight.is_contiguous()
        ):
            return None
        try:
            import numba  # noqa: F401
        except ImportError:
            return None
        return linear

    def __enter__(self) -> FirstLayerAdam:
        self.group = _group_of(self.linear.weight, self.optimizer)
        if self.group is None:
            raise ValueError(
                "the layer's weight is not among the optimiser's parameters; pass the optimiser that trains it"
            )
        self.decoupled = isinstance(self.optimizer, torch.optim.AdamW) or bool(self.group.get("decoupled_weight_decay"))
        self.weight_ = self.linear.weight.detach().numpy()  # (rows, n), shares memory with the weight
        self.m_, self.v_ = np.zeros_like(self.weight_), np.zeros_like(self.weight_)
        self.g_ = np.zeros((self.cores, self.weight_.shape[1]), dtype=np.float32)  # a row of scratch per thread
        self.steps_ = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.linear.weight.requires_grad_(False)
        self.linear.forward = self._forward  # the instance's own, until __exit__
        with _lock:
            _attached[0] += 1
        return self

    def __exit__(self, *exc) -> None:
        del self.linear.forward  # nn.Linear's again
        self.linear.weight.requires_grad_(True)
        with _lock:
            _attached[0] -= 1

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer in training: the product by the numba kernel, the output's gradient kept with
        the input for ``step``. In evaluation (or without grad) it is nn.Linear's own."""
        bias = self.linear.bias
        if not (self.linear.training and torch.is_grad_enabled() and bias.requires_grad):
            return nn.functional.linear(x, self.linear.weight, bias)
        if x.dim() != 2 or x.shape[1] != self.weight_.shape[1] or x.dtype != torch.float32 or x.requires_grad:
            # the kernel reads rows of exactly the weight's width, unchecked, and gives no input gradient
            raise ValueError(
                f"the fused first layer trains on float32 (batch, {self.weight_.shape[1]}) inputs that need no "
                f"gradient, got {x.dtype} {tuple(x.shape)}; train with --no-fused-step"
            )
        return _Product.apply(x, bias, self)

    def _product(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        xs = _padded(x)
        out = np.empty((len(xs), self.weight_.shape[0]), dtype=np.float32)
        kernel, b = _compile_forward(), bias.detach().numpy()
        self._split(lambda lo, hi, k: kernel(self.weight_, xs, b, out, lo, hi), pairs=True)
        return torch.from_numpy(out[: len(x)])

    def _split(self, work, pairs: bool = False) -> None:
        """``work(lo, hi, k)`` over the weight's rows, in as many ranges as the cores this layer has
        to itself allow (``pairs``: ranges start at even rows); range 0 on this thread."""
        rows = self.weight_.shape[0]
        parts = max(1, min(self.cores // max(1, _attached[0]), self.weight_.size // _WEIGHTS_PER_THREAD, rows // 2))
        unit = 2 if pairs else 1
        bounds = [min(rows, unit * (-(-rows // unit) * k // parts)) for k in range(parts + 1)]
        others = [_pool(self.cores).submit(work, bounds[k], bounds[k + 1], k) for k in range(1, parts)]
        work(bounds[0], bounds[1], 0)
        for other in others:
            other.result()

    def step(self) -> None:
        """The weight's Adam step from the last backward (nothing if there was none)."""
        if self._pending is None:
            return
        xs, dz = (_padded(t) for t in self._pending)
        self._pending = None
        self.steps_ += 1
        beta1, beta2 = self.group["betas"]
        lr, t = float(self.group["lr"]), self.steps_
        decay = 1 - lr * self.group["weight_decay"] if self.decoupled else 1.0
        hyper = (lr / (1 - beta1**t), beta1, beta2, 1 / math.sqrt(1 - beta2**t), self.group["eps"], decay)
        kernel, state = _compile(), (self.weight_, self.m_, self.v_)
        self._split(lambda lo, hi, k: kernel(state, xs, dz, self.g_[k], lo, hi, hyper))


class _Product(torch.autograd.Function):
    """The first layer's output in training (``FirstLayerAdam._product``). Its backward hands the
    output's gradient, with the layer's input, to ``FirstLayerAdam.step`` and returns the bias's
    gradient as nn.Linear's does (summed over the batch); the weight gets none, the step makes it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor, owner: FirstLayerAdam) -> torch.Tensor:
        ctx.owner = owner
        ctx.save_for_backward(x)
        return owner._product(x, bias)

    @staticmethod
    def backward(ctx, dz: torch.Tensor):
        (x,) = ctx.saved_tensors
        ctx.owner._pending = (x, dz)
        return None, dz.sum(0), None


def _compile_forward():
    from lungxray._fused_kernel import linear_rows

    return linear_rows


def _group_of(weight: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict | None:
    return next((g for g in optimizer.param_groups if any(p is weight for p in g["params"])), None)


def _pool(cores: int) -> ThreadPoolExecutor:
    """Threads for the other row ranges of a step (the calling thread takes the first)."""
    with _lock:
        if cores not in _pools:
            _pools[cores] = ThreadPoolExecutor(max_workers=cores - 1, thread_name_prefix="lungxray-rows")
        return _pools[cores]


def _padded(t: torch.Tensor) -> np.ndarray:
    """(b, k) float32, C-contiguous, zero rows added to a multiple of 8 (they add zero to every sum)."""
    a = np.ascontiguousarray(t.numpy(), dtype=np.float32)
    extra = -len(a) % _GROUP
    return np.concatenate([a, np.zeros((extra, a.shape[1]), np.float32)]) if extra else a
