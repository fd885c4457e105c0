"""lungxray's training on a GPU against a plain PyTorch loop on the same card, and the default
search on the GPU against the same machine's CPU. One prepared run, about 5 minutes on an H100.

1. Training images/s of cnn (its registered defaults), resnet18 and densenet121 at 128 and 224 px,
   on synthetic uint8 images (2,048 at 128 px, 1,024 at 224), each network's registered batch size:
   (a) lungxray: ``train.fit`` as the pipeline calls it, with ``resolve_train(TrainConfig(epochs=5,
       device="cuda"), recipe).for_params(hp)`` (the recipe's augmentation, bfloat16 autocast,
       channels-last), the images in ``infer.Images`` (so resident on the GPU as uint8). The first
       epoch is a warm-up; the others are timed between ``on_epoch`` calls, less the time of each
       epoch's validation (``train.evaluate_loss``, timed by a wrapper).
   (b) plain: the same MONAI network (``models.create_model``) and batch size, float images already
       on the GPU, bfloat16 autocast, channels-last, fused AdamW, no augmentation, no host sync in
       the epoch; one warm-up epoch, then as many timed as (a).
   and lungxray / plain per network and size (the aim: 0.9 or more).
2. ``lungxray run DATA --device cuda --seed 0 --force --quiet`` against ``--device cpu``: each
   search's seconds (run.json's timings.tune_s), ``--trials`` shortening both alike.

The device machine takes at most 64 MiB of working tree and none of ../shared: make a copy of the
data set with smaller files first (``--shrink-data DIR``, images at most 512 px, about 12 MB) and
carry that folder. A machine with its own CUDA torch and no network also needs lungxray's other
dependencies as wheels for its Python, downloaded here and carried too:

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        -d bench/out/wheels monai optuna alembic Mako SQLAlchemy colorlog greenlet ImageHash PyWavelets \
        docstring_parser pydicom
    # there:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site bench/out/wheels/*.whl
    PYTHONPATH=/tmp/site:$PWD/src python3 bench/gpu_bench.py bench/out/gpu-data --trials 8 --out $OUT/gpu_bench.json

``--quick`` runs everything tiny on the CPU (a smoke test, under 2 minutes).

    python bench/gpu_bench.py [DATA] [--trials N] [--out FILE] [--quick]
    python bench/gpu_bench.py DATA --shrink-data bench/out/gpu-data
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lungxray import train as train_module
from lungxray.config import TrainConfig, resolve_train
from lungxray.infer import Images
from lungxray.models import create_model, get_spec
from lungxray.train import FitData, fit

NETWORKS = ("cnn", "resnet18", "densenet121")
FULL = {"device": "cuda", "sizes": {128: 2048, 224: 1024}, "epochs": 5, "budget": 500}
QUICK = {"device": "cpu", "sizes": {32: 64, 64: 64}, "epochs": 1, "budget": 300}
RUN = "import sys; from lungxray.cli import main; sys.exit(main(sys.argv[1:]))"


def header(device: str) -> dict:
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "device": device,
    }


def images(size: int, n: int) -> tuple[np.ndarray, torch.Tensor]:
    """(n + n // 8, size, size) uint8 noise and its labels (3 classes): n training images, then validation ones."""
    total = n + n // 8
    return np.random.default_rng(size).integers(0, 256, (total, size, size), dtype=np.uint8), torch.arange(total) % 3


def lungxray_rate(name: str, size: int, n: int, settings: dict) -> dict:
    """Training images/s of ``train.fit`` over the epochs after the first, validation taken out."""
    spec, device, epochs = get_spec(name), settings["device"], settings["epochs"]
    hp = dict(spec.defaults)
    cfg = resolve_train(TrainConfig(epochs=epochs, device=device), spec.recipe).for_params(hp)
    pixels, y = images(size, n)
    data = FitData((Images(pixels, np.arange(n)), y[:n]), (Images(pixels, np.arange(n, len(y))), y[n:]), 3)
    stamps, validating = [time.perf_counter()], []
    evaluate = train_module.evaluate_loss

    def timed_evaluate(*args):
        start = time.perf_counter()  # the epoch's figures were read back: its steps are done
        figures = evaluate(*args)
        validating.append(time.perf_counter() - start)
        return figures

    train_module.evaluate_loss = timed_evaluate
    try:
        fit(name, hp, data, cfg, on_epoch=lambda stats: stamps.append(time.perf_counter()))  # None: go on
    finally:
        train_module.evaluate_loss = evaluate
    # none timed (evaluate_loss moved): validation stays in; one too many (a diverged last epoch): left out
    validating = (validating or [0.0] * len(stamps))[: len(stamps) - 1]
    epoch_s = [b - a - v for a, b, v in zip(stamps[:-1], stamps[1:], validating, strict=True)]
    timed = epoch_s[1:] or epoch_s  # one epoch (--quick): that one, warm-up and all
    return {
        "images_per_s": n * len(timed) / sum(timed),
        "epoch_s": epoch_s,
        "validation_s": validating,
        "batch_size": cfg.batch_size,
        "augment": cfg.augment.enabled,
        "scanner": cfg.augment.scanner,
        "precision": cfg.precision,
    }


def plain_rate(name: str, size: int, n: int, settings: dict) -> dict:
    """Training images/s of a plain loop: the same network and batch size, float images on the
    device, bfloat16 autocast and channels-last on a GPU, fused AdamW, no augmentation, no host sync."""
    device, epochs = torch.device(settings["device"]), settings["epochs"]
    hp = get_spec(name).defaults
    batch_size, gpu = int(hp["batch_size"]), device.type == "cuda"
    pixels, y = images(size, n)
    torch.manual_seed(0)
    model = create_model(name, (1, size, size), 3, **hp).to(device).train()
    if gpu:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=hp["learning_rate"], weight_decay=hp["weight_decay"], fused=True
    )
    x = torch.from_numpy(pixels[:n]).to(device).unsqueeze(1).float().div_(255.0)  # (n, 1, size, size)
    labels = y[:n].to(device)

    def epoch() -> None:
        order = torch.randperm(n, device=device)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            xb = x[idx].contiguous(memory_format=torch.channels_last) if gpu else x[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16) if gpu else contextlib.nullcontext():
                logits = model(xb)
            loss = nn.functional.cross_entropy(logits.float(), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    timed = max(1, epochs - 1)
    if epochs > 1:
        epoch()  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(timed):
        epoch()
    synchronize(device)
    return {"images_per_s": (n // batch_size) * batch_size * timed / (time.perf_counter() - start)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_rows(settings: dict, report: dict, save) -> None:
    """Measures (a) and (b) for every network and size, adding each row to ``report`` as it comes."""
    print("\n| model | px | batch | images | augmentation | lungxray images/s | plain images/s | lungxray / plain |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for size, n in settings["sizes"].items():
        for name in NETWORKS:
            try:
                ours = lungxray_rate(name, size, n, settings)
                free()
                plain = plain_rate(name, size, n, settings)
            except Exception as exc:  # one failed measurement still leaves the others to read
                report["training"].append({"model": name, "px": size, "error": traceback.format_exc()[-3000:]})
                print(f"| {name} | {size} | failed: {type(exc).__name__}: {exc} |", flush=True)
                save()
                continue
            finally:
                free()
            ratio = ours["images_per_s"] / plain["images_per_s"]
            aug = "+".join(k for k in ("augment", "scanner") if ours[k]) or "none"
            report["training"].append({"model": name, "px": size, "images": n, "lungxray": ours, "plain": plain,
                                       "ratio": ratio})  # fmt: skip
            print(f"| {name} | {size} | {ours['batch_size']} | {n} | {aug} | {ours['images_per_s']:,.0f} | "
                  f"{plain['images_per_s']:,.0f} | {ratio:.2f} |", flush=True)  # fmt: skip
            save()


def free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def search(data: Path, device: str, extra: list[str], timeout: int) -> dict:
    """``lungxray run`` on ``data`` with ``--device device``: its run.json timings, or why none."""
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        out = Path(tmp) / "run"
        argv = ["run", str(data), "--out", str(out), "--device", device, "--seed", "0", "--force", "--quiet",
                "--cache-dir", str(Path(tmp) / "cache"), *extra]  # fmt: skip
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-c", RUN, *argv], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"device": device, "argv": argv, "error": f"stopped after {timeout} s"}
        wall = time.perf_counter() - start
        if done.returncode != 0 or not (out / "run.json").is_file():
            return {"device": device, "argv": argv, "wall_s": wall, "error": (done.stderr or done.stdout)[-2000:]}
        timings = json.loads((out / "run.json").read_text()).get("timings", {})
        return {"device": device, "argv": argv, "wall_s": wall, "tune_s": timings.get("tune_s"), "timings": timings}


def search_rows(args, deadline: float, report: dict, save) -> None:
    """(c): the search on the GPU and on the CPU (on the CPU alone with --quick), each stopped if it
    would run past ``deadline`` (the GPU's at half the time left)."""
    if not args.data.is_dir():
        print(f"\nsearch skipped: no data set at {args.data}", flush=True)
        report["search"].append({"error": f"no data set at {args.data}"})
        return save()
    extra = ["--trials", str(args.trials)] if args.trials else []
    if args.quick:
        extra = ["--trials", "1", "--epochs", "1", "--final-epochs", "1", "--img-size", "32", "--workers", "2"]
    devices = ["cpu"] if args.quick else ["cuda", "cpu"]
    print(f"\n`lungxray run {args.data} --seed 0 --force --quiet {' '.join(extra)}`\n")
    print("| device | tune_s | run wall s |\n|---|---|---|", flush=True)
    for device in devices:
        left = deadline - time.perf_counter()
        row = search(args.data, device, extra, max(30, int(left / 2 if device == "cuda" else left)))
        report["search"].append(row)
        save()
        tune = (
            f"{row['tune_s']:.1f}"
            if row.get("tune_s") is not None
            else "failed: " + (row["error"].strip().splitlines() or ["?"])[-1]
        )
        print(f"| {device} | {tune} | {row.get('wall_s', float('nan')):.1f} |", flush=True)
    times = {r["device"]: r.get("tune_s") for r in report["search"] if "device" in r}
    if times.get("cuda") and times.get("cpu"):
        print(f"\nsearch on the GPU: {times['cpu'] / times['cuda']:.2f}x the CPU's speed", flush=True)


def shrink(data: Path, target: Path, side: int = 512) -> None:
    """A copy of ``data`` (its folders, and its images at most ``side`` px on the longer side) in ``target``."""
    from PIL import Image

    count = 0
    for path in sorted(p for p in data.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"}):
        dest = target / path.relative_to(data)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image.thumbnail((side, side))
            image.save(dest, quality=90) if dest.suffix.lower() != ".png" else image.save(dest)
        count += 1
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) / 2**20
    print(f"{count} images written to {target} ({size:.1f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", type=Path, default=Path("../shared/data/covid19-image-dataset"))
    parser.add_argument("--trials", type=int, default=None, help="trials of each search (default: lungxray's)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: $OUT/gpu_bench.json)")
    parser.add_argument("--quick", action="store_true", help="everything tiny, on the CPU")
    parser.add_argument("--skip-search", action="store_true", help="training rates only")
    parser.add_argument("--budget", type=int, default=None, help="seconds for everything (default 500; 300 quick)")
    parser.add_argument("--shrink-data", type=Path, default=None, metavar="DIR", help="copy DATA smaller, then exit")
    args = parser.parse_args()
    if args.shrink_data is not None:
        return shrink(args.data, args.shrink_data)
    settings = QUICK if args.quick else FULL
    if settings["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run on the GPU machine, or with --quick for a CPU smoke test")
    out = args.out or Path(os.environ.get("OUT") or Path(__file__).parent / "out") / "gpu_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": header(settings["device"]), "settings": {**settings, "trials": args.trials},
              "training": [], "search": []}  # fmt: skip
    save = lambda: out.write_text(json.dumps(report, indent=2, default=str))  # noqa: E731
    print(" | ".join(f"{k}: {v}" for k, v in report["machine"].items()), flush=True)
    started = time.perf_counter()
    training_rows(settings, report, save)
    if not args.skip_search:
        search_rows(args, started + (args.budget or settings["budget"]), report, save)
    report["wall_s"] = time.perf_counter() - started
    save()
    print(f"\n{report['wall_s']:.0f} s in all; JSON: {out}", flush=True)


if __name__ == "__main__":
    main()
