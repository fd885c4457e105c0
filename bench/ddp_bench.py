"""Training throughput of `lungxray train` in 1 and 2 processes (DistributedDataParallel through
torchrun), and on a GPU when one is there.

Each setting trains the model twice, for 1 epoch and for 1 + E epochs (no early stopping, the
same data and split), and the difference of the two wall times over E is the cost of an epoch:
the scan, the model's set-up and the bundle's writing cancel out. The settings alternate within
each of R rounds; the median per setting gives train images/s and the ratio to one process.

    .venv/bin/python bench/ddp_bench.py DATA [--model cnn] [--epochs 10] [--rounds 3] [--settings cpu:1 cpu:2 cuda:1]
        [--shrink-from SRC]

``--shrink-from SRC`` first makes DATA from the dataset SRC, each image's long side at most 512 px
(JPEG, quality 92): small enough to travel to a lent GPU machine, and still decoded to 128 px.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train_seconds(data: Path, out: Path, cache: Path, model: str, epochs: int, device: str, nproc: int) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "lungxray.cli", "train", str(data), "--out", str(out), "--model", model,
         "--params", "defaults", "--epochs", str(epochs), "--patience", "0", "--device", device,
         "--cache-dir", str(cache), "--quiet", "--force", "--nproc", str(nproc)],
        check=True, capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - start


def shrink(source: Path, target: Path) -> None:
    """A copy of the dataset ``source`` with each image's long side at most 512 px, as JPEG."""
    from PIL import Image

    for path in sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith(".")):
        out = target / path.relative_to(source).with_suffix(".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            gray = image.convert("L")
        gray.thumbnail((512, 512))
        gray.save(out, quality=92)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=["cpu:1", "cpu:2"], help="DEVICE:PROCESSES")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--shrink-from", type=Path, default=None, metavar="SRC", help="make DATA from SRC first")
    args = parser.parse_args()
    if args.shrink_from is not None and not args.data.exists():
        shrink(args.shrink_from, args.data)
    import torch

    work = Path(tempfile.mkdtemp(prefix="ddp-bench-"))
    cache = work / "cache"
    train_seconds(args.data, work / "warm", cache, args.model, 1, "cpu", 1)  # the scan, once, into the cache
    per_epoch: dict[str, list[float]] = {s: [] for s in args.settings}
    for r in range(args.rounds):
        for setting in args.settings[r % len(args.settings) :] + args.settings[: r % len(args.settings)]:
            device, nproc = setting.split(":")
            out = work / setting.replace(":", "-")
            short = train_seconds(args.data, out, cache, args.model, 1, device, int(nproc))
            long = train_seconds(args.data, out, cache, args.model, 1 + args.epochs, device, int(nproc))
            per_epoch[setting].append((long - short) / args.epochs)
    n_train = json.loads((work / "warm" / "splits.json").read_text())["sizes"]["train"]
    base = statistics.median(per_epoch[args.settings[0]])
    rows = []
    for setting, seconds in per_epoch.items():
        s = statistics.median(seconds)
        rows.append({"setting": setting, "seconds_per_epoch": s, "images_per_s": n_train / s, "speedup": base / s})
        print(f"{setting:8s} {s:7.3f} s/epoch {n_train / s:8.1f} train images/s  x{base / s:.2f}")
    info = {"model": args.model, "train_images": n_train, "epochs": args.epochs, "rounds": args.rounds,
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "rows": rows}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
