"""The body of each report section about the data, the search, the training and the test: the
dataset, the hyperparameter search, the training curves, the cross-validation table, the test
metrics with their intervals, the confusion matrix, the ROC curves, calibration, the images the
model had seen, the gallery of confident errors and the shortcut audit.

Each function turns what the run folder holds (``report_data``) into HTML; the figures come from
``plots``, the gallery's pictures from ``saliency.error_gallery``. External data and the
out-of-distribution flag are in ``report_external``; the page around the sections in ``report``.
"""

from __future__ import annotations

import html
import io
import json
from typing import TYPE_CHECKING

import numpy as np

from lungxray.metrics import ECE_BINS, expected_calibration_error
from lungxray.plots import (
    MIN_BIN_IMAGES,
    confusion_figure,
    curves_figure,
    reliability_figure,
    roc_figure,
    search_figure,
)
from lungxray.report_blocks import figure, img, probability, relative, table

if TYPE_CHECKING:
    from lungxray.saliency import ErrorGallery

THUMBNAIL = 192  # side of each gallery picture, in pixels


def dataset(scan: dict, parts: dict | None) -> str:
    """The scanned folder: images per class and per part of the split, skipped files, duplicates
    (those whose copies disagree on the label first), and how patients were kept together."""
    rows = [[name, n] for name, n in scan["counts"].items()]
    body = f"<p>{html.escape(scan['root'])}: {scan['layout']} layout, {scan['n_images']} usable images.</p>"
    body += table(["class", "images"], rows)
    body += _confound(scan.get("confound"))
    if parts:
        body += "<h3>Splits</h3>" + table(["part", "images"], [[k, v] for k, v in parts.items()])
    rel = lambda p: relative(p, scan["root"])  # noqa: E731
    skipped = [[rel(s["path"]), s["reason"]] for s in scan["skipped"]]
    body += f"<h3>Skipped files ({len(skipped)})</h3>" + (
        table(["file", "reason"], skipped) if skipped else "<p>None.</p>"
    )
    mixed = scan.get("mixed_label_duplicate_groups") or []
    if mixed:
        body += (
            f'<p class="warning"><strong>{len(mixed)} duplicate group(s) whose copies carry different labels: '
            "at least one label in each is wrong.</strong></p>"
            + table(["copies (label)"], [[" == ".join(f"{rel(m['path'])} ({m['label']})" for m in g)] for g in mixed])
        )
    if scan.get("excluded"):
        body += f"<p>{len(scan['excluded'])} image(s) left out by --exclude.</p>"
    body += _patients(scan.get("patients") or {})
    groups = [[len(g), " == ".join(rel(p) for p in g)] for g in scan["duplicate_groups"]]
    body += f"<h3>Duplicate groups ({len(groups)}), each kept in one split</h3>"
    return body + (table(["images", "files"], groups) if groups else "<p>None found.</p>")


def _sites(sites: dict | None) -> str:
    """The class x site table, Cramer's V, the site probe against its baselines; warnings first."""
    if not sites:
        return ""
    warnings = "".join(f'<p class="warning"><strong>Warning: {html.escape(w)}.</strong></p>' for w in sites["warnings"])
    classes = list(next(iter(sites["table"].values())))
    rows = [[site, *row.values()] for site, row in sites["table"].items()]
    v, probe = sites["cramers_v"], sites["probe"]
    said = (
        f"<p>Cramer's V of class and site: {v:.2f} (0: the classes spread alike over the sites; "
        "1: the site gives the class away)."
        if v is not None
        else "<p>"
    )
    if probe["balanced_accuracy"] is not None:
        said += (
            f" A random forest on the same image properties tells the site with balanced accuracy "
            f"{probe['balanced_accuracy']:.2f} against {probe['chance']:.2f} for chance (accuracy "
            f"{probe['accuracy']:.2f} against {probe['majority']:.2f} for always answering the largest site)."
        )
    return "<h3>Sites</h3>" + warnings + table(["site", *classes], rows) + said + "</p>"


