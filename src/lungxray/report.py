"""The HTML report: one self-contained file (plots embedded as PNG data, no network) per run folder.

``write_report(folder)`` reads what ``run``, ``evaluate`` or ``cv`` left there (scan.json,
splits.json or folds.json, trials.json, history.json, metrics.json, predictions.json or cv.json,
audit.json, model/) and writes ``report.html`` with a section for each part it finds: dataset,
search, training, test metrics with 95% CIs, confusion matrices, ROC curves, calibration, the
most confident errors with saliency overlays, and the shortcut audit. Plots by matplotlib.
Holds no training code.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
from pathlib import Path

import numpy as np

from lungxray import runfolder
from lungxray.bundle import CHECKSUMS, CONFIG
from lungxray.errors import MissingInputError
from lungxray.evaluate import ECE_BINS, confusion_figure, curves_figure, expected_calibration_error, reliability_bins

GALLERY_SIZE = 8


def _png(fig, alt: str) -> str:
    """A matplotlib figure as an <img> with the PNG inline and ``alt`` saying what it shows."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(header: list[str], rows: list[list]) -> str:
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def _dataset(scan: dict, parts: dict | None) -> str:
    rows = [[name, n] for name, n in scan["counts"].items()]
    body = f"<p>{html.escape(scan['root'])}: {scan['layout']} layout, {scan['n_images']} usable images.</p>"
    body += _table(["class", "images"], rows)
    if parts:
        body += "<h3>Splits</h3>" + _table(["part", "images"], [[k, v] for k, v in parts.items()])
    rel = lambda p: _relative(p, scan["root"])  # noqa: E731
    skipped = [[rel(s["path"]), s["reason"]] for s in scan["skipped"]]
    body += f"<h3>Skipped files ({len(skipped)})</h3>" + (
        _table(["file", "reason"], skipped) if skipped else "<p>None.</p>"
    )
    mixed = scan.get("mixed_label_duplicate_groups") or []
    if mixed:
        body += (
            f'<p class="warning"><strong>{len(mixed)} duplicate group(s) whose copies carry different labels: '
            "at least one label in each is wrong.</strong></p>"
            + _table(["copies (label)"], [[" == ".join(f"{rel(m['path'])} ({m['label']})" for m in g)] for g in mixed])
        )
    if scan.get("excluded"):
        body += f"<p>{len(scan['excluded'])} image(s) left out by --exclude.</p>"
    from lungxray.data import films_per_patient

    patients = scan.get("patients") or {}
    if patients.get("n"):
        per = films_per_patient(patients)
        body += (
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
    groups = [[len(g), " == ".join(rel(p) for p in g)] for g in scan["duplicate_groups"]]
    body += f"<h3>Duplicate groups ({len(groups)}), each kept in one split</h3>"
    return body + (_table(["images", "files"], groups) if groups else "<p>None found.</p>")


def _search(trials: list[dict], best: dict | None) -> str:
    import matplotlib.pyplot as plt

    done = [t for t in trials if t["value"] is not None]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    values = [t["value"] for t in done]
    ax.plot([t["number"] for t in done], values, "o", label="trial")
    best_so_far = (
        np.minimum.accumulate(values) if best and best.get("objective") == "val_loss" else np.maximum.accumulate(values)
    )
    ax.step([t["number"] for t in done], best_so_far, where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(best.get("objective", "objective") if best else "objective")
    ax.set_title("optimisation history")
    ax.legend()
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
    return text + _png(fig, alt) + _table(["trial", "state", "value", "run"] + keys, rows)


def _curves(history: dict) -> str:
    alt = f"training and validation loss and accuracy per epoch; the kept epoch, {history['best_epoch']}, marked"
    return _png(curves_figure(history, history["best_epoch"]), alt)


def _metrics(metrics: dict) -> str:
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
        + _table(["metric", "value", "95% CI"], rows)
        + _table(["class", "precision", "recall", "specificity", "F1", "AUROC", "support"], per_class)
    )


def _confusion(metrics: dict) -> str:
    alt = f"confusion matrix of {', '.join(metrics['classes'])}: counts, and shares of each true class"
    return _png(confusion_figure(metrics, normalised=True), alt)


def _roc(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> str:
    import matplotlib.pyplot as plt
    from sklearn.metrics import RocCurveDisplay

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for i, name in enumerate(classes):
        if 0 < (y == i).sum() < len(y):
            RocCurveDisplay.from_predictions(y == i, probs[:, i], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], "k:", label="chance")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("one-vs-rest ROC: each class against the others")
    ax.legend(loc="lower right")
    return _png(fig, f"ROC curves, one per class ({', '.join(classes)}) against the others")


def _seen(seen: dict, root: str | None) -> str:
    """The headline on images the model was trained or validated on, and their list (paths relative
    to the data folder ``root``)."""
    n, k = seen["n_images"], seen["n_seen"]
    if not seen["known"]:
        return "<p>This model does not record which images it was trained on: seen images could not be left out.</p>"
    if not k:
        return f"<p>None of the {n} images was used in training or validation.</p>"
    listed = _table(["image used in training or validation"], [[_relative(p, root)] for p in seen["paths"]])
    if seen["included"]:
        return (
            f'<p class="warning"><strong>Not a test: {k} of {n} images were used in training or validation '
            "and are included in these figures, which overstate how the model does on new images."
            f"</strong></p><details><summary>the {k} images</summary>{listed}</details>"
        )
    return (
        f"<p>{k} of {n} images were used in training or validation: left out, the figures are on the other "
        f"{n - k}.</p><details><summary>the {k} images left out</summary>{listed}</details>"
    )


def _decision(calibration: dict | None) -> str:
    """Whether temperature scaling was applied, why, and the test log-loss before and after."""
    if not calibration or "decision" not in calibration:
        return ""
    applied = "applied" if calibration["applied"] else "not applied (T = 1)"
    text = f"<p>Temperature scaling {applied}: {html.escape(str(calibration['decision']))}.</p>"
    rows = [
        ["log-loss", calibration["loss_uncalibrated"], calibration["loss"]],
        ["expected calibration error", calibration["ece_uncalibrated"], calibration["ece"]],
    ]
    return text + _table(["on these images", "before scaling", "as served"], rows)


def _calibration(y: np.ndarray, probs: np.ndarray, raw: np.ndarray | None, temperature: float) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    diagonal = [0.0, 1.0]
    rows = []
    for label, p in (("before scaling", raw), (f"after (T = {temperature:.2f})", probs)):
        if p is None:
            continue
        points = reliability_bins(y, p)
        ax.plot(
            [c for c, _, _ in points],
            [a for _, a, _ in points],
            "o-",
            label=f"{label}: ECE {expected_calibration_error(y, p):.3f}",
        )
        rows.append([label, expected_calibration_error(y, p)])
    ax.plot(diagonal, diagonal, "k:", label="perfect calibration")
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    alt = "reliability diagram: accuracy against confidence, before and after temperature scaling"
    return _png(fig, alt) + _table(["probabilities", f"expected calibration error ({ECE_BINS} bins)"], rows)


def _gallery(model_dir: Path, predictions: dict, y: np.ndarray, probs: np.ndarray) -> str:
    """The most confident errors, each with the model's saliency overlay."""
    from PIL import Image

    from lungxray.bundle import Predictor
    from lungxray.decode import read_image_file
    from lungxray.errors import UnusableImage
    from lungxray.explain import overlay, saliency

    wrong = np.flatnonzero(probs.argmax(axis=1) != y)
    if len(wrong) == 0:
        return "<p>No errors on these images.</p>"
    wrong = wrong[np.argsort(-probs[wrong].max(axis=1))][:GALLERY_SIZE]
    if not (model_dir / CHECKSUMS).is_file():
        return f"<p>No model bundle at {html.escape(str(model_dir))}: overlays left out.</p>"
    predictor = Predictor(model_dir)
    items, arrays, kept = [], [], []
    for i in wrong:  # an image moved or deleted since the run is left out, not a crash
        try:
            path = Path(predictions["images"][i]["path"])
            arrays.append(predictor.decode(read_image_file(path), name=path.name))
        except (OSError, UnusableImage):
            continue
        items.append(predictions["images"][i])
        kept.append(i)
    if not items:
        return "<p>The images of the errors are no longer where the run found them: overlays left out.</p>"
    wrong, images = np.array(kept), np.stack(arrays)
    maps = saliency(predictor, images)
    cards = []
    for it, image, heat, i in zip(items, images, maps, wrong, strict=True):
        buf = io.BytesIO()
        Image.fromarray(overlay(image, heat)).resize((192, 192), Image.Resampling.NEAREST).save(buf, format="PNG")
        guess = predictions["classes"][int(probs[i].argmax())]
        cards.append(
            f'<figure><img alt="overlay" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'
            f"<figcaption>{html.escape(str(Path(Path(it['path']).parent.name) / Path(it['path']).name))}<br>"
            f"true {html.escape(it['label'])}, "
            f"predicted {html.escape(guess)} ({probs[i].max():.2f})</figcaption></figure>"
        )
    intro = f"<p>{len(cards)} most confident errors; colour shows where the model looked.</p>"
    return f'{intro}<div class="gallery">{"".join(cards)}</div>'


def _audit(audit: dict) -> str:
    rows = [
        [
            name.replace("_", " "),
            v["accuracy"],
            v["macro_f1"],
            f"{v['accuracy_ci95'][0]:.4f} - {v['accuracy_ci95'][1]:.4f}" if v["accuracy_ci95"] else "n/a",
        ]
        for name, v in audit["views"].items()
    ]
    rows.append(["chance", audit["chance"]["accuracy"], audit["chance"]["macro_f1"], "-"])
    return (
        _table(["images", "accuracy", "macro-F1", "accuracy 95% CI"], rows)
        + f"<p><strong>{html.escape(audit['verdict'])}</strong></p>"
        + "<p>What it can rule out: a model that tells the classes apart from markers, text or borders alone "
        "stays above chance with the lungs hidden, and this check catches it. What it cannot: a source "
        "difference inside the lung field itself (children's against adults' chests, one scanner's "
        "contrast against another's) survives the mask, so falling to chance here does not show that the "
        "model reads the disease. Only data from another hospital can.</p>"
    )


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
.scroll{overflow-x:auto;max-width:100%}.summary td:first-child{font-weight:600}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f2f2f2}section{margin-bottom:2.2em}img{max-width:100%}.gallery{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;width:200px;font-size:.8em}.warning{color:#a40000}code{background:#f4f4f4;padding:.1em .3em}"""


def _scores(cv: dict | None, predictions: dict | None) -> tuple:
    """(labels, probabilities, uncalibrated probabilities, temperature) of the scored images."""
    if cv:
        classes = cv["pooled"]["classes"]
        y = np.array([classes.index(o["label"]) for o in cv["out_of_fold"]])
        return y, np.array([[o["probabilities"][c] for c in classes] for o in cv["out_of_fold"]]), None, 1.0
    if predictions:
        classes = predictions["classes"]
        y = np.array([classes.index(it["label"]) for it in predictions["images"]])
        return (
            y,
            np.array([it["probabilities"] for it in predictions["images"]]),
            np.array([it["uncalibrated"] for it in predictions["images"]]),
            predictions["temperature"],
        )
    return None, None, None, 1.0


def _cv_table(cv: dict) -> str:
    rows = [
        [name, "n/a" if row["mean"] is None else row["mean"], "n/a" if row["std"] is None else row["std"]]
        for name, row in cv["summary"].items()
    ]
    table = _table(["metric", "mean over folds", "std over folds"], rows)
    spread = cv.get("seed_spread")
    if not spread:
        return table
    seeds = [p["training_seed"] for p in next(iter(spread.values()))["per_seed"]]
    cell = lambda s: "n/a" if s is None else f"{s['mean']:.4f} +- {s['std']:.4f}"  # noqa: E731
    rows = [[name, cell(row["fold_mean"]), cell(row["pooled"])] for name, row in spread.items()]
    return (
        f"<p>Training seed {seeds[0]}:</p>{table}<h3>Over {len(seeds)} training seeds on the same folds</h3>"
        "<p>One cross-validation is one draw: the training seed alone moves these figures.</p>"
        + _table(["metric", "mean over folds: mean +- std over seeds", "pooled: mean +- std over seeds"], rows)
    )


CAVEAT = (
    "Research use only. On public chest X-ray sets the classes often come from different hospitals and "
    "patients (in the shared dataset the normal and viral pneumonia films are children's, the COVID-19 "
    "films adults'), so a model can score well by recognising the source rather than the disease. These "
    "figures hold for images like these; test the model on data from another hospital before trusting it."
)


def _relative(path: str, root: str | None) -> str:
    """``path`` relative to the data folder ``root`` when it lies inside it."""
    import os

    if root:
        try:
            rel = os.path.relpath(path, root)
            if not rel.startswith(".."):
                return rel
        except ValueError:
            pass
    return str(path)


def _summary(folder: Path, model_dir: Path, found: dict, metrics: dict, cv: dict | None, external: dict) -> str:
    """What the page is about, first: model, version, date, data, seed, headline figures with CIs, caveat."""
    import datetime

    from lungxray import __version__

    run = runfolder.read_json(folder, runfolder.RUN) or {}
    config = runfolder.read_json(model_dir, CONFIG) if (model_dir / CHECKSUMS).is_file() else None
    model = (cv or {}).get("model") or run.get("model") or ((config or {}).get("model") or {}).get("name", "n/a")
    data = (cv or {}).get("data") or run.get("data") or (found["scan"] or {}).get("root", "n/a")
    # run.json is written after the report: a run's first report reads its seed from splits.json
    seed = (cv or {}).get("seed", run.get("seed", (found["splits"] or {}).get("seed", "n/a")))
    ci = metrics.get("ci95") or {}
    figure = lambda k: "n/a" if metrics.get(k) is None else (  # noqa: E731
        f"{metrics[k]:.4f}" + (f" (95% CI {ci[k][0]:.4f}-{ci[k][1]:.4f})" if ci.get(k) else ""))  # fmt: skip
    rows = [
        ["model", model],
        ["lungxray", __version__],
        ["report written", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")],
        ["data", data],
        ["seed", seed],
        ["images scored", metrics.get("n", "n/a")],
        ["accuracy", figure("accuracy")],
        ["macro-F1", figure("macro_f1")],
        ["macro AUROC", figure("macro_auroc")],
    ]
    if metrics.get("ood"):
        rows.append(["flagged out of distribution", f"{metrics['ood']['share_flagged']:.1%} of the images scored"])
    for name, ext in external.items():
        rows.append([f"{name} (external)", f"accuracy {ext['accuracy']:.4f} on {ext['n']} images"])
    kind = "pooled out-of-fold predictions of a cross-validation" if cv else "held-out or evaluated images"
    return (f'<section id="summary" class="summary"><p>Figures on the {kind}.</p>'
            + _table(["", "value"], rows) + f'<p class="warning">{html.escape(CAVEAT)}</p></section>')  # fmt: skip


def _ood(metrics: dict, external: dict[str, dict], label: str = "internal test") -> str:
    """The out-of-distribution flag on the test images (and each external set): how many it
    flagged, the metrics on the ones it accepts, coverage against accuracy, and what it cannot do."""
    from lungxray.evaluate import coverage_figure

    ood = metrics["ood"]
    sets = {label: ood} | {name: m["ood"] for name, m in external.items() if m.get("ood")}
    rows = []
    for name, s in sets.items():
        accepted = s["accepted"]
        rows.append([
            name, s["n_flagged"], f"{s['share_flagged']:.1%}",
            f"{accepted['accuracy']:.4f} (n={accepted['n']})" if accepted else "n/a",
            f"{s['wrong_caught']} of {s['n_wrong']}",
        ])  # fmt: skip
    text = (
        "<p>Every prediction carries an out-of-distribution score: how far the image lies from the "
        "training images (Mahalanobis distance of its thumbnail's principal components and its grey-level "
        "and texture statistics), divided by the 95th percentile of the training and validation images' "
        "distances (each scored by a fit without it). "
        "Above 1 the image is flagged: the upload page gives no verdict, and predictions say "
        '<code>"in_distribution": false</code>. About 5% of images like the training ones are '
        "flagged by design.</p>"
        '<p class="warning">What the flag does not do: it catches inputs unlike any training film (inverted, '
        "rotated, upside down, cropped, blank, noise, text, photographs), not a plausible chest film from a "
        "population the training data lacks. On the shared dataset, adult normal films look like its adult "
        "COVID-19 films: most of them pass the flag and are still called COVID-19. Where an external set was "
        "scored, its section below shows what the flag did there.</p>"
    )
    figure = _png(coverage_figure(sets), "accuracy on the accepted images against the share accepted, per dataset")
    table = _table(["images", "flagged", "share flagged", "accuracy on accepted", "errors flagged"], rows)
    return text + table + figure


def _external(metrics: dict, external: dict[str, dict]) -> str:
    """Each external dataset next to the internal test: per-class recall with CIs, AUROC where
    defined, the flagged share, and in words which class the model mistakes for which."""
    parts = [
        "<p>The final model on data from elsewhere, never used for training, tuning or calibration. "
        "Figures for a class with few images have wide intervals.</p>"
    ]
    for name, ext in external.items():
        interval = functools.partial(_interval, ext.get("ci95") or {})
        internal_ci = metrics.get("ci95") or {}
        rows = []
        for c, m in ext["per_class"].items():
            if not m["support"]:
                continue
            own = metrics["per_class"].get(c, {})
            own_ci = internal_ci.get(f"recall/{c}")
            rows.append([
                c, m["support"],
                f"{own['recall']:.2f}" + (f" ({own_ci[0]:.2f}-{own_ci[1]:.2f})" if own_ci else "") if own else "n/a",
                f"{m['recall']:.2f}{interval(f'recall/{c}')}",
                f"{m['auroc']:.2f}{interval(f'auroc/{c}')}" if m["auroc"] is not None else "n/a (one class only)",
                f"{ext['ood']['share_flagged_per_class'].get(c, 0):.0%}" if ext.get("ood") else "n/a",
            ])  # fmt: skip
        parts.append(
            f"<h3>{html.escape(name)}</h3><p>{html.escape(ext.get('data', ''))}: {ext['n']} images, accuracy "
            f"{ext['accuracy']:.4f}{interval('accuracy')} (internal test {metrics['accuracy']:.4f}), macro-F1 "
            f"{ext['macro_f1']:.4f}{interval('macro_f1')}.</p>"
            + _table(
                [
                    "class",
                    "images",
                    "recall, internal test",
                    f"recall, {name}",
                    "AUROC (one vs rest)",
                    "flagged out of distribution",
                ],
                rows,
            )  # fmt: skip
            + f"<p>{html.escape(gap_in_words(metrics, ext, name))}</p>"
        )
    return "".join(parts)


def _internal_metrics(model_dir: Path) -> dict | None:
    """The test metrics stored in the bundle (listed in its checksums), if any."""
    if not (model_dir / CHECKSUMS).is_file():
        return None
    listed = runfolder.read_json(model_dir, CHECKSUMS) or {}
    return runfolder.read_json(model_dir, runfolder.METRICS) if runfolder.METRICS in listed else None


def _interval(ci: dict, key: str) -> str:
    """`` (low-high)`` of ``key`` in a metrics dict's ci95, or nothing."""
    return f" ({ci[key][0]:.2f}-{ci[key][1]:.2f})" if ci.get(key) else ""


def gap_in_words(internal: dict, external: dict, name: str) -> str:
    """The gap as a clinician-researcher reads it: per class, internal and external recall, and the
    class each external class is most often mistaken for."""
    classes = external["classes"]
    cm = np.array(external["confusion_matrix"])
    sentences = []
    for i, c in enumerate(classes):
        n = int(cm[i].sum())
        if not n:
            continue
        own = internal["per_class"].get(c, {}).get("recall")
        recall = external["per_class"][c]["recall"]
        wrong = cm[i].copy()
        wrong[i] = 0
        sentence = f"{c}: {int(cm[i, i])} of {n} {name} images recognised (recall {recall:.2f}"
        sentence += f", against {own:.2f} on the internal test)" if own is not None else ")"
        if wrong.max() > 0:
            j = int(wrong.argmax())
            sentence += f"; {int(wrong[j])} of them called {classes[j]}"
        sentences.append(sentence + ".")
    return " ".join(sentences)


def write_report(folder: Path, model_dir: Path | None = None) -> Path:
    """Write ``folder/report.html`` from the run, evaluate or cv outputs found in ``folder``;
    ``model_dir`` (default ``folder/model``) explains the errors in the gallery."""
    folder = Path(folder)
    model_dir = Path(model_dir) if model_dir is not None else folder / runfolder.MODEL
    found = {
        key: runfolder.read_json(folder, name)
        for key, name in (
            ("scan", runfolder.SCAN),
            ("splits", runfolder.SPLITS),
            ("trials", runfolder.TRIALS),
            ("best_params", runfolder.BEST_PARAMS),
            ("history", runfolder.HISTORY),
            ("metrics", runfolder.METRICS),
            ("predictions", runfolder.PREDICTIONS),
            ("cv", runfolder.CV),
            ("audit", runfolder.AUDIT),
        )
    }
    cv, metrics = found["cv"], found["metrics"] or (found["cv"] or {}).get("pooled")
    if metrics is None:
        raise MissingInputError(
            f"{folder} holds no {runfolder.METRICS} or {runfolder.CV}",
            hint="run `lungxray run`, `evaluate` or `cv` with --out there first",
        )
    sections = []
    if found["scan"]:
        sizes = (
            found["splits"]["sizes"]
            if found["splits"]
            else {
                f"fold {f['fold']} (train / val / test)": f"{f['train']} / {f['val']} / {f['test']}"
                for f in cv["per_fold"]
            }
            if cv
            else None
        )
        sections.append(_section("dataset", "Dataset", _dataset(found["scan"], sizes)))
    if found["trials"]:
        sections.append(_section("search", "Hyperparameter search", _search(found["trials"], found["best_params"])))
    if found["history"]:
        sections.append(_section("training", "Training curves", _curves(found["history"])))
    if cv:
        sections.append(_section("folds", f"{cv['folds']}-fold cross-validation ({cv['model']})", _cv_table(cv)))
    sections.append(_section("metrics", "Pooled out-of-fold metrics" if cv else "Test metrics", _metrics(metrics)))
    sections.append(_section("confusion", "Confusion matrix", _confusion(metrics)))
    y, probs, raw, temperature = _scores(cv, found["predictions"])
    if probs is not None:
        sections.append(_section("roc", "ROC curves", _roc(y, probs, metrics["classes"])))
        sections.append(
            _section(
                "calibration",
                "Calibration",
                _decision(metrics.get("calibration")) + _calibration(y, probs, raw, temperature),
            )
        )
    if found["predictions"] and not cv:
        sections.append(
            _section("errors", "Most confident errors", _gallery(model_dir, found["predictions"], y, probs))
        )
    external = {
        sub.name: runfolder.read_json(sub, runfolder.METRICS)
        for sub in sorted((folder / runfolder.EXTERNAL).glob("*"))
        if (sub / runfolder.METRICS).is_file()
    }
    own_run = found["splits"] is not None  # a run's folder (its test split), not an evaluation of other data
    if metrics.get("ood"):
        label = "internal test" if own_run else "images scored"
        sections.append(_section("ood", "Out-of-distribution flag", _ood(metrics, external, label)))
    internal = _internal_metrics(model_dir) if not cv and not own_run else None
    if internal is not None and internal["confusion_matrix"] != metrics["confusion_matrix"]:
        # `evaluate` on other data: this data against the model's own test
        root = metrics.get("data") or (found["scan"] or {}).get("root", "")
        compared = {Path(root).name or "this data": metrics | {"data": root}}
        sections.append(_section("external", "Against the model's own test", _external(internal, compared)))
    elif external and not cv:
        sections.append(_section("external", "Other hospitals", _external(metrics, external)))
    if found["audit"]:
        sections.append(_section("audit", "Shortcut audit", _audit(found["audit"])))
    root = metrics.get("data") or (found["scan"] or {}).get("root")
    seen = _seen(metrics["seen_images"], root) if metrics.get("seen_images") else ""
    title = f"lungxray report: {folder.name}"
    summary = _summary(folder, model_dir, found, metrics, cv, external)
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"{summary}{seen}{''.join(sections)}</body></html>"
    )
    return runfolder.write_text(folder / runfolder.REPORT, page)
