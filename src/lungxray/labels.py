"""Label issues: images whose given label is probably wrong, found from out-of-fold probabilities.

Confident learning (Northcutt, Jiang and Chuang, JAIR 2021) through cleanlab (Apache-2.0 since
2.9): per-class thresholds (the mean probability the model gives a class on the images labelled
with it), the confident joint (each image counted under its given label and the class it
confidently belongs to), the images off its diagonal as the issues, ranked by normalised margin
(the probability of the given label minus the largest other one). Nothing is relabelled: the
output is a list for a person to check, and ``--exclude`` takes the rows they confirm.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungxray import runfolder
from lungxray.errors import DataError, MissingInputError
from lungxray.report_blocks import probability

LABEL_ISSUES_CSV = "label_issues.csv"
LABEL_ISSUES_HTML = "label_issues.html"


@dataclass
class LabelIssues:
    """Images whose given label is doubtful, most doubtful first."""

    index: np.ndarray  # (K,) indices into the scored images
    suggested: np.ndarray  # (K,) the class each one confidently belongs to
    margin: np.ndarray  # (K,) p(given) - max p(other): negative when another class is preferred
    thresholds: np.ndarray  # (C,) per-class thresholds
    confident_joint: np.ndarray  # (C, C) given label down, confident class across


def find_label_issues(labels: np.ndarray, probs: np.ndarray) -> LabelIssues:
    """Confident learning (cleanlab's) on integer ``labels`` (N,) and out-of-fold ``probs`` (N, C)."""
    import warnings

    # cleanlab's package import (Datalab's) calls warnings.filterwarnings("ignore") for the whole
    # process: the filters are put back as they were (confound.import_datalab does the same)
    with warnings.catch_warnings():
        from cleanlab.count import compute_confident_joint, get_confident_thresholds
        from cleanlab.filter import find_label_issues as off_diagonal

    thresholds = get_confident_thresholds(labels, probs)  # (C,) average self-confidence per class
    joint = compute_confident_joint(labels, probs, thresholds=thresholds, calibrate=False)
    issues = np.asarray(
        off_diagonal(labels, probs, filter_by="confident_learning", return_indices_ranked_by="normalized_margin"),
        dtype=np.int64,
    )
    # The class each flagged image confidently belongs to: its likeliest class among those at or
    # above their threshold, the rule the confident joint counts it by (cleanlab returns indices only).
    above = probs[issues] >= thresholds[None, :]
    suggested = np.where(above, probs[issues], -1.0).argmax(axis=1)
    margin, _ = _margins(labels, probs)
    return LabelIssues(issues, suggested, margin[issues], thresholds, joint)


def _margins(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(margin (N,): p(given) - max p(other), from cleanlab's normalised margin, which maps it to
    [0, 1]; the most probable other class (N,))."""
    from cleanlab.rank import get_normalized_margin_for_each_label

    others = probs.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    return 2 * get_normalized_margin_for_each_label(labels, probs) - 1, others.argmax(axis=1)


def rank_suspects(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every image ranked by normalised margin, most suspect first: (order (N,), margin (N,) in that
    order, the most probable other class (N,) in that order)."""
    margin, other = _margins(labels, probs)
    order = np.argsort(margin, kind="stable")
    return order, margin[order], other[order]


def read_out_of_fold(cv_dirs: list[Path]) -> tuple[list[dict], list[str], np.ndarray]:
    """(images with path and label, classes, probabilities (N, C) averaged over the cv runs) from
    the cv.json of each folder; runs over different images are an error."""
    runs = []
    for folder in cv_dirs:
        cv = runfolder.read_json(folder, runfolder.CV)
        if cv is None:
            raise MissingInputError(
                f"{folder} holds no {runfolder.CV}", hint="pass folders written by `lungxray cv --out`"
            )
        runs.append(_checked(cv, Path(folder) / runfolder.CV))
    images = runs[0]["out_of_fold"]
    classes = list(images[0]["probabilities"])
    paths = [o["path"] for o in images]
    stacked = []
    for folder, cv in zip(cv_dirs, runs, strict=True):
        if [o["path"] for o in cv["out_of_fold"]] != paths:
            raise DataError(
                f"{folder}/{runfolder.CV} scored other images than {cv_dirs[0]}/{runfolder.CV}",
                hint="pass cv runs made on the same data (and the same --exclude)",
            )
        key = (
            "probabilities_mean_over_seeds"
            if "probabilities_mean_over_seeds" in cv["out_of_fold"][0]
            else "probabilities"
        )
        if sorted(cv["out_of_fold"][0][key]) != sorted(classes):
            raise DataError(
                f"{folder}/{runfolder.CV} scored the classes {sorted(cv['out_of_fold'][0][key])}, "
                f"{cv_dirs[0]}/{runfolder.CV} the classes {sorted(classes)}",
                hint="pass cv runs made on the same data",
            )
        stacked.append([[o[key][c] for c in classes] for o in cv["out_of_fold"]])
    return images, classes, np.mean(np.array(stacked, dtype=np.float64), axis=0)


def _checked(cv, where: Path) -> dict:
    """``cv`` (the cv.json at ``where``) when it holds what ``labels`` reads: a non-empty list
    ``out_of_fold`` of rows with a path, a label and probabilities over the same classes, the label
    among them; else DataError saying what is missing."""

    def bad(what: str) -> DataError:
        hint = "pass folders written by `lungxray cv --out`; rerun cv to rewrite a damaged file"
        return DataError(f"{where} is not a cv.json that `labels` can read: {what}", hint=hint)

    rows = cv.get("out_of_fold") if isinstance(cv, dict) else None
    if not isinstance(rows, list) or not rows:
        raise bad("it has no out_of_fold list of scored images")
    key = "probabilities_mean_over_seeds" if "probabilities_mean_over_seeds" in rows[0] else "probabilities"
    classes = None
    for n, row in enumerate(rows):
        missing = [k for k in ("path", "label", key) if not isinstance(row, dict) or k not in row]
        if missing:
            raise bad(f"out_of_fold[{n}] has no {' or '.join(missing)}")
        probs = row[key]
        if not isinstance(probs, dict) or not all(isinstance(v, int | float) for v in probs.values()):
            raise bad(f"out_of_fold[{n}].{key} is not an object of class: probability")
        classes = classes or list(probs)
        if sorted(probs) != sorted(classes) or row["label"] not in classes:
            raise bad(f"out_of_fold[{n}] has label {row['label']!r} and classes {sorted(probs)}, "
                      f"out_of_fold[0] the classes {sorted(classes)}")  # fmt: skip
    return cv


def write_label_issues(cv_dirs: list[Path], out: Path, top: int = 30, thumb: int = 160) -> tuple[Path, Path, int]:
    """label_issues.csv (every image, most suspect first: rank, path, given, suggested, score, and
    whether confident learning flags it) and label_issues.html (the top ``top`` as thumbnails) in
    ``out``; returns both paths and the number of flagged images."""
    images, classes, probs = read_out_of_fold(cv_dirs)
    labels = np.array([classes.index(o["label"]) for o in images])
    found = find_label_issues(labels, probs)
    # Paths relative to the dataset folder (the images' common folder), as --exclude reads them.
    root = Path(os.path.commonpath([o["path"] for o in images]))
    relative = [os.path.relpath(o["path"], root) for o in images]
    flagged = dict(zip(found.index.tolist(), found.suggested.tolist(), strict=True))
    order, margin, other = rank_suspects(labels, probs)
    rows = []
    for r, (i, m, o) in enumerate(zip(order, margin, other, strict=True)):
        s = flagged.get(int(i), int(o))  # the confident class when flagged, else the likeliest other one
        rows.append({"rank": r + 1, "path": relative[i], "given": classes[labels[i]],
                     "suggested": classes[s], "score": round(float(-m), 6), "flagged": int(i) in flagged,
                     "p_given": round(float(probs[i, labels[i]]), 6),
                     "p_suggested": round(float(probs[i, s]), 6)})  # fmt: skip
    buf = io.StringIO()
    fields = ["rank", "path", "given", "suggested", "score", "flagged", "p_given", "p_suggested"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    csv_path = runfolder.write_text(Path(out) / LABEL_ISSUES_CSV, buf.getvalue())
    page = _page(rows[:top], len(flagged), cv_dirs, root, thumb)
    html_path = runfolder.write_text(Path(out) / LABEL_ISSUES_HTML, page)
    return csv_path, html_path, len(flagged)


def _thumbnail(path: str, size: int) -> str:
    """The image file as an inline PNG thumbnail, or a note when it cannot be read any more."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L")
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError):
        return "<em>image not readable</em>"
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def _page(rows: list[dict], total: int, cv_dirs: list[Path], root: Path, thumb: int) -> str:
    """The page: each card's text wraps between words; only a path, which has no spaces to wrap at,
    may break anywhere (its span's ``overflow-wrap: anywhere``) rather than run out of its card."""
    cards = "".join(
        f"<figure>{_thumbnail(str(root / r['path']), thumb)}<figcaption>#{r['rank']} "
        f'<span class="path">{html.escape(r["path"])}</span><br>given '
        f"<strong>{html.escape(r['given'])}</strong> ({html.escape(probability(r['p_given']))}), suggested "
        f"<strong>{html.escape(r['suggested'])}</strong> ({html.escape(probability(r['p_suggested']))}), "
        f"score {r['score']:.3f}"
        f"{'<br><strong>flagged by confident learning</strong>' if r['flagged'] else ''}</figcaption></figure>"
        for r in rows
    )
    sources = ", ".join(f'<span class="path">{html.escape(str(d))}</span>' for d in cv_dirs)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
        'content="width=device-width, initial-scale=1"><title>lungxray: label issues</title><style>'
        "body{font-family:system-ui,sans-serif;margin:2em}figure{display:inline-block;width:"
        f"{thumb + 40}px;max-width:100%;vertical-align:top;margin:0 1em 1em 0;font-size:.8em}}"
        ".path{overflow-wrap:anywhere}</style></head>"
        f"<body><h1>Label issues</h1><p>The {len(rows)} images whose given label the out-of-fold predictions "
        f"of {sources} doubt most, most doubtful first; confident learning flags {total} of all images. A "
        "score above 0 means the model prefers the suggested class. Check each by eye: none is relabelled; "
        "pass the rows you confirm to <code>--exclude</code> (paths are relative to "
        f'<span class="path">{html.escape(str(root))}</span>).'
        f"</p>{cards}</body></html>"
    )
