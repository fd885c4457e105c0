"""Scan and cache throughput and memory for 10,000 and 100,000 films listed in a CSV manifest.

For each size N, N synthetic 256x256 grayscale PNG films (smooth, varied "chests"; every 500th + 1 an
exact copy of the one before, every 500th + 250 a near copy: other noise, shifted 2 px) are written
in two processes into ``images_001/images``, ``images_002/images``, ... beside a
``Data_Entry_2017.csv`` in the ChestX-ray14 layout (Image Index, Finding Labels joined by |,
Follow-up #, Patient ID with 1-10 films per patient, Patient Age, Patient Gender, View Position).
Then, each in a fresh process, the command

    lungxray scan Data_Entry_2017.csv --layout chestxray14 --img-size 128 --cache-dir CACHE --json

runs cold (an empty cache: every file read, hashed and decoded once, the cache written), then
warm (everything from the cache, the memory-mapped stack already made); at the largest size also
cold and warm at --img-size 224, when the disk has room. These leave out the source-confound
audit ``scan`` prints with its summary (the same work cold or warm, and at 100,000 films longer
than the scan): one more warm scan at 128 px runs the whole command. The child runs the CLI's
``main`` (what the ``lungxray`` script runs) and reports the wall time, the scan stage alone
(``data.load_dataset``: the files the CSV lists, reading, decoding, caching, duplicates, stack),
its peak resident memory (VmHWM, which also counts the stack's file pages the kernel keeps
mapped) and the peak anonymous memory of it and its decoding workers together (Pss_Anon, every
0.1 s: what they cannot give back). Everything is written under a temporary folder and removed at
the end.

    .venv/bin/python bench/scan_bench.py [--sizes 10000 100000] [--big-size 224]
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, update_section  # noqa: E402

FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
            "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")  # fmt: skip
SIDE = 256
PER_FOLDER = 10_000  # as the published set: images_001/images ... images_012/images
BYTES_PER_FILM = 80_000  # a generous bound of a PNG film here, for the disk check
AUDIT_LIMIT = 480  # seconds for the whole scan (audit included) of the largest set

CHILD = r"""
import json, os, sys, threading, time
def field(pid, name, file="status"):
    try:
        for line in open(f"/proc/{pid}/{file}"):
            if line.startswith(name + ":"):
                return int(line.split()[1]) // 1024
    except OSError:
        return 0  # ended meanwhile
    return 0
def children():
    found = []
    for task in os.listdir("/proc/self/task"):
        try:
            found += open(f"/proc/self/task/{task}/children").read().split()
        except OSError:
            pass
    return found
def anon():  # this process and its workers, pages they share counted once (proportional set size)
    return sum(field(pid, "Pss_Anon", "smaps_rollup") for pid in ["self", *children()])
peak = [anon()]
stop = threading.Event()
def watch():
    while not stop.wait(0.1):
        peak[0] = max(peak[0], anon())
threading.Thread(target=watch, daemon=True).start()
import lungxray.confound as confound
import lungxray.data as data
from lungxray.cli import main
if sys.argv[2] == "--no-audit":  # only to fill the cache: the audit that scan prints left out
    confound.audit = lambda ds, seed=0: {}
    del sys.argv[2]
stage = []
load = data.load_dataset
def timed(*args, **kwargs):
    start = time.perf_counter()
    try:
        return load(*args, **kwargs)
    finally:
        stage.append(time.perf_counter() - start)
data.load_dataset = timed
start = time.perf_counter()
with open(sys.argv[1], "w") as out:
    sys.stdout = out
    code = main(sys.argv[2:])
    sys.stdout = sys.__stdout__
seconds = time.perf_counter() - start
stop.set()
print(json.dumps({"code": code, "seconds": seconds, "scan_seconds": stage[0], "peak_rss_mb": field("self", "VmHWM"),
                  "peak_anon_mb": max(peak[0], anon())}))
