"""Memory and speed of one training epoch as the dataset grows: images read from the cache's
memory-mapped stack per batch (``infer.Images``, what training does now) against every image
held as a float32 tensor (what it did before).

For each size N (128 px images), a synthetic (N, 128, 128) uint8 stack is written to a temporary
file, as the cache writes one; then a fresh process trains the tutorial's MLP for one epoch
(batch 64) on it, one way or the other, and reports its peak resident memory (VmHWM, which also
counts the file's pages the kernel keeps mapped, reclaimable at will), the peak of its anonymous
memory (RssAnon, sampled every 50 ms: what cannot be given back) and train images/s. The two ways
alternate for each size.

    .venv/bin/python bench/memory_bench.py [--sizes 1000 10000 50000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, update_section  # noqa: E402

CHILD = r"""
import json, sys, threading, time
import numpy as np, torch
from lungxray.infer import Images, to_tensor
from lungxray.config import TrainConfig
from lungxray.job import Job
from lungxray.models import create_model, get_spec
from lungxray.train import _training_parts, train_one_epoch

path, n, way = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
peak = [anon()]
stop = threading.Event()
def watch():
    while not stop.wait(0.05):
        peak[0] = max(peak[0], anon())
threading.Thread(target=watch, daemon=True).start()
pixels = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, 128, 128))
x = Images(pixels) if way == "memmap" else to_tensor(pixels)
y = torch.from_numpy(np.arange(n) % 3)
hp = {**get_spec("mlp").defaults}
torch.manual_seed(0)
model = create_model("mlp", (1, 128, 128), 3, **hp)
cfg = Job(path, model="mlp", train=TrainConfig(batch_size=64)).final.for_params(hp)
optimizer, options = _training_parts(model, hp, cfg, y, 3, torch.device("cpu"))
start = time.perf_counter()
train_one_epoch(model, optimizer, x, y, 64, torch.Generator().manual_seed(0), options)
seconds = time.perf_counter() - start
stop.set()
hwm = next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"n": n, "way": way, "peak_rss_mb": hwm, "peak_anon_mb": max(peak[0], anon()),
                  "images_per_s": n / seconds}))
"""


def write_stack(path: Path, n: int) -> None:
    """A synthetic (n, 128, 128) uint8 stack: noise with a class-dependent bright band, in chunks."""
    out = np.memmap(path, dtype=np.uint8, mode="w+", shape=(n, 128, 128))
    rng = np.random.default_rng(0)
    for start in range(0, n, 1000):
        chunk = rng.normal(90, 25, (min(1000, n - start), 128, 128))
        for k in range(len(chunk)):
            band = (start + k) % 3
            chunk[k, :, band * 42 : (band + 1) * 42] += 100
        out[start : start + len(chunk)] = np.clip(chunk, 0, 255).astype(np.uint8)
    out.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for n in args.sizes:
            path = Path(work) / f"stack-{n}.u8"
            write_stack(path, n)
            for way in ("memmap", "in-memory"):
                done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(n), way],
                                      capture_output=True, text=True, check=True)  # fmt: skip
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(rows[-1])
            path.unlink()
    table = "\n".join(
        f"| {r['n']:,} | {r['way']} | {r['peak_anon_mb']:,} | {r['peak_rss_mb']:,} | {r['images_per_s']:,.0f} |"
        for r in rows
    )
    body = f"""## Memory of a training epoch as the dataset grows

Command: `.venv/bin/python bench/memory_bench.py --sizes {" ".join(map(str, args.sizes))}` on {machine()}.
One epoch of the tutorial's MLP (batch 64) on N synthetic 128 px images, in a fresh process each:
`memmap` reads each batch from the memory-mapped stack the cache keeps (what training does), `in-memory`
first converts every image to a float32 tensor (what it did before). Anonymous memory is what the
process cannot give back; the peak resident memory also counts the stack's file pages the kernel
keeps mapped, which it reclaims when memory runs short.

| images | way | peak anonymous memory (MB) | peak resident memory (MB) | train images/s |
|---|---|---|---|---|
{table}
"""
    update_section("memory", body)
    print(body)


if __name__ == "__main__":
    main()
