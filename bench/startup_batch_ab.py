"""The search's startup trials asked together (lungxray's way) against asked in pairs, side by side.

The startup trials draw random parameters and the median pruner stops none of them, so they are
the same trials either way (``tests/test_tune.py`` checks it); this measures only the wall time of
the first ``--trials`` (4: the default startup) of the bench's search, alternating the two ways in
one process, each in a new run folder.

    .venv/bin/python bench/startup_batch_ab.py ../shared/data/covid19-image-dataset [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine  # noqa: E402

from lungxray import cli, tune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=ROOT.parent / "shared" / "data" / "covid19-image-dataset")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()
    ways = {"together": tune._batch_size, "in pairs": lambda study, cfg, done: min(cfg.jobs, cfg.trials - done)}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    with tempfile.TemporaryDirectory(prefix="lungxray-startup-ab-") as tmp:
        for r in range(args.repeats):
            for way in list(ways) if r % 2 else list(ways)[::-1]:
                tune._batch_size = ways[way]
                out = Path(tmp) / f"{way.replace(' ', '-')}-{r}"
                cli.main(["run", str(args.data), "--model", "mlp", "--out", str(out), "--seed", "0", "--trials",
                          str(args.trials), "--cache-dir", str(ROOT / "bench" / "out" / "cache"), "--equalize",
                          "none", "--quiet"])  # fmt: skip
                seconds[way].append(json.loads((out / "run.json").read_text())["timings"]["tune_s"])
    print(machine())
    for way, values in seconds.items():
        print(f"first {args.trials} trials, {way}: " + ", ".join(f"{v:.1f}" for v in values) + " s")
    ratios = [p / t for p, t in zip(seconds["in pairs"], seconds["together"], strict=True)]
    print(f"in pairs / together: {statistics.median(ratios):.2f}x median ({min(ratios):.2f}-{max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