"""


def film(index: int, seed: int = 0) -> np.ndarray:
    """(SIDE, SIDE) uint8: a smooth random background, two darker lung fields of random size and
    place, a bright spine and noise; near copies (index % 500 == 250) are the film before, shifted
    2 px with other noise."""
    base = index - 1 if index % 500 == 250 else index
    rng = np.random.default_rng([seed, base])
    coarse = rng.normal(0.0, 18.0, (6, 6)).astype(np.float32)
    img = np.asarray(Image.fromarray(coarse, mode="F").resize((SIDE, SIDE), Image.Resampling.BICUBIC)) + 150.0
    x = np.arange(SIDE, dtype=np.float32)[None, :] / SIDE  # (1, SIDE)
    y = x.T  # (SIDE, 1)
    for side in (-1, 1):
        cx, cy = 0.5 + side * rng.uniform(0.15, 0.25), rng.uniform(0.4, 0.55)
        rx, ry = rng.uniform(0.1, 0.17), rng.uniform(0.2, 0.32)
        img -= rng.uniform(50, 90) * np.clip(1.0 - ((x - cx) / rx) ** 2 - ((y - cy) / ry) ** 2, 0.0, 1.0)
    img += rng.uniform(20, 50) * np.exp(-(((x - 0.5) / 0.04) ** 2))
    if base != index:
        img = np.roll(img, 2, axis=1)
    img += np.roll(_noise()[index % len(_noise())], index % SIDE, axis=0)
    return np.clip(img, 0, 255).astype(np.uint8)


_NOISE: list[np.ndarray] = []


def _noise() -> list[np.ndarray]:
    """16 fields of film grain (SIDE, SIDE) float32, made once per process."""
    if not _NOISE:
        rng = np.random.default_rng(12345)
        _NOISE.extend(rng.normal(0.0, 3.0, (16, SIDE, SIDE)).astype(np.float32))
    return _NOISE


def name(index: int) -> str:
    return f"{index:08d}_000.png"


def folder(root: Path, index: int) -> Path:
    return root / f"images_{index // PER_FOLDER + 1:03d}" / "images"


def _write(task: tuple[str, int, int]) -> None:
    """Worker: write films start..stop-1 (an exact copy of the film before where index % 500 == 1)."""
    root, start, stop = Path(task[0]), task[1], task[2]
    for i in range(start, stop):
        path = folder(root, i) / name(i)
        if i % 500 == 1:
            shutil.copyfile(folder(root, i - 1) / name(i - 1), path)
        else:
            Image.fromarray(film(i)).save(path, compress_level=1)


def write_set(root: Path, n: int) -> Path:
    """N films under ``root`` in two processes, and the manifest listing them; returns the CSV."""
    for i in range(0, n, PER_FOLDER):
        folder(root, i).mkdir(parents=True, exist_ok=True)
    # chunks of 500 films start on a multiple of 500: a copy's original is written before it, by the same worker
    tasks = [(str(root), s, min(s + 500, n)) for s in range(0, n, 500)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_write, tasks, chunksize=4)
    rng = np.random.default_rng(1)
    manifest = root / "Data_Entry_2017.csv"
    with open(manifest, "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                      "View Position"])  # fmt: skip
        patient, left = 0, 0
        for i in range(n):
            if left == 0:
                patient, left = patient + 1, int(rng.integers(1, 11))
            left -= 1
            found = [f for f in FINDINGS if rng.random() < 0.06]
            out.writerow([name(i), "|".join(found) or "No Finding", 0, patient, int(rng.integers(1, 95)),
                          "MF"[int(rng.integers(2))], "PA" if rng.random() < 0.6 else "AP"])  # fmt: skip
    return manifest


def scan(manifest: Path, cache: Path, img_size: int, work: Path, audit: bool = True) -> dict | None:
    """One ``lungxray scan`` in a fresh process: its timings and memory (``CHILD``); None when it
    ran past AUDIT_LIMIT seconds (the audit only)."""
    argv = ["scan", str(manifest), "--layout", "chestxray14", "--img-size", str(img_size), "--cache-dir", str(cache),
            "--json"]  # fmt: skip
    child = [sys.executable, "-c", CHILD, str(work / "scan.json"), *([] if audit else ["--no-audit"]), *argv]
    try:
        done = subprocess.run(child, capture_output=True, text=True, timeout=AUDIT_LIMIT if audit else None)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        raise SystemExit(f"the scan failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    summary = json.loads((work / "scan.json").read_text())
    return result | {"images": summary["n_images"], "duplicate_groups": len(summary["duplicate_groups"])}


def room_for(work: Path, n: int, sizes: list[int]) -> str | None:
    """Why the disk under ``work`` cannot hold N films and their cache at ``sizes`` (each image
    and the stack), with 2 GB to spare; None: it can."""
    need = n * (BYTES_PER_FILM + sum(2 * side * side for side in sizes)) + 2 * 10**9
    free = shutil.disk_usage(work).free
    return None if free > need else f"{free / 1e9:.1f} GB free under {work}, {need / 1e9:.1f} GB needed"


def run_size(n: int, work: Path, big: int | None, notes: list[str]) -> list[dict]:
    """Cold and warm scans of N films at 128 px, the audit left out, then the whole ``scan`` warm
    (and cold and warm at ``big`` px, the audit left out), the films and the cache removed after."""
    rows = []
    data, cache = work / f"set-{n}", work / f"cache-{n}"
    start = time.perf_counter()
    manifest = write_set(data, n)
    print(f"{n:,} films written in {time.perf_counter() - start:.0f} s", flush=True)
    runs = [(128, "cold", False), (128, "warm", False), (128, "warm", True)]
    runs += [(big, "cold", False), (big, "warm", False)] if big else []
    try:
        for img_size, state, audit in runs:
            row = scan(manifest, cache, img_size, work, audit)
            if row is None:
                notes.append(f"The whole `scan` of {n:,} films ran past {AUDIT_LIMIT} s and was stopped.")
                print(notes[-1], flush=True)
                continue
            row |= {"n": n, "img_size": img_size, "state": state}
            stacks = [p for p in cache.rglob("stack-*.u8") if p.parent.name.endswith(f"-{img_size}")]
            row |= {"audit": audit, "stack_mb": sum(p.stat().st_size for p in stacks) // 2**20}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return rows


COLUMNS = ("films", "px", "cache", "audit", "wall s", "images/s", "scan stage s", "scan stage images/s", "peak RSS MB",
           "peak anon MB", "stack on disk MB", "usable images", "duplicate groups")  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [f"| {' | '.join(COLUMNS)} |", "|---" * len(COLUMNS) + "|"]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['img_size']} | {r['state']} | {'yes' if r['audit'] else 'no'} | {r['seconds']:.1f} | "
            f"{r['n'] / r['seconds']:,.0f} | {r['scan_seconds']:.1f} | {r['n'] / r['scan_seconds']:,.0f} | "
            f"{r['peak_rss_mb']:,} | {r['peak_anon_mb']:,} | "
            f"{r['stack_mb']:,} | {r['images']:,} | {r['duplicate_groups']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--big-size", type=int, default=224, help="also scan the largest set at this size (0: no)")
    args = parser.parse_args()
    rows, notes = [], []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scan-bench-") as tmp:
        work = Path(tmp)
        for n in args.sizes:
            big = args.big_size if n == max(args.sizes) and args.big_size else None
            if big and (short := room_for(work, n, [128, big])):
                notes.append(f"The {big} px scans of {n:,} films were left out: {short}.")
                print(notes[-1], flush=True)
                big = None
            if short := room_for(work, n, [128]):
                notes.append(f"{n:,} films were left out: {short}.")
                print(notes[-1], flush=True)
                continue
            rows += run_size(n, work, big, notes)
    print(f"the benchmark took {time.perf_counter() - started:.0f} s")
    command = (
        f".venv/bin/python bench/scan_bench.py --sizes {' '.join(map(str, args.sizes))} --big-size {args.big_size}"
    )
    body = f"""## Scanning and caching films listed in a CSV: 10,000 and 100,000

