"""Benchmark (a): preprocessing every image of a dataset to 128x128 grayscale arrays.

Side by side in one run: the tutorial's way (full decode, one file after another, here with
Pillow), lungxray with an empty cache (reduced-size JPEG decoding, all cores), and lungxray again
with the cache filled. The files are read once before timing, so all three start from the page
cache and the figures compare decoding, not the disk. Prints the ratios and writes BENCHMARKS.md.

    .venv/bin/python bench/preprocess_bench.py [DATA] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lungxray.config import DataConfig, Preprocessing
from lungxray.data import load_dataset
from lungxray.layout import discover

sys.path.insert(0, str(Path(__file__).parent))
from _report import PLAIN, machine, update_section  # noqa: E402


def naive(paths: list[Path], size: int) -> np.ndarray:
    """The tutorial's loop: decode each whole image, convert to gray, resize."""
    return np.stack(
        [np.asarray(Image.open(p).convert("L").resize((size, size), Image.Resampling.BILINEAR)) for p in paths]
    )


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "data", nargs="?", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/covid19-image-dataset"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = parser.parse_args()

    _, files, _ = discover(args.data)
    paths = [p for p, _, _ in files]
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    for p in paths:  # warm the page cache for every contender alike
        p.read_bytes()
    naive_s, cold_s, cached_s = [], [], []
    for _ in range(args.repeats):
        naive_s.append(timed(lambda: naive(paths, 128)))
        with tempfile.TemporaryDirectory() as cache:
            plain = DataConfig(Preprocessing(**PLAIN), cache_dir=Path(cache))
            scan = functools.partial(load_dataset, args.data, plain, progress=False)
            cold_s.append(timed(scan))  # empty cache
            cached_s.append(timed(scan))  # the cache the first call filled
    n, c, w = (statistics.median(x) for x in (naive_s, cold_s, cached_s))
    rows = [
        ("naive loop (Pillow, full decode, one by one)", n, 1.0),
        ("lungxray, empty cache", c, n / c),
        ("lungxray, cache filled", w, n / w),
    ]
    table = "\n".join(f"| {name} | {t:.3f} | {len(paths) / t:,.0f} | {r:.1f}x |" for name, t, r in rows)
    body = f"""## (a) Preprocessing {len(paths)} images ({megabytes:.0f} MB) to 128x128 grayscale

Command: `.venv/bin/python bench/preprocess_bench.py {args.data} --repeats {args.repeats}`
(median of {args.repeats} repeats; {machine()}). lungxray's figures include scanning, hashing and
duplicate finding; the naive loop does none of these.

| contender | seconds | images/s | speed-up vs naive |
|---|---|---|---|
{table}

Targets: empty cache >= 2.5x, cache filled >= 50x."""
    print(body)
    if not args.no_write:
        update_section("preprocess", body)


if __name__ == "__main__":
    main()
