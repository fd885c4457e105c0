"""The source-confound audit, before any training: can the class be told from what is not the
disease?

On public chest X-ray sets the classes often come from different hospitals, scanners and
archives, so a classifier can score well by recognising the source (Zech et al. 2018; DeGrave et
al. 2021). This probe predicts each image's class from properties that say where a file came
from, not what the lungs show: its original width, height and aspect ratio, its file format and
bit depth, its bytes per pixel (how it was compressed), and the grey levels of the whole film
(mean, spread, percentiles, the share of pure black and pure white pixels, which frames and
burnt-in text raise). A cross-validated classifier on these alone, scored by balanced accuracy
against the majority-class baseline, is the warning: where it does far better than chance, the
class is written in the source and a model can learn the source instead of the disease.

Where the data names sites (a manifest's site column, or several DATA roots), the audit also
shows how the classes spread over the sites (the class x site table and Cramer's V), how well the
same probe tells the site from the image, and a plain warning for each class that one site alone
supplies.

cleanlab's Datalab then looks at the same properties, joined by an 8x8 thumbnail of each film, for
what a probe does not show: images unlike the rest (outliers), near-duplicate pairs the scan's own
duplicate search did not group, whether the file order follows the image properties within a
class (its non-IID test: the images come in batches, from sources, scanners or export runs), and
how well each property alone tells the class (its spurious-correlation score). Its findings are
plain notes in the audit; without cleanlab's Datalab extra (Hugging Face ``datasets``) they are
skipped with a note.

Holds the features, the probes and the Datalab checks; reads file headers only (Pillow, or pydicom
for DICOM), the pixels come from the scan. Printing is the console's.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

# A probe this far above chance (balanced accuracy) is called far better than chance.
MARGIN = 0.25
# Trees of the probe's forest: on the shared dataset 50 trees score within 0.01 of 200 in a third
# of the time (0.26 s against 0.72 s for the 5 folds), and the audit runs with every scan.
TREES = 50
FEATURES = (
    "width", "height", "aspect", "bits", "bytes_per_pixel", "jpeg", "png", "dicom", "other_format",
    "mean", "std", "p01", "p99", "black", "white",
)  # fmt: skip


def file_properties(path: Path) -> dict:
    """Width, height, format and bits per sample of an image file, from its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            bits = 16 if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F") else 8
            return {"width": img.width, "height": img.height, "format": (img.format or "").lower(), "bits": bits}
    except (UnidentifiedImageError, OSError, ValueError):
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        bits = int(getattr(ds, "BitsStored", 8) or 8)
        return {"width": int(ds.Columns), "height": int(ds.Rows), "format": "dicom", "bits": bits}


def features(paths: list[Path], images: np.ndarray) -> np.ndarray:
    """(N, len(FEATURES)) properties of the files ``paths`` and of their preprocessed ``images`` (N, H, W)."""
    rows = []
    for path, pixels in zip(paths, images, strict=True):
        props = file_properties(Path(path))
        fmt = props["format"]
        grey = pixels.astype(np.float64)
        rows.append([
            props["width"], props["height"], props["width"] / props["height"], props["bits"],
            Path(path).stat().st_size / (props["width"] * props["height"]),
            fmt in ("jpeg", "mpo"), fmt == "png", fmt == "dicom", fmt not in ("jpeg", "mpo", "png", "dicom"),
            grey.mean(), grey.std(), np.percentile(grey, 1), np.percentile(grey, 99),
            np.mean(pixels == 0), np.mean(pixels == 255),
        ])  # fmt: skip
    return np.asarray(rows, dtype=np.float64)


def probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> dict:
    """Cross-validated balanced accuracy of a random forest predicting ``y`` from ``x``, folds
    stratified and grouped (a duplicate group or patient never on both sides), against chance."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

    classes = np.unique(y)
    smallest = int(np.bincount(y)[classes].min())
    folds = min(5, smallest, len(np.unique(groups)))
    chance = 1.0 / len(classes)
    if len(classes) < 2 or folds < 2:
        return {"balanced_accuracy": None, "chance": chance, "folds": folds, "fires": False}
    forest = RandomForestClassifier(n_estimators=TREES, min_samples_leaf=2, random_state=seed, n_jobs=1)
    split = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    predicted = cross_val_predict(forest, x, y, groups=groups, cv=split)
    score = float(balanced_accuracy_score(y, predicted))
    return {
        "balanced_accuracy": score,
        "chance": chance,
        "accuracy": float(np.mean(predicted == y)),
        "majority": float(np.bincount(y).max() / len(y)),
        "folds": folds,
        "seed": seed,
        "fires": score >= chance + MARGIN,
        "confusion_matrix": confusion_matrix(y, predicted, labels=classes).tolist(),
    }


def audit(ds, seed: int = 0) -> dict:
    """The probe on a scanned ``data.Dataset``: which properties, how well they tell the classes
    apart against chance, the properties the forest leans on most, and a warning when it fires."""
    from sklearn.ensemble import RandomForestClassifier

    x = features([s.path for s in ds.samples], ds.images)
    y, groups = ds.labels, ds.groups
    if ds.task == "multilabel":
        # a film's findings are no class: a probe over their combinations (hundreds, many seen once)
        # would measure nothing; the sites' audit, which needs no class, still runs
        result = {"balanced_accuracy": None, "chance": None, "folds": 0, "fires": False,
                  "features": list(FEATURES), "classes": list(ds.classes),
                  "skipped": "multi-label data: the probe tells one class per film"}  # fmt: skip
        result["warning"] = None
        if len(ds.sites) > 1:
            result["sites"] = site_audit(ds, x, seed)
        return result
    result = probe(x, y, groups, seed) | {"features": list(FEATURES), "classes": list(ds.classes)}
    if result["balanced_accuracy"] is not None:
        forest = RandomForestClassifier(n_estimators=TREES, min_samples_leaf=2, random_state=seed, n_jobs=1).fit(x, y)
        order = np.argsort(forest.feature_importances_)[::-1][:4]
        result["strongest"] = [FEATURES[i] for i in order]
    result["warning"] = warning(result)
    if len(ds.sites) > 1:
        result["sites"] = site_audit(ds, x, seed)
    result["datalab"] = datalab_audit(ds, x, seed)
    return result


def site_audit(ds, x: np.ndarray, seed: int = 0) -> dict:
    """Classes against sites: the class x site table, Cramer's V (0: the classes spread alike over
    the sites; 1: the site gives the class away), the probe predicting the site from the same
    properties ``x`` against chance, and a warning per class that one site alone supplies."""
    from scipy.stats.contingency import association

    table = ds.site_class_counts()
    sites = list(table)
    counts = np.array([[table[site][c] for c in ds.classes] for site in sites])
    kept = counts[:, counts.sum(axis=0) > 0]
    v = float(association(kept, method="cramer")) if min(kept.shape) > 1 else None
    named = np.array([s.site is not None for s in ds.samples])
    index = {site: i for i, site in enumerate(sites)}
    y = np.array([index[s.site] for s in ds.samples if s.site is not None], dtype=np.int64)
    site_probe = probe(x[named], y, ds.groups[named], seed)
    single = {c: sites[int(np.flatnonzero(counts[:, j])[0])] for j, c in enumerate(ds.classes)
              if np.count_nonzero(counts[:, j]) == 1}  # fmt: skip
    warnings = [
        f"all {counts[:, ds.classes.index(c)].sum()} '{c}' images come from one site ({site}): a model can learn "
        "the site instead of the disease"
        for c, site in single.items()
    ]
    if v is not None and v >= 0.5 and site_probe["fires"]:
        sole = sorted(set(single.values()))
        warnings.append(
            f"the classes follow the sites (Cramer's V {v:.2f}) and the site can be told from the image "
            f"(probe: balanced accuracy {site_probe['balanced_accuracy']:.2f} against {site_probe['chance']:.2f}): "
            "test on a site the model never saw (cv --by site, run --test-site)"
            + (f"; held out, {', '.join(sole)} would take a class out of training" if sole else "")
        )
    return {"table": table, "cramers_v": v, "probe": site_probe, "single_site_classes": single, "warnings": warnings}


def warning(result: dict) -> str | None:
    """The plain words for a probe that fired, or None."""
    if not result["fires"]:
        return None
    strongest = ", ".join(result.get("strongest", []))
    return (
        "the class can be told from properties that are not the disease: a probe on image size, file "
        "format, bytes per pixel, bit depth and whole-film grey levels alone scores balanced accuracy "
        f"{result['balanced_accuracy']:.2f} against {result['chance']:.2f} for chance (it leans on "
        f"{strongest}); the classes probably come from different sources, and a model can learn the "
        "source instead of the disease: test it on data from another hospital"
    )


# Side of the thumbnail joined to the properties for Datalab: 64 grey levels, enough to tell two
# films apart, too few to outweigh the 15 properties (both halves are scaled to one total variance).
THUMBNAIL = 8
# Datalab's checks read each image's 10 nearest neighbours: below this many images in the scan
# they say little, and the test suite's small synthetic scans stay quick without them.
DATALAB_MIN = 50
STRATUM_MIN = 20  # the fewest images of one class (one site's class) whose order the non-IID test reads
DATALAB_CHECKS = ("outlier", "near_duplicate", "non_iid")
# The non-IID p-value below which a note is printed. cleanlab's own is 0.05, but its test (25
# permutations) put 8-10% of 40 shuffled orders of each class of the shared dataset below 0.05,
# none below 0.01, and a scan tests every class (every site's class) apart.
SIGNIFICANCE = 0.01
SPURIOUS_THRESHOLD = 0.3  # cleanlab's: a property scoring below it tells the class nearly alone
TOP = 5  # images listed per check


def import_datalab():
    """cleanlab's ``Datalab`` and its spurious-correlation scorer; ImportError without the Datalab
    extra. cleanlab's spurious-correlation module calls ``warnings.filterwarnings("ignore")`` when
    first imported (and ``import cleanlab`` imports it), which would silence every warning for the
    rest of the process: the filters are put back once it is in."""
    with warnings.catch_warnings():
        from cleanlab.datalab.datalab import Datalab
        from cleanlab.datalab.internal.spurious_correlation import SpuriousCorrelations
    return Datalab, SpuriousCorrelations


def embedding(x: np.ndarray, images: np.ndarray) -> np.ndarray:
    """(N, F + THUMBNAIL**2): the properties ``x`` (N, F) standardised, then each film's thumbnail
    (block means of ``images`` (N, H, W)), standardised per pixel and scaled so that both halves
    carry the same total variance; constant columns stay 0."""
    side = min(THUMBNAIL, *images.shape[1:])
    n, h, w = images.shape
    hh, ww = h - h % side, w - w % side
    thumbs = np.concatenate(  # a chunk at a time: a float64 copy of a large stack would not fit in memory
        [
            images[i : i + 4096, :hh, :ww].reshape(-1, side, hh // side, side, ww // side).mean(axis=(2, 4))
            for i in range(0, n, 4096)
        ]
    )
    scale = lambda a: (a - a.mean(axis=0)) / np.where(a.std(axis=0) > 0, a.std(axis=0), 1.0)  # noqa: E731
    return np.hstack([scale(x), scale(thumbs.reshape(n, -1)) * np.sqrt(x.shape[1] / side**2)])


def find_issues(datalab, z: np.ndarray, labels: np.ndarray | None, checks: tuple[str, ...], seed: int = 0):
    """``datalab`` (the class) run on the features ``z`` (N, D) for ``checks``, euclidean neighbours,
    quietly. Datalab prints the errors of a check and goes on: a check that left no result raises
    with what it printed. Its non-IID test reseeds numpy's global generator, which is put back."""
    import contextlib
    import io

    data = {"label": labels} if labels is not None else {"order": np.arange(len(z))}
    lab = datalab(data, label_name="label" if labels is not None else None, verbosity=0)
    # fresh settings on every call: find_issues writes the features into the dicts it is given
    types = {c: {"metric": "euclidean"} | ({"seed": seed} if c == "non_iid" else {}) for c in checks}
    state, said = np.random.get_state(), io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            lab.find_issues(features=z, issue_types=types)
    finally:
        np.random.set_state(state)
    missing = [c for c in checks if f"is_{c}_issue" not in lab.issues.columns]
    if missing:
        raise RuntimeError(f"cleanlab's Datalab left no result for {', '.join(missing)}: {said.getvalue().strip()}")
    return lab


