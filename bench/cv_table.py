"""Markdown rows from `lungxray cv --repeats N` runs: each headline metric as mean +- std over the
training seeds, with the seeds' values, so recipes (members, excluded labels) compare on the spread.

    .venv/bin/python bench/cv_table.py NAME=CV_DIR [NAME=CV_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METRICS = ("macro_f1", "accuracy", "macro_auroc")


def row(name: str, folder: Path) -> str:
    cv = json.loads((folder / "cv.json").read_text())
    spread = cv["seed_spread"]
    if spread is None:
        raise SystemExit(f"{folder}/cv.json has no seed_spread; run lungxray cv with --repeats 2 or more")
    cells = []
    for metric in METRICS:
        s = spread[metric]
        values = " / ".join(f"{p['fold_mean']:.4f}" for p in s["per_seed"])
        cells.append(f"{s['fold_mean']['mean']:.4f} +- {s['fold_mean']['std']:.4f} ({values})")
    pooled = spread["macro_f1"]["pooled"]
    members = cv["settings"]["train"].get("members", 1)
    return (
        f"| {name} | {cv['pooled']['n']} | {members} | "
        + " | ".join(cells)
        + f" | {pooled['mean']:.4f} +- {pooled['std']:.4f} | {cv['timings']['folds_s']:.0f} |"
    )


def main() -> None:
    print(
        "| run | images | members | macro-F1, fold mean: mean +- std over seeds (per seed) | accuracy | "
        "macro AUROC | pooled macro-F1 over seeds | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        name, folder = arg.split("=", 1)
        print(row(name, Path(folder)))


if __name__ == "__main__":
    main()
