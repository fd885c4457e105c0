"""The model card: ``MODEL_CARD.md`` in the bundle, written from what was measured.

Sections follow Hugging Face's model cards (metadata, model details, intended use, out-of-scope
use, training data, evaluation, results elsewhere, audit, limitations, how to cite). ``run``
writes it once the test split, the external sets and the audit are scored; ``train`` writes it
with the evaluation still to do. ``headline`` picks the rows the card and the report lead with
(figures against chance), which ``run`` stores beside the card as headline.json and ``lungxray
serve`` returns from ``/model`` with it. The figures come from the run's own files (scan.json,
metrics.json, audit.json, the external metrics); nothing here computes a metric.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from lungxray.bundle import CARD, HEADLINE, restaged
from lungxray.runfolder import write_text
from lungxray.version import __version__


def _figure(metrics: dict, name: str, label: str | None = None, value: float | None = None) -> str:
    """``label value (95% CI low-high)`` for metric ``name`` (``value``, when not a top-level key)."""
    value, interval = value if value is not None else metrics.get(name), (metrics.get("ci95") or {}).get(name)
    if value is None:
        return f"{label or name}: not defined on these images"
    ci = f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})" if interval else ""
    return f"{label or name} {value:.3f}{ci}"


def _model_details(config: dict, date: str) -> list[str]:
    model, prep, training = config["model"], config["preprocessing"], config.get("training", {})
    members = f", an ensemble of {model['members']}" if model.get("members", 1) > 1 else ""
    options = [k for k in ("crop_borders",) if prep.get(k)] + [f"equalize {prep['equalize']}"] * (
        prep.get("equalize", "none") != "none"
    )
    ood = config.get("ood")
    return [
        "## Model details",
        "",
        f"- Model: `{model['name']}`{members}, hyperparameters `{model['hyperparameters']}`.",
        f"- Input: {prep['img_size']} x {prep['img_size']} grayscale, bilinear resize"
        + (f", {', '.join(options)}" if options else "")
        + "; DICOM read through its modality LUT and window.",
        f"- Classes: {', '.join(config['classes'])}.",
        f"- Trained with lungxray {__version__} (torch {training.get('torch_version', '?')}) on {date}, seed "
        f"{training.get('seed', '?')}, best epoch {training.get('best_epoch', '?')}"
        + (f", in {training['arithmetic']}." if training.get("arithmetic") else "."),
        f"- Calibration: temperature {config.get('calibration', {}).get('temperature', 1.0):.3f}, fitted on the "
        "validation split.",
        f"- Out-of-distribution flag: {ood['method']}, flags above score 1."
        if ood
        else "- No out-of-distribution flag.",
        "",
    ]


def _use() -> list[str]:
    return [
        "## Intended use",
        "",
        "Research: measuring how well chest radiographs like the training images can be told apart, where the",
        "model looks, and whether it reads the disease or the image source. A starting point for a model that",
        "is then validated on the population it is meant for.",
        "",
        "## Out-of-scope use",
        "",
        "- Diagnosis, triage or any decision about a patient: this model has not been validated clinically.",
        "- Images the out-of-distribution flag rejects, lateral views, children, other modalities.",
        "- Hospitals, scanners and populations unlike the training data without measuring it there first",
        "  (`lungxray run --external DIR`).",
        "",
    ]


def _training_data(scan: dict, config: dict) -> list[str]:
    counts = ", ".join(f"{c} {n}" for c, n in scan["counts"].items())
    sizes = config.get("training", {}).get("split_sizes") or {}
    patients = scan.get("patients") or {}
    lines = [
        "## Training data",
        "",
        f"- Folder `{Path(scan['root']).name}` ({scan['layout']} layout): {scan['n_images']} usable images ({counts}); "
        f"{len(scan['skipped'])} files skipped, {len(scan['duplicate_groups'])} duplicate groups kept whole.",
        f"- Split ({config.get('training', {}).get('split_mode', '?')}): "
        + ", ".join(f"{k} {v}" for k, v in sizes.items())
        + ". Tuning and early stopping saw train and validation only.",
    ]
    if patients.get("n"):
        together = (
            "each kept within one split"
            if patients.get("grouped") and config.get("training", {}).get("split_mode") == "random"
            else "not grouped by patient (--no-dicom-patients or the dataset's own split folders)"
        )
        lines.append(f"- {patients['n']} patients (DICOM PatientID), {together}.")
    sources = (config.get("training_data") or {}).get("sources")
    lines += [
        f"- Sources: {sources}" if sources else "- Sources: not given (`--data-sources`); state them here.",
        "- When the classes come from different hospitals or archives, a model can learn the source instead of",
        "  the disease (see the shortcut audit).",
        "",
    ]
    return lines


def _evaluation(metrics: dict | None) -> list[str]:
    if metrics is None:
        return [
            "## Evaluation",
            "",
            "Not evaluated on held-out images yet: `lungxray evaluate MODEL DATA --splits RUN/splits.json`.",
            "",
        ]
    if metrics.get("task") == "multilabel":
        from lungxray.report_multilabel import card_lines

        return card_lines(metrics)
    lines = [
        "## Evaluation",
        "",
        f"On the {metrics['n']} held-out test images, read once, after tuning and training:",
        "",
        f"- {_figure(metrics, 'accuracy')}, {_figure(metrics, 'macro_f1', 'macro-F1')}, "
        f"{_figure(metrics, 'macro_auroc', 'macro AUROC')}.",
    ]
    from lungxray.report_external import site_rows

    lines[4:4] = [f"- {label}: {figures}." for label, figures in site_rows(metrics)]
    for c, m in metrics["per_class"].items():
        lines.append(f"- {c}: {_figure(metrics, f'recall/{c}', 'recall', m['recall'])}, {m['support']} images.")
    ood = metrics.get("ood")
    if ood:
        lines.append(f"- Flagged out of distribution: {ood['n_flagged']} of {metrics['n']}.")
    lines += ["", "Intervals are 95% intervals over the test images (exact binomial for accuracy and recall, "
              "bootstrap for the others); one training run is one draw.", ""]  # fmt: skip
    return lines


def _external(metrics: dict | None, external: dict[str, dict]) -> list[str]:
    if not external:
        return ["## Results elsewhere", "", "Not measured: no external data was given (`--external DIR`).", ""]
    from lungxray.report_external import against_chance, gap_in_words

    lines = ["## Results elsewhere", ""]
    for name, ext in external.items():
        lines.append(
            f"- {name}: {ext['n']} images; " + "; ".join(against_chance(ext))
            + (f"; {ext['ood']['n_flagged']} flagged out of distribution." if ext.get("ood") else ".")
        )  # fmt: skip
        if metrics is not None:
            lines.append(f"  {gap_in_words(metrics, ext, name)}")
    return lines + [""]


def _audit(audit: dict | None) -> list[str]:
    if audit is None:
        return []
    views = ", ".join(f"{k.replace('_', ' ')} {v['accuracy']:.3f}" for k, v in audit["views"].items())
    return ["## Shortcut audit", "", f"Accuracy on the test images {views}; chance "
            f"{audit['chance']['accuracy']:.3f}.", "", audit["verdict"], ""]  # fmt: skip


def _limitations(metrics: dict | None, external: dict[str, dict]) -> list[str]:
    lines = ["## Limitations", ""]
    if metrics is not None:
        low, high = (metrics.get("ci95") or {}).get("accuracy") or (None, None)
        width = f" (accuracy interval {low:.3f}-{high:.3f})" if low is not None else ""
        lines.append(f"- {metrics['n']} test images{width}: a small test set bounds what the figures can show.")
    for name, ext in external.items():
        drops = {
            c: metrics["per_class"][c]["recall"] - m["recall"]
            for c, m in ext["per_class"].items()
            if metrics is not None and m["support"] and c in metrics["per_class"] and m["recall"] is not None
        }
        worst = max(drops, key=drops.get, default=None)
        if worst is not None and drops[worst] > 0.05:
            lines.append(
                f"- On {name}, {worst} recall fell from {metrics['per_class'][worst]['recall']:.2f} to "
                f"{ext['per_class'][worst]['recall']:.2f}: expect a gap like it at any hospital not yet measured."
            )
        elif worst is not None:
            lines.append(f"- On {name}, every class's recall stayed within 0.05 of the internal test.")
    if not external:
        lines.append("- Never measured on data from another hospital.")
    lines += [
        "- Near-copies that the duplicate search missed, and one patient's films without patient IDs, can sit on",
        "  both sides of the split and flatter the test figures.",
        "- A different seed gives a different model: report the spread over seeds (`lungxray cv --repeats`).",
        "",
    ]
    return lines


def model_card(
    config: dict,
    scan: dict,
    metrics: dict | None = None,
    external: dict[str, dict] | None = None,
    audit: dict | None = None,
    date: datetime.date | None = None,
) -> str:
    """The card's Markdown. ``config``: the bundle's config.json; ``scan``: scan.json; ``metrics``:
    the test split's metrics.json (None: not evaluated yet); ``external``: name -> that set's
    metrics.json; ``audit``: audit.json."""
    date = date or datetime.date.today()
    title = f"lungxray {config['model']['name']}: {', '.join(config['classes'])}"
    lines = [
        "---",
        "library_name: lungxray",
        "pipeline_tag: image-classification",
        "tags: [chest-x-ray, medical-imaging, research-only]",
        "---",
        "",
        f"# Model card: {title}",
        "",
        "Research use only: not a diagnosis.",
        "",
        *_model_details(config, date.isoformat()),
        *_use(),
        *_training_data(scan, config),
        *_evaluation(metrics),
        *_external(metrics, external or {}),
        *_audit(audit),
        *_limitations(metrics, external or {}),
        "## How to cite",
        "",
        "Cite the dataset as its authors ask, and the software:",
        "",
        "```bibtex",
        "@software{lungxray,",
        "  title = {lungxray: chest X-ray classifiers, tuned, honestly evaluated, explainable and servable},",
        f"  version = {{{__version__}}},",
        f"  year = {{{date.year}}}",
        "}",
        "```",
        "",
    ]
    return "\n".join(lines)


def headline(metrics: dict, external: dict[str, dict]) -> list[dict]:
    """The rows the report's top table and the card lead with, for ``/model``: the test split (or
    its held-out site) and its worst site, then each external set, each as {"label", "figures",
    "balanced_accuracy", "lowest_recall"} where the figures are balanced accuracy, macro-F1 and
    accuracy beside always answering the majority class, each class's recall, and each one-vs-rest
    AUROC against 0.5 (``report_external.against_chance``), and the last two the numbers the
    service's one-line summary compares (``_lowest``)."""
    from lungxray.report_external import against_chance, site_rows

    if metrics.get("task") == "multilabel":
        from lungxray.report_multilabel import headline_row

        sets = [(f"test split ({metrics['n']} images)", metrics)]
        sets += [(f"{name} (external, {ext['n']} images)", ext) for name, ext in external.items()]
        return [headline_row(m, label) for label, m in sets]
    # site_rows' rows, in its order: the held-out site (the test itself), then the worst site
    site, worst = (metrics.get("split") or {}).get("site"), metrics.get("worst_site")
    behind = [metrics] * (site is not None) + ([metrics["per_site"][worst]] if worst is not None else [])
    rows = [(label, figures, m) for (label, figures), m in zip(site_rows(metrics), behind, strict=True)]
    if site is None:  # else site_rows' first row is the test
        rows.insert(0, (f"test split ({metrics['n']} images)", "; ".join(against_chance(metrics)), metrics))
    rows += [
        (f"{name} (external, {ext['n']} images)", "; ".join(against_chance(ext)), ext) for name, ext in external.items()
    ]
    return [{"label": label, "figures": figures, **_lowest(m)} for label, figures, m in rows]


def _lowest(metrics: dict) -> dict:
    """{"balanced_accuracy", "lowest_recall": {"class", "recall"} of the classes present, or None}."""
    recalls = {c: m["recall"] for c, m in metrics["per_class"].items() if m["support"] and m["recall"] is not None}
    lowest = min(recalls, key=recalls.get, default=None)
    return {
        "balanced_accuracy": metrics.get("balanced_accuracy"),
        "lowest_recall": None if lowest is None else {"class": lowest, "recall": recalls[lowest]},
    }


def write_card(model_dir: Path, text: str, rows: list[dict] | None = None) -> Path:
    """Add (or replace) MODEL_CARD.md in the bundle and, given the ``headline`` rows, headline.json,
    its checksums updated."""
    with restaged(model_dir) as staging:
        write_text(staging / CARD, text)
        if rows is not None:
            write_text(staging / HEADLINE, json.dumps(rows, indent=2) + "\n")
    return Path(model_dir) / CARD