def datalab_audit(ds, x: np.ndarray, seed: int = 0) -> dict:
    """cleanlab's Datalab on a scanned ``ds`` and its properties ``x`` (N, F), joined by a thumbnail
    (``embedding``): outliers, near-duplicate pairs against the scan's duplicate groups, the non-IID
    p-value of the scan order (whole, and within each class or site's class: ``strata``), each
    property's spurious-correlation score, and the notes worth printing. Skipped, with a note where
    cleanlab's Datalab cannot be imported, without one on fewer than ``DATALAB_MIN`` images."""
    if len(ds.samples) < DATALAB_MIN:
        return {"skipped": f"{len(ds.samples)} images: Datalab's checks need {DATALAB_MIN}", "notes": []}
    try:
        datalab, spurious = import_datalab()
    except ImportError as err:
        why = f"{err}; install cleanlab's Datalab extra: pip install 'cleanlab[datalab]'"
        return {"skipped": why, "notes": [f"cleanlab's Datalab checks skipped ({why})"]}
    import cleanlab

    z = embedding(x, ds.images)
    lab = find_issues(datalab, z, ds.labels, DATALAB_CHECKS, seed)
    paths = [str(s.path) for s in ds.samples]
    result = {
        "cleanlab": cleanlab.__version__,
        "features": f"{x.shape[1]} properties and a {THUMBNAIL}x{THUMBNAIL} thumbnail, standardised",
        "outlier": flagged(lab.issues, "outlier", paths),
        "near_duplicate": flagged(lab.issues, "near_duplicate", paths) | near_duplicates(ds, lab, paths),
        "non_iid": {"p_value": float(lab.get_info("non_iid")["p-value"]), "within": {}},
        "spurious_correlations": spurious_scores(spurious, x, ds.labels),
    }
    for name, idx in strata(ds).items():
        lone = find_issues(datalab, z[idx], None, ("non_iid",), seed) if len(idx) >= STRATUM_MIN else None
        result["non_iid"]["within"][name] = float(lone.get_info("non_iid")["p-value"]) if lone else None
    result["notes"] = datalab_notes(result, ds.root)
    return result