Command: `{command}` on {machine()}.
Each size is a fresh set of synthetic 256x256 grayscale PNG films (about 40 KB each; `images_NNN/images/`, 10,000
to a folder) listed in a ChestX-ray14 `Data_Entry_2017.csv` (Image Index, Finding Labels joined by `|`, Patient
ID with 1-10 films per patient, View Position); every 500th + 1 film is a byte copy of the film before, every
500th + 250 a near copy (other noise, shifted 2 px). Each row is one

    lungxray scan Data_Entry_2017.csv --layout chestxray14 --img-size SIZE --cache-dir CACHE --json

in a fresh process (the CLI's `main`, timed inside it). Cold: an empty cache; each file is read once and
hashed and decoded in the same pass by worker processes on both cores, then the cache's images, its index and
the memory-mapped stack are written. Warm: the same command again; nothing is decoded and the stack is reused.
*audit no*: the source-confound audit that `scan` prints with its summary (file headers, a random forest,
cleanlab's Datalab: the same work cold or warm) is left out, so the row times scanning and caching; *audit
yes*: the whole command.

- *scan stage*: `data.load_dataset` alone: reading the CSV and finding its files, the cache, decoding, the
  duplicate search, the stack.
- *peak RSS*: the scanning process's VmHWM, which also counts the stack's file pages the kernel keeps mapped
  while the duplicate search and the audit read them (reclaimable at will); *peak anon*: the anonymous memory
  of the scanning process and its decoding workers together (each one's Pss_Anon, so pages a fork shares
  count once, summed every 0.1 s): what they cannot give back.

{table(rows)}
{"".join(f"{chr(10)}{note}" for note in notes)}
"""
    update_section("scan", body)
    print(body)


if __name__ == "__main__":
    main()