def _confound(confound: dict | None) -> str:
    """The source-confound probe against chance, its warning first when it fires."""
    if not confound:
        return ""
    if confound.get("balanced_accuracy") is None:
        return _sites(confound.get("sites"))
    said = (
        f"<p>Source-confound probe, before any training: a random forest predicting the class from "
        f"properties that are not the disease (image size, file format, bytes per pixel, bit depth, "
        f"whole-film grey levels), {confound['folds']}-fold cross-validated, scores balanced accuracy "
        f"{confound['balanced_accuracy']:.2f} against {confound['chance']:.2f} for chance.</p>"
    )
    if confound.get("warning"):
        said = f'<p class="warning"><strong>Warning: {html.escape(confound["warning"])}.</strong></p>' + said
    return said + _sites(confound.get("sites"))


def _patients(patients: dict) -> str:
    """How many patients the DICOM headers named, and whether the split kept them together."""
    from lungxray.data import films_per_patient

    if not patients.get("n"):
        return ""
    per = films_per_patient(patients)
    return (
        f"<p>{patients['n']} patients named by DICOM headers cover {patients['images']} images ({per}); "
        + (
            "the splits keep each patient's images together (with --split folders, a patient in two "
            "folders is reported or refused). "
            if patients.get("grouped")
            else "they were not grouped by patient (--no-dicom-patients). "
        )  # fmt: skip
        + "Patient IDs appear nowhere in the run folder: "
        "splits.json names patients by a keyed hash (key: patient-key, not to be shared).</p>"
    )


def search(trials: list[dict], best: dict | None) -> str:
    """The best parameters, the optimisation history and every trial's state, value and parameters."""
    keys = sorted({k for t in trials for k in t["params"]})
    rows = [
        [
            t["number"],
            t["state"],
            t["value"] if t["value"] is not None else "-",
            "stopped early" if t.get("pruned_at_epoch") else "full",
        ]
        + [t["params"].get(k, "-") for k in keys]
        for t in trials
    ]
    text = f"<p>Best parameters: <code>{html.escape(json.dumps(best['params']))}</code></p>" if best else ""
    alt = "each trial's validation figure and the best so far, by trial number"
    return text + figure(search_figure(trials, best), alt) + table(["trial", "state", "value", "run"] + keys, rows)


def curves(history: dict) -> str:
    alt = f"training and validation loss and accuracy per epoch; the kept epoch, {history['best_epoch']}, marked"
    return figure(curves_figure(history, history["best_epoch"]), alt)


def metrics_tables(metrics: dict) -> str:
    """The headline metrics and each class's recall, specificity and AUROC with their 95%
    intervals, then every per-class figure."""
    ci = metrics.get("ci95", {})

    def with_ci(name: str, value) -> list:
        interval = ci.get(name)
        return [
            name,
            value if value is not None else "n/a",
            f"{interval[0]:.4f} - {interval[1]:.4f}" if interval else "n/a",
        ]

    rows = [with_ci(k, metrics.get(k)) for k in ("accuracy", "macro_f1", "macro_auroc")]
    for c, m in metrics["per_class"].items():
        rows += [
            with_ci(f"recall/{c}", m["recall"]),
            with_ci(f"specificity/{c}", m["specificity"]),
            with_ci(f"auroc/{c}", m["auroc"]),
        ]
    per_class = [
        [
            c,
            m["precision"],
            m["recall"],
            m["specificity"] if m["specificity"] is not None else "n/a",
            m["f1"],
            m["auroc"] if m["auroc"] is not None else "n/a",
            m["support"],
        ]
        for c, m in metrics["per_class"].items()
    ]
    return (
        f"<p>{metrics['n']} images. Intervals: 95% percentile bootstrap over images "
        f"({metrics.get('bootstrap', {}).get('resamples', 0)} resamples).</p>"
        + table(["metric", "value", "95% CI"], rows)
        + table(["class", "precision", "recall", "specificity", "F1", "AUROC", "support"], per_class)
    )