def strata(ds) -> dict[str, np.ndarray]:
    """The images the non-IID test reads apart, in scan order: each class, or each site's class
    ("site/class") where the data names sites, since a scan lists one class, and one site, after
    another; one image per group, since copies and one patient's films sit side by side."""
    first = np.zeros(len(ds.samples), dtype=bool)
    first[np.unique(ds.groups, return_index=True)[1]] = True
    named = bool(ds.sites)
    keys = [f"{s.site}/{s.label}" if named else s.label for s in ds.samples]
    return {key: np.flatnonzero(first & (np.array(keys) == key)) for key in dict.fromkeys(keys)}


def flagged(issues, check: str, paths: list[str]) -> dict:
    """How many images Datalab flags for ``check`` and the first ``TOP`` of them, lowest score
    (most affected) first."""
    marked, scores = issues[f"is_{check}_issue"].to_numpy(), issues[f"{check}_score"].to_numpy()
    order = [int(i) for i in np.argsort(scores, kind="stable") if marked[i]][:TOP]
    return {"n": int(marked.sum()), "top": [{"path": paths[i], "score": round(float(scores[i]), 4)} for i in order]}


def near_duplicates(ds, lab, paths: list[str]) -> dict:
    """Datalab's near-duplicate pairs: how many the scan's duplicate groups already hold, and the
    others (``new``)."""
    group = {i: g for g, members in enumerate(ds.duplicate_groups) for i in members}
    marked = lab.issues["is_near_duplicate_issue"].to_numpy()
    sets = lab.get_info("near_duplicate")["near_duplicate_sets"]
    pairs = sorted({(min(i, int(j)), max(i, int(j))) for i in np.flatnonzero(marked) for j in sets[i]})
    new = [(i, j) for i, j in pairs if group.get(i, -1) != group.get(j, -2)]
    return {"pairs": len(pairs), "in_duplicate_groups": len(pairs) - len(new),
            "new": [[paths[i], paths[j]] for i, j in new]}  # fmt: skip


