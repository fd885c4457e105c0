"""An epoch of the search against the floor's steps, two threads side by side as the search runs two trials.

Each of two threads trains its own MLP (first layer WIDTH wide, 64, 64; batch 8; the first layer
stepped by ``fused.FirstLayerAdam`` as in the search) on 222 random 128x128 images and times, in
turn and 6 times (the first dropped): 28 steps on one preloaded batch (the floor's step), one
``train_one_epoch`` (a new batch gathered at every step), the same plus a validation pass of 32
images, and plus a copy of the weights (a new best epoch). Prints thread 0's median ms of each.

    .venv/bin/python bench/epoch_overhead.py WIDTH
"""

import copy
import statistics
import sys
import threading
import time

import torch
from torch import nn

from lungxray.fused import FirstLayerAdam
from lungxray.models import create_model
from lungxray.train import StepOptions, evaluate_loss, make_optimizer, train_one_epoch

torch.set_num_threads(1)
width = int(sys.argv[1])
params = {
    "activation": "relu",
    "layer_1": width,
    "layer_2": 64,
    "layer_3": 64,
    "dropout_1": 0.0,
    "dropout_2": 0.2,
    "learning_rate": 1e-4,
}
x = torch.rand(222, 1, 128, 128)
y = torch.arange(222) % 3
vx = torch.rand(32, 1, 128, 128)
vy = torch.arange(32) % 3
modes = ["hot", "epoch", "epoch+val", "epoch+val+copy"]
times = {m: [] for m in modes}
barrier = threading.Barrier(2)


def worker(k):
    torch.manual_seed(k)
    model = create_model("mlp", (1, 128, 128), 3, **params).train()
    opt = make_optimizer(model, params, "adam")
    g = torch.Generator().manual_seed(k)
    with FirstLayerAdam(model.net[1], opt, 2) as first:
        barrier.wait()
        for rep in range(6):
            for m in modes:
                barrier.wait()
                t = time.perf_counter()
                for _ in range(3):
                    if m == "hot":
                        xb, yb = x[:8], y[:8]
                        for _ in range(28):
                            loss = nn.functional.cross_entropy(model(xb), yb)
                            opt.zero_grad(set_to_none=True)
                            loss.backward()
                            opt.step()
                            first.step()
                    else:
                        train_one_epoch(model, opt, x, y, 8, g, StepOptions(first_layer=first))
                        if "val" in m:
                            evaluate_loss(model, vx, vy)
                            model.train()
                        if "copy" in m:
                            copy.deepcopy(model.state_dict())
                if k == 0 and rep > 0:
                    times[m].append((time.perf_counter() - t) / 3)


ts = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
[t.start() for t in ts]
[t.join() for t in ts]
print(f"width {width}: " + ", ".join(f"{m} {1e3 * statistics.median(v):.1f} ms" for m, v in times.items()))
