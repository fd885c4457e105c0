"""The optimiser step of the tutorial's largest MLP, the floor of its search: where its time goes,
and one remedy measured against it.

1. ``torch.profiler`` over 100 steps (16384-128-128-128-3, batch 8, fused Adam, one thread):
   the share of each kind of operation.
2. Side by side, as the search runs two trials, one thread each, alternating, ``--repeats`` times:
   the plain step against the first layer's gradient computed in slices of rows, each slice
   applied at once by the same fused Adam kernel while it is still in cache (the layer's weights,
   gradient and two moments are 34 MB, above this machine's 32 MB L3). The weights of the two
   after 30 steps are compared bit for bit.

    .venv/bin/python bench/step_bench.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine  # noqa: E402

from lungxray.models import create_model, seed_dropout  # noqa: E402
from lungxray.train import make_optimizer  # noqa: E402

HP = {"activation": "tanh", "layer_1": 128, "layer_2": 128, "layer_3": 128, "dropout_1": 0.1, "dropout_2": 0.2,
      "learning_rate": 1e-4}  # fmt: skip


class _FirstLayer(torch.autograd.Function):
    """The first Linear, its weight gradient left to the stepper (only the experiment uses it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, box):
        ctx.save_for_backward(x)
        ctx.box = box
        return torch.addmm(bias, x, weight.t())

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        ctx.box[:] = [dy, x]
        return None, None, dy.sum(0), None


def stepper(rows: int = 0):
    """(model, step(x, y)): the plain step, or with ``rows`` the first layer stepped in slices."""
    torch.manual_seed(0)
    model = create_model("mlp", (1, 128, 128), 3, **HP).train()
    seed_dropout(model, torch.Generator().manual_seed(1))  # its own dropout draws, as in training
    first, box = model.net[1], []
    if rows:
        model.net[1] = _Wrapped(first, box)
    optimizer = make_optimizer(model, HP, "adam")
    weight = first.weight
    state = {"m": torch.zeros_like(weight), "v": torch.zeros_like(weight), "t": torch.zeros(())}

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if rows:
            dy, xx = box
            state["t"] += 1
            with torch.no_grad():
                for r in range(0, weight.shape[0], rows):
                    grad = torch.mm(dy[:, r : r + rows].t(), xx)
                    torch._fused_adam_([weight[r : r + rows]], [grad], [state["m"][r : r + rows]],
                                       [state["v"][r : r + rows]], [], [state["t"]], lr=HP["learning_rate"],
                                       beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                                       maximize=False)  # fmt: skip

    return model, step


class _Wrapped(nn.Module):
    def __init__(self, linear: nn.Linear, box: list) -> None:
        super().__init__()
        self.weight, self.bias, self.box = linear.weight, linear.bias, box

    def forward(self, x):
        return _FirstLayer.apply(x, self.weight, self.bias, self.box)


def side_by_side_ms(rows: int, steps: int = 200) -> float:
    """Mean ms per step of two such steppers running at once in threads, one torch thread each."""
    torch.set_num_threads(1)
    x, y, out = torch.rand(8, 1, 128, 128), torch.arange(8) % 3, [0.0, 0.0]

    def run(k: int) -> None:
        _, step = stepper(rows)
        for _ in range(10):
            step(x, y)
        start = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        out[k] = (time.perf_counter() - start) / steps * 1e3

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statistics.mean(out)


def profile_shares() -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    _, step = stepper()
    x, y = torch.rand(8, 1, 128, 128), torch.arange(8) % 3
    for _ in range(30):
        step(x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(100):
            step(x, y)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    kinds = {
        "backward matrix products (aten::mm)": ("aten::mm",),
        "fused Adam": ("aten::_fused_adam_",),
        "forward matrix products (aten::addmm)": ("aten::addmm",),
        "optimiser and zero_grad Python": ("Optimizer.step#Adam.step", "Optimizer.zero_grad#Adam.zero_grad"),
    }
    shares = [(k, sum(e.self_cpu_time_total for e in events if e.key in keys) / total) for k, keys in kinds.items()]
    return shares + [("everything else", 1 - sum(s for _, s in shares))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"{machine()}\n\none step, one thread, by torch.profiler (self CPU time):")
    for kind, share in profile_shares():
        print(f"  {share:6.1%}  {kind}")
    (a, step_a), (b, step_b) = stepper(), stepper(16)
    xs, y = [torch.rand(8, 1, 128, 128) for _ in range(5)], torch.arange(8) % 3
    for i in range(30):
        step_a(xs[i % 5], y)
        step_b(xs[i % 5], y)
    same = all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    print(f"\nweights after 30 steps, plain and in slices of 16 rows: {'bitwise the same' if same else 'DIFFERENT'}")
    print("ms per step, two side by side (alternating):")
    for r in range(args.repeats):
        row = [f"plain {side_by_side_ms(0):.2f}"] + [f"slices of {n} {side_by_side_ms(n):.2f}" for n in (4, 16, 32)]
        print(f"  repeat {r + 1}: " + ", ".join(row))


if __name__ == "__main__":
    main()