def confusion(metrics: dict) -> str:
    alt = f"confusion matrix of {', '.join(metrics['classes'])}: counts, and shares of each true class"
    return figure(confusion_figure(metrics, normalised=True), alt)


def roc(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> str:
    return figure(roc_figure(y, probs, classes), f"ROC curves, one per class ({', '.join(classes)}) against the others")


def seen(record: dict, root: str | None) -> str:
    """The headline on images the model was trained or validated on, and their list (paths relative
    to the data folder ``root``). ``record``: metrics.json's ``seen_images``."""
    n, k = record["n_images"], record["n_seen"]
    if not record["known"]:
        return "<p>This model does not record which images it was trained on: seen images could not be left out.</p>"
    if not k:
        return f"<p>None of the {n} images was used in training or validation.</p>"
    listed = table(["image used in training or validation"], [[relative(p, root)] for p in record["paths"]])
    if record["included"]:
        return (
            f'<p class="warning"><strong>Not a test: {k} of {n} images were used in training or validation '
            "and are included in these figures, which overstate how the model does on new images."
            f"</strong></p><details><summary>the {k} images</summary>{listed}</details>"
        )
    return (
        f"<p>{k} of {n} images were used in training or validation: left out, the figures are on the other "
        f"{n - k}.</p><details><summary>the {k} images left out</summary>{listed}</details>"
    )


def decision(calibration: dict | None) -> str:
    """Whether temperature scaling was applied, why, and the test log-loss before and after."""
    if not calibration or "decision" not in calibration:
        return ""
    applied = "applied" if calibration["applied"] else "not applied (T = 1)"
    text = f"<p>Temperature scaling {applied}: {html.escape(str(calibration['decision']))}.</p>"
    rows = [
        ["log-loss", calibration["loss_uncalibrated"], calibration["loss"]],
        ["expected calibration error", calibration["ece_uncalibrated"], calibration["ece"]],
    ]
    return text + table(["on these images", "before scaling", "as served"], rows)


def calibration_sets(probs: np.ndarray, raw: np.ndarray | None, temperature: float) -> dict[str, np.ndarray]:
    """The probabilities the reliability diagram draws, by legend label: before and after
    temperature scaling, or one set when there is one to draw (``raw`` None: cv keeps only the
    probabilities as served; T = 1: scaling left them as they were)."""
    if raw is None:
        return {"as served": probs}
    if abs(temperature - 1) < 1e-3 or np.allclose(raw, probs, atol=1e-6):
        return {f"before = after scaling (T = {temperature:.2f})": probs}
    return {"before scaling": raw, f"after (T = {temperature:.2f})": probs}


def calibration(y: np.ndarray, probs: np.ndarray, raw: np.ndarray | None, temperature: float) -> str:
    """The reliability diagram before and after temperature scaling (one line where they are the
    same, ``calibration_sets``) and the ECE of each."""
    labelled = calibration_sets(probs, raw, temperature)
    rows = [[label, expected_calibration_error(y, p)] for label, p in labelled.items()]
    alt = "reliability diagram: accuracy against confidence, " + (
        "before and after temperature scaling" if len(labelled) > 1 else next(iter(labelled))
    )
    said = (
        "<p>Each point: one bin of the images sorted by confidence, their mean confidence against their "
        f"accuracy. The bins hold equal numbers of images, at least {MIN_BIN_IMAGES} each (one bin when "
        "there are fewer): fewer images would make the line zigzag with chance."
    )
    if raw is not None and len(labelled) == 1:
        said += " Temperature scaling left the probabilities as they were: one line shows both."
    return (
        figure(reliability_figure(y, labelled), alt)
        + said
        + "</p>"
        + table(["probabilities", f"expected calibration error ({ECE_BINS} equal-width bins)"], rows)
    )


def gallery(shown: ErrorGallery, no_model: str | None) -> str:
    """The most confident errors laid out as captioned pictures, each the image with the model's
    saliency overlay (``saliency.error_gallery``), or why there are none (``no_model``: why there is
    no bundle to explain them with, ``RunContents.missing_model``)."""
    from pathlib import Path

    from PIL import Image

    if shown.n_errors == 0:
        return "<p>No errors on these images.</p>"
    if not shown.bundle:
        return f'<p class="warning">{shown.n_errors} error(s), not shown: {html.escape(no_model or "no model")}.</p>'
    if not shown.items:
        return "<p>The images of the errors are no longer where the run found them: overlays left out.</p>"
    cards = []
    for it in shown.items:
        buf = io.BytesIO()
        thumb = Image.fromarray(it["overlay"]).resize((THUMBNAIL, THUMBNAIL), Image.Resampling.NEAREST)
        thumb.save(buf, format="PNG")
        path = Path(it["path"])
        cards.append(
            f"<figure>{img(buf.getvalue(), 'overlay')}"
            f'<figcaption><span class="name">{html.escape(str(Path(path.parent.name) / path.name))}</span><br>'
            f"true {html.escape(it['label'])}, "
            f"predicted {html.escape(it['predicted'])} ({html.escape(probability(it['confidence']))})"
            "</figcaption></figure>"
        )
    intro = f"<p>{len(cards)} most confident errors; colour shows where the model looked.</p>"
    return f'{intro}<div class="gallery">{"".join(cards)}</div>'


def audit(record: dict) -> str:
    """Accuracy and macro-F1 with the lungs or the borders hidden, next to chance, the verdict, and
    what the check can and cannot rule out. ``record``: audit.json."""
    rows = [
        [
            name.replace("_", " "),
            v["accuracy"],
            v["macro_f1"],
            f"{v['accuracy_ci95'][0]:.4f} - {v['accuracy_ci95'][1]:.4f}" if v["accuracy_ci95"] else "n/a",
        ]
        for name, v in record["views"].items()
    ]
    rows.append(["chance", record["chance"]["accuracy"], record["chance"]["macro_f1"], "-"])
    return (
        table(["images", "accuracy", "macro-F1", "accuracy 95% CI"], rows)
        + f"<p><strong>{html.escape(record['verdict'])}</strong></p>"
        + "<p>What it can rule out: a model that tells the classes apart from markers, text or borders alone "
        "stays above chance with the lungs hidden, and this check catches it. What it cannot: a source "
        "difference inside the lung field itself (children's against adults' chests, one scanner's "
        "contrast against another's) survives the mask, so falling to chance here does not show that the "
        "model reads the disease. Only data from another hospital can.</p>"
    )


def cv_table(cv: dict) -> str:
    """Each metric's mean and spread over the folds; with several training seeds, the spread the
    seed alone makes."""
    rows = [
        [name, "n/a" if row["mean"] is None else row["mean"], "n/a" if row["std"] is None else row["std"]]
        for name, row in cv["summary"].items()
    ]
    folds = table(["metric", "mean over folds", "std over folds"], rows)
    if cv.get("by") == "site":
        from lungxray.report_external import against_chance

        held = [[f["site"], f["test"], "; ".join(against_chance(f["metrics"]))] for f in cv["per_fold"]]
        folds = (
            "<p>Each site held out in turn: trained on the others, scored on it (95% intervals).</p>"
            + table(["held-out site", "images", "figures against chance"], held) + folds
        )  # fmt: skip
    spread = cv.get("seed_spread")
    if not spread:
        return folds
    seeds = [p["training_seed"] for p in next(iter(spread.values()))["per_seed"]]
    cell = lambda s: "n/a" if s is None else f"{s['mean']:.4f} +- {s['std']:.4f}"  # noqa: E731
    rows = [[name, cell(row["fold_mean"]), cell(row["pooled"])] for name, row in spread.items()]
    return (
        f"<p>Training seed {seeds[0]}:</p>{folds}<h3>Over {len(seeds)} training seeds on the same folds</h3>"
        "<p>One cross-validation is one draw: the training seed alone moves these figures.</p>"
        + table(["metric", "mean over folds: mean +- std over seeds", "pooled: mean +- std over seeds"], rows)
    )
