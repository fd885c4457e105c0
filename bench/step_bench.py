"""The optimiser step of the tutorial's largest MLP, the floor of its search: where its time goes,
and the first layer stepped in one pass (``lungxray.fused``) against torch's own step.

1. ``torch.profiler`` over 100 steps (16384-128-128-128-3, batch 8, one thread), torch's step and
   the fused one: the share of each kind of operation.
2. ms per step, ``--repeats`` times, alternating: two steppers side by side in threads (one torch
   thread each, as the search runs two trials), and one stepper alone (a trial training alone:
   the fused step then splits its rows over both cores, for its forward product and its
   update; torch's own step gets the threads MKL takes in a thread of its own, the machine's).
   The weights of the two after 30 steps are compared, and the first layer's forward product
   timed on its own: nn.Linear's (MKL) against the fused step's numba kernel.

    .venv/bin/python bench/step_bench.py [--repeats 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine  # noqa: E402

from lungxray.fused import FirstLayerAdam, _padded  # noqa: E402
from lungxray.models import create_model, seed_dropout  # noqa: E402
from lungxray.train import make_optimizer  # noqa: E402

FUSED = "first layer, gradient and Adam in one pass (numba)"
FORWARD = "first layer, forward product in training (numba)"
HP = {"activation": "tanh", "layer_1": 128, "layer_2": 128, "layer_3": 128, "dropout_1": 0.1, "dropout_2": 0.2,
      "learning_rate": 1e-4}  # fmt: skip


def stepper(fused: bool, cores: int = 1):
    """(model, step(x, y), close()): torch's step, or with ``fused`` the first layer's in one pass
    (its rows split over ``cores`` threads when it is the only layer attached)."""
    torch.manual_seed(0)
    model = create_model("mlp", (1, 128, 128), 3, **HP).train()
    seed_dropout(model, torch.Generator().manual_seed(1))  # its own dropout draws, as in training
    optimizer = make_optimizer(model, HP, "adam")
    attached = contextlib.ExitStack()
    first = attached.enter_context(FirstLayerAdam(model.net[1], optimizer, cores)) if fused else None

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if first is not None:
            with torch.profiler.record_function(FUSED):  # the profiler sees no torch operation in it
                first.step()

    return model, step, attached.close


def ms_per_step(fused: bool, jobs: int, batch: int = 8, steps: int = 200) -> float:
    """Mean ms per step of ``jobs`` such steppers running at once in threads, one torch thread each."""
    torch.set_num_threads(1)
    x, y, out = torch.rand(batch, 1, 128, 128), torch.arange(batch) % 3, [0.0] * jobs
    started, finished = threading.Barrier(jobs), threading.Barrier(jobs)

    def run(k: int) -> None:
        _, step, close = stepper(fused, os.cpu_count() or 1)  # the process's cores, as in training
        started.wait(timeout=600)
        for _ in range(10):
            step(x, y)
        start = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        out[k] = (time.perf_counter() - start) / steps * 1e3
        finished.wait(timeout=600)
        close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statistics.mean(out)


def forward_ms(batch: int, calls: int = 300) -> tuple[float, float]:
    """ms per call of the first layer's forward product at the largest width: nn.Linear's (MKL)
    and the fused step's numba kernel, one thread."""
    from lungxray.fused import _compile_forward

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, weight, bias = torch.rand(batch, 128 * 128), torch.randn(128, 128 * 128) * 0.01, torch.randn(128)
    xs, w, b = _padded(x), weight.numpy(), bias.numpy()
    out, kernel = np.empty((len(xs), 128), dtype=np.float32), _compile_forward()
    times = []
    for run in (lambda: nn.functional.linear(x, weight, bias), lambda: kernel(w, xs, b, out, 0, 128)):
        for _ in range(20):
            run()
        start = time.perf_counter()
        for _ in range(calls):
            run()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return times[0], times[1]


def profile_shares(fused: bool) -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity, profile, record_function

    product = FirstLayerAdam._product

    def named(self, x, bias):  # the profiler sees no torch operation in the numba product either
        with record_function(FORWARD):
            return product(self, x, bias)

    FirstLayerAdam._product = named
    try:
        return _shares(fused, profile, ProfilerActivity)
    finally:
        FirstLayerAdam._product = product


def _shares(fused: bool, profile, ProfilerActivity) -> list[tuple[str, float]]:

    torch.set_num_threads(1)
    _, step, close = stepper(fused)
    x, y = torch.rand(8, 1, 128, 128), torch.arange(8) % 3
    for _ in range(30):
        step(x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(100):
            step(x, y)
    close()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    kinds = {
        "backward matrix products (aten::mm)": ("aten::mm",),
        "fused Adam": ("aten::_fused_adam_",),
        "forward matrix products (aten::addmm)": ("aten::addmm",),
        "optimiser and zero_grad Python": ("Optimizer.step#Adam.step", "Optimizer.zero_grad#Adam.zero_grad"),
    }
    if fused:
        kinds[FUSED] = (FUSED,)
        kinds[FORWARD] = (FORWARD,)
    shares = [(k, sum(e.self_cpu_time_total for e in events if e.key in keys) / total) for k, keys in kinds.items()]
    return shares + [("everything else", 1 - sum(s for _, s in shares))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="images per step in the timed steps")
    args = parser.parse_args()
    print(machine())
    for fused in (False, True):
        print(f"\none step, one thread, {'fused' if fused else 'torch'}, by torch.profiler (self CPU time):")
        for kind, share in profile_shares(fused):
            print(f"  {share:6.1%}  {kind}")
    (a, step_a, _), (b, step_b, close_b) = stepper(False), stepper(True)
    xs, y = [torch.rand(8, 1, 128, 128) for _ in range(5)], torch.arange(8) % 3
    for i in range(30):
        step_a(xs[i % 5], y)
        step_b(xs[i % 5], y)
    close_b()
    gap = max((p - q).abs().max().item() for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    first = (a.net[1].weight - b.net[1].weight).abs()
    print(
        f"\nweights after 30 steps (learning rate 1e-4), torch's and fused: largest difference {gap:.2e}; "
        f"first layer: {int((first > 1e-6).sum())} of {first.numel():,} beyond 1e-6, median {first.median():.1e}"
    )
    print("forward product alone (first layer, one thread, alternating), ms: MKL (nn.Linear) | numba (fused)")
    for r in range(args.repeats):
        mkl, numba_ms = forward_ms(args.batch)
        print(f"  repeat {r + 1}: {mkl:.3f} | {numba_ms:.3f}  ({mkl / numba_ms:.2f}x)")
    print(f"ms per step of {args.batch} images (alternating): two side by side | one alone")
    rows = []
    for r in range(args.repeats):
        row = {(f, j): ms_per_step(f, j, args.batch) for j in (2, 1) for f in (False, True)}
        rows.append(row)
        print(f"  repeat {r + 1}: torch {row[False, 2]:.2f}, fused {row[True, 2]:.2f} | "
              f"torch {row[False, 1]:.2f}, fused {row[True, 1]:.2f}")  # fmt: skip
    for j, name in ((2, "side by side"), (1, "alone")):
        ratios = [row[False, j] / row[True, j] for row in rows]
        print(f"torch / fused, {name}: {statistics.median(ratios):.2f}x median ({min(ratios):.2f}-{max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
