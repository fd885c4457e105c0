"""Do two run (or cv) folders hold the same results? For a change that must not change them.

    .venv/bin/python bench/same_results.py RUN_A RUN_B

Compares, when present in RUN_A: model/model.safetensors and metrics.json byte for byte;
trials.json with the wall-clock fields (names ending in ``_s``, e.g. a trial's ``sampler_s``) left
out, as no two runs take the same time; predictions.json and cv.json's out-of-fold
probabilities with each image's path taken relative to the folder all its images share, so that two clones in
different folders compare. Prints one line per artifact and exits 1 when any differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lungxray.runfolder import by_class


def _relative(path: str, root: str) -> str:
    return str(Path(path).relative_to(root)) if root else path


def _trials(folder: Path):
    return [{k: v for k, v in t.items() if not k.endswith("_s")} for t in json.loads(folder.read_text())]


def _predictions(path: Path):
    """Paths made relative; probabilities in the classes' order, whether the file holds them as
    {class: p} maps or as the lists older versions wrote; the predicted class (older files lack
    it) left out, as it follows from the probabilities."""
    data = json.loads(path.read_text())
    root = os.path.commonpath([i["path"] for i in data["images"]]) if data["images"] else ""

    def same_shape(image: dict) -> dict:
        ordered = {k: by_class(image[k], data["classes"]) for k in ("probabilities", "uncalibrated") if k in image}
        return {k: v for k, v in image.items() if k != "class"} | ordered | {"path": _relative(image["path"], root)}

    return data | {"images": [same_shape(i) for i in data["images"]]}


def _out_of_fold(path: Path):
    rows = json.loads(path.read_text())["out_of_fold"]
    root = os.path.commonpath([r["path"] for r in rows]) if rows else ""
    return [r | {"path": _relative(r["path"], root)} for r in rows]


COMPARED = {
    "model/model.safetensors": Path.read_bytes,
    "metrics.json": Path.read_bytes,
    "trials.json": _trials,
    "predictions.json": _predictions,
    "cv.json": _out_of_fold,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    differ = False
    for name, read in COMPARED.items():
        if not (args.a / name).is_file():
            continue
        same = (args.b / name).is_file() and read(args.a / name) == read(args.b / name)
        differ |= not same
        print(f"{'same' if same else 'DIFFERENT':<10} {name}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
