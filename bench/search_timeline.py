"""Where the wall time of the tutorial's search goes: how long 0, 1 or 2 trials were training at once.

Runs the bench's lungxray search (``lungxray run <data> --model mlp --seed S --equalize none``, as
``bench/search_bench.py`` does) in this process, with the training functions timed from outside,
and prints:

- the search's wall time split by how many trials were inside ``fit`` (0: the sampler, telling and
  asking; 1: a trial alone, while the next is drawn or waits for its history to end, and at the
  end; 2: two side by side);
- the same split for the epochs' training passes alone;
- the thread time of the training passes, the validation passes and the study reports;
- the median ms of an epoch by the first layer's width, alone and side by side.

    .venv/bin/python bench/search_timeline.py ../shared/data/covid19-image-dataset [--seed 0] [--pruner none]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine  # noqa: E402

from lungxray import cli, train, tune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(intervals: dict, owner, name: str, key: str) -> None:
    """Replace ``owner.name`` by a wrapper that records (start, end, thread, first layer's rows)."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            rows = args[0].net[1].weight.shape[0] if key == "train_one_epoch" else 0
            intervals[key].append((start, time.perf_counter(), threading.get_ident(), rows))

    setattr(owner, name, wrapper)


def coverage(spans: list, start: float, end: float) -> dict[int, float]:
    """Seconds of [start, end] during which 0, 1, 2, ... of ``spans`` were open (those outside it,
    the final model's epochs, left out)."""
    spans = [(max(s, start), min(e, end)) for s, e, *_ in spans if s < end and e > start]
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    open_, last, seconds = 0, start, collections.Counter()
    for t, change in events:
        seconds[open_] += t - last
        last, open_ = t, open_ + change
    seconds[open_] += end - last
    return dict(sorted(seconds.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=ROOT.parent / "shared" / "data" / "covid19-image-dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="run folder (a new temporary one by default)")
    parser.add_argument("--pruner", default="median", help="as lungxray run's --pruner (search_bench: median, none)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="lungxray-timeline-")) / "run"
    intervals: dict[str, list] = collections.defaultdict(list)
    timed(intervals, train, "train_one_epoch", "train_one_epoch")
    timed(intervals, train, "evaluate_loss", "evaluate_loss")
    timed(intervals, tune, "fit", "fit")
    timed(intervals, optuna.trial.Trial, "report", "report")
    timed(intervals, tune, "tune", "search")
    cli.main(["run", str(args.data), "--model", "mlp", "--out", str(out), "--seed", str(args.seed),
              "--cache-dir", str(ROOT / "bench" / "out" / "cache"), "--equalize", "none",
              "--pruner", args.pruner, "--quiet"])  # fmt: skip
    ((start, end, *_),) = intervals["search"]
    print(machine())
    print(f"search (seed {args.seed}, pruner {args.pruner}): {end - start:.1f} s wall, run folder {out}")
    for key, what in (("fit", "trials in fit"), ("train_one_epoch", "trials in an epoch's training pass")):
        split = ", ".join(f"{n}: {s:.1f} s" for n, s in coverage(intervals[key], start, end).items())
        print(f"  wall time by {what}: {split}")
    # the final model trains after the search: its epochs are left out from here on
    inside = {key: [i for i in spans if start <= i[0] and i[1] <= end] for key, spans in intervals.items()}
    for key in ("train_one_epoch", "evaluate_loss", "report"):
        spans = inside[key]
        print(f"  {key}: {sum(e - s for s, e, *_ in spans):.1f} s of thread time, {len(spans)} calls")
    epochs = inside["train_one_epoch"]
    by_kind = collections.defaultdict(list)
    for s, e, thread, rows in epochs:
        shared = sum(max(0.0, min(e, e2) - max(s, s2)) for s2, e2, t2, _ in epochs if t2 != thread)
        by_kind[rows, "alone" if shared < (e - s) / 2 else "side by side"].append(1e3 * (e - s))
    print("  ms per epoch by layer_1 (median, epochs):")
    for (rows, kind), ms in sorted(by_kind.items()):
        print(f"    {rows:4d} {kind:12s} {statistics.median(ms):6.1f} ms  ({len(ms)})")


if __name__ == "__main__":
    main()
