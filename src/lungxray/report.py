"""The HTML report: one self-contained file (plots embedded as PNG data, no network) per run folder.

``write_report(folder)`` reads what ``run``, ``evaluate`` or ``cv`` left there (``report_data``)
and writes ``report.html``: a summary first, then a section for each part it finds: dataset,
search, training, test metrics with 95% CIs, confusion matrices, ROC curves, calibration, the
most confident errors with saliency overlays, the out-of-distribution flag, data from elsewhere,
and the shortcut audit. This module decides which sections a folder gets and lays out the page;
the sections' HTML is ``report_sections`` and ``report_external`` (a multi-label model's figures,
per finding, ``report_multilabel``), the figures ``plots``, the gallery's pictures
``saliency.error_gallery``. Holds no training code.
"""

from __future__ import annotations

import html
import warnings
from pathlib import Path

from lungxray import report_sections as body
from lungxray import runfolder
from lungxray.report_blocks import section, table
from lungxray.report_data import RunContents, read_run
from lungxray.report_external import against_chance, external_section, ood_section, site_rows
from lungxray.report_multilabel import multilabel_sections, summary_rows

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
.scroll{overflow-x:auto;max-width:100%}.summary td:first-child{font-weight:600}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f2f2f2}section{margin-bottom:2.2em}img{max-width:100%}.gallery{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;flex:0 0 200px;width:200px;max-width:100%;font-size:.8em}figcaption .name{overflow-wrap:anywhere}
.warning{color:#a40000}code{background:#f4f4f4;padding:.1em .3em}"""

CAVEAT = (
    "Research use only. On public chest X-ray sets the classes often come from different hospitals and "
    "patients (in the shared dataset the normal and viral pneumonia films are children's, the COVID-19 "
    "films adults'), so a model can score well by recognising the source rather than the disease. These "
    "figures hold for images like these; test the model on data from another hospital before trusting it."
)


def _summary(run: RunContents) -> str:
    """What the page is about, first: model, version, date, data, seed, headline figures with CIs, caveat."""
    import datetime

    from lungxray.version import __version__

    found, cv, metrics, external = run.found, run.cv, run.metrics, run.external
    record = run.run_record()
    config = run.model_config()
    scored_by = run.scored_by()  # an evaluation's model
    model = (cv or {}).get("model") or record.get("model") or scored_by.get("model")
    model = model or ((config or {}).get("model") or {}).get("name", "n/a")
    data = (cv or {}).get("data") or record.get("data") or run.data_root() or "n/a"
    # run.json is written after the report: a run's first report reads its seed from splits.json
    seed = (cv or {}).get("seed", record.get("seed", (found["splits"] or {}).get("seed")))
    if seed is None:  # an evaluation: the training seed of the model it scored
        seed = scored_by.get("seed", ((config or {}).get("training") or {}).get("seed"))
    ci = metrics.get("ci95") or {}
    figure = lambda k: "n/a" if metrics.get(k) is None else (  # noqa: E731
        f"{metrics[k]:.4f}" + (f" (95% CI {ci[k][0]:.4f}-{ci[k][1]:.4f})" if ci.get(k) else ""))  # fmt: skip
    rows = [
        ["model", model],
        ["lungxray", __version__],
        ["report written", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")],
        ["data", data],
        ["seed", "n/a" if seed is None else seed],
        ["images scored", metrics.get("n", "n/a")],
        *[list(row) for row in site_rows(metrics)],
        ["accuracy", figure("accuracy")],
        ["macro-F1", figure("macro_f1")],
        ["macro AUROC", figure("macro_auroc")],
    ]
    if metrics.get("task") == "multilabel":  # a yes/no per finding: no accuracy or F1 to lead with
        rows[-3:] = summary_rows(metrics)
    if metrics.get("ood"):
        rows.append(["flagged out of distribution", f"{metrics['ood']['share_flagged']:.1%} of the images scored"])
    for name, ext in external.items():
        rows.append([f"{name} (external, {ext['n']} images)", "; ".join(against_chance(ext))])
    kind = "pooled out-of-fold predictions of a cross-validation" if cv else "held-out or evaluated images"
    return (f'<section id="summary" class="summary"><p>Figures on the {kind}.</p>'
            + table(["", "value"], rows) + f'<p class="warning">{html.escape(CAVEAT)}</p></section>')  # fmt: skip


def _data_and_training(run: RunContents) -> list[str]:
    """The dataset, search, training-curve and cross-validation sections the folder has files for."""
    found, cv = run.found, run.cv
    sections = []
    if found["scan"]:
        sections.append(section("dataset", "Dataset", body.dataset(found["scan"], run.split_sizes())))
    if found["trials"]:
        sections.append(section("search", "Hyperparameter search", body.search(found["trials"], found["best_params"])))
    if found["history"]:
        sections.append(section("training", "Training curves", body.curves(found["history"])))
    if cv:
        sections.append(section("folds", _cv_title(cv), body.cv_table(cv)))
    return sections


def _test(run: RunContents) -> list[str]:
    """The metrics, confusion matrix, ROC, calibration and error-gallery sections of the scored images."""
    from lungxray.saliency import error_gallery

    cv, metrics = run.cv, run.metrics
    if metrics.get("task") == "multilabel":
        images = (cv or {}).get("out_of_fold") or (run.found["predictions"] or {}).get("images")
        return multilabel_sections(metrics, images, pooled=bool(cv))
    sections = [
        section("metrics", "Pooled out-of-fold metrics" if cv else "Test metrics", body.metrics_tables(metrics)),
        section("confusion", "Confusion matrix", body.confusion(metrics)),
    ]
    y, probs, raw, temperature = run.scores()
    if probs is not None:
        sections.append(section("roc", "ROC curves", body.roc(y, probs, metrics["classes"])))
        calibration = body.decision(metrics.get("calibration")) + body.calibration(y, probs, raw, temperature)
        sections.append(section("calibration", "Calibration", calibration))
    predictions = run.found["predictions"]
    if predictions and not cv:
        shown = error_gallery(run.model_dir, predictions, y, probs)
        sections.append(section("errors", "Most confident errors", body.gallery(shown, run.missing_model())))
    return sections


def _elsewhere(run: RunContents) -> list[str]:
    """The out-of-distribution section, and the comparison with data from elsewhere: an
    evaluation's data against the model's own test, or a run's external sets against its test."""
    cv, metrics, external = run.cv, run.metrics, run.external
    if metrics.get("task") == "multilabel":  # these comparisons read single-label figures
        return []
    sections = []
    if metrics.get("ood"):
        label = "internal test" if run.own_run else "images scored"
        sections.append(section("ood", "Out-of-distribution flag", ood_section(metrics, external, label)))
    evaluation = not cv and not run.own_run
    internal = run.model_metrics() if evaluation else None
    if internal is not None and internal["confusion_matrix"] != metrics["confusion_matrix"]:
        # `evaluate` on other data: this data against the model's own test
        root = metrics.get("data") or (run.found["scan"] or {}).get("root", "")
        compared = {Path(root).name or "this data": metrics | {"data": root}}
        sections.append(section("external", "Against the model's own test", external_section(internal, compared)))
    elif evaluation and internal is None:
        why = run.missing_model() or "the model bundle holds no test metrics of its own (it was trained, not run)"
        said = f'<p class="warning">Not compared: {html.escape(why)}.</p>'
        sections.append(section("external", "Against the model's own test", said))
    elif external and not cv:
        sections.append(section("external", "Other hospitals", external_section(metrics, external)))
    return sections


def write_report(folder: Path, model_dir: Path | None = None) -> Path:
    """Write ``folder/report.html`` from the run, evaluate or cv outputs found in ``folder``;
    ``model_dir`` (default ``folder/model``, or the bundle an evaluation recorded) explains the
    errors in the gallery and holds the test an evaluation is compared with. Without it, the page
    says so where those sections would be, and a warning naming --model is issued."""
    run = read_run(folder, model_dir)
    if run.missing_model():  # `lungxray report` prints it in one line; the page says it where it applies
        warnings.warn(f"{run.folder / runfolder.REPORT}: {run.missing_model()}", stacklevel=2)
    sections = _data_and_training(run) + _test(run) + _elsewhere(run)
    if run.found["audit"]:
        sections.append(section("audit", "Shortcut audit", body.audit(run.found["audit"])))
    metrics = run.metrics
    seen = body.seen(metrics["seen_images"], run.data_root()) if metrics.get("seen_images") else ""
    title = f"lungxray report: {run.folder.name}"
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"{_summary(run)}{seen}{''.join(sections)}</body></html>"
    )
    return runfolder.write_text(run.folder / runfolder.REPORT, page)


def _cv_title(cv: dict) -> str:
    kind = "leave-one-site-out" if cv.get("by") == "site" else f"{cv['folds']}-fold"
    return f"{kind} cross-validation ({cv['model']})"