def spurious_scores(scorer, x: np.ndarray, y: np.ndarray) -> dict | None:
    """Each property's spurious-correlation score (cleanlab's: the 5-fold error of a naive Bayes on
    that property alone over the error of always answering the largest class, capped at 1; 0: the
    property alone gives the class), None for a property constant over the images; or None where a
    class holds fewer than 5 images. The largest class's share is passed in: cleanlab 2.9's own
    baseline (``np.bincount(labels).argmax() / len(labels)``) is that class's index over N, not its share."""
    import pandas as pd

    counts = np.bincount(y)
    if counts[counts > 0].min() < 5:
        return None
    majority = float(counts.max() / len(y))
    table = scorer(data=pd.DataFrame(x, columns=list(FEATURES)), labels=y)
    scores = dict.fromkeys(FEATURES)
    for name in (f for i, f in enumerate(FEATURES) if np.ptp(x[:, i]) > 0):
        # a property constant over one training fold (a format one file has) leaves the naive Bayes
        # no variance to divide by: numpy's warnings for it say nothing the score does not
        with np.errstate(divide="ignore", invalid="ignore"):
            scores[name] = round(float(table.calculate_spurious_correlation(name, majority)), 4)
    return {"threshold": SPURIOUS_THRESHOLD, "majority": round(majority, 4), "scores": scores}


def datalab_notes(result: dict, root: Path) -> list[str]:
    """The Datalab findings worth a line where a scan is printed: outliers, near duplicates the
    duplicate search missed, classes whose file order follows the properties, properties that alone
    tell the class."""
    rel = lambda path: os.path.relpath(path, root)  # noqa: E731
    notes, outliers, new = [], result["outlier"], result["near_duplicate"]["new"]
    if outliers["n"]:
        first = ", ".join(rel(t["path"]) for t in outliers["top"][:3])
        notes.append(
            f"{outliers['n']} image(s) unlike the rest in size, format and grey levels (cleanlab outliers), "
            f"most unusual first: {first}"
        )
    if new:
        pairs = "; ".join(f"{rel(a)} ~ {rel(b)}" for a, b in new[:3])
        notes.append(f"{len(new)} near-duplicate pair(s) that the duplicate search did not group (cleanlab): {pairs}")
    drift = {c: p for c, p in result["non_iid"]["within"].items() if p is not None and p < SIGNIFICANCE}
    if drift:
        where = ", ".join(f"{c} (p={p:.3f})" if p >= 0.001 else f"{c} (p<0.001)" for c, p in drift.items())
        notes.append(
            f"non-IID (cleanlab): within {where} the file order follows the image properties: the images come in "
            "batches (sources, scanners, export runs, the folders' own split), not one shuffled population"
        )
    spurious = result["spurious_correlations"]
    scores = (spurious or {"scores": {}})["scores"]
    alone = sorted((s, f) for f, s in scores.items() if s is not None and s < SPURIOUS_THRESHOLD)
    if alone:
        listed = ", ".join(f"{f} {s:.2f}" for s, f in alone)
        notes.append(
            "properties that alone tell the class (cleanlab's spurious-correlation score, 0: alone it gives the "
            f"class; below {SPURIOUS_THRESHOLD} flagged): {listed}"
        )
    return notes
