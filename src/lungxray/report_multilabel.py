"""The report's and the model card's pages for a multi-label model (metrics.json with
``"task": "multilabel"``): per finding AUROC against chance, average precision beside its
baseline, sensitivity and specificity at the finding's threshold, each with its 95% interval;
macro and micro AUROC; each finding's prevalence per split and per site; a ROC panel per finding.

``multilabel_sections`` gives the report's sections, ``multilabel_section`` the same as one HTML
string, ``summary_rows`` the report's top rows, ``card_lines`` the card's evaluation and
``headline_row`` a row ``/model`` serves. Lays out figures ``metrics_multilabel`` computed;
computes none but the ROC panels' curves (``plots``).
"""

from __future__ import annotations

import html

import numpy as np

from lungxray.report_blocks import figure, section, table

CHANCE = 0.5


def _ci(metrics: dict, key: str) -> list[float] | None:
    return (metrics.get("ci95") or {}).get(key)


def _value(value: float | None, ci: list[float] | None, digits: int = 3) -> str:
    """``0.812 (0.790-0.833)``; "n/a" for a figure not defined on these images."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" + (f" ({ci[0]:.{digits}f}-{ci[1]:.{digits}f})" if ci else "")


def _auroc_words(metrics: dict, key: str, verdict: str | None) -> str:
    """``macro AUROC 0.81 (0.79-0.83): better than chance (0.50)``."""
    said = f"{key.replace('_auroc', ' AUROC')} {_value(metrics.get(key), _ci(metrics, key), 2)}"
    if key == "micro_auroc":  # its verdict names its own baseline: the findings' prevalences alone
        return said + (f": {verdict}" if verdict else "")
    return said + (f": {verdict} ({CHANCE:.2f})" if verdict else "")


def _intervals_said(metrics: dict) -> str:
    boot = metrics.get("bootstrap")
    if not boot:
        return "No intervals (computed without resamples)."
    said = (
        "Intervals: 95%, exact binomial (Clopper-Pearson) for sensitivity and specificity, percentile "
        f"bootstrap over images ({boot['resamples']} resamples, seed {boot['seed']}) for the others."
    )
    return said + (
        f" Fewer resamples than the {boot['requested']} asked: {boot['reduced']}." if "reduced" in boot else ""
    )


def _thresholds_said(metrics: dict) -> str:
    rules = sorted({m.get("threshold_rule", "given") for m in metrics["per_finding"].values()})
    named = {
        "youden": "chosen on the validation split by Youden's J (the largest sensitivity + specificity - 1)",
        "training prevalence": "the finding's training prevalence where validation had only one side",
        "fixed 0.5": "0.5 where validation had only one side and no training prevalence was given",
        "given": "as the model carries them",
    }
    return (
        "Sensitivity and specificity are read at each finding's threshold (positive when its probability "
        f"is at least the threshold): {'; '.join(named.get(r, r) for r in rules)}."
    )


def metrics_table(metrics: dict) -> str:
    """Macro and micro AUROC, then one row per finding: prevalence, AUROC with its interval and
    its reading against chance, average precision with its interval beside its baseline,
    sensitivity and specificity at the threshold with theirs."""
    defined = sum(m["auroc"] is not None for m in metrics["per_finding"].values())
    head = [
        ["macro AUROC", _value(metrics["macro_auroc"], _ci(metrics, "macro_auroc")),
         metrics.get("macro_auroc_vs_chance") or "n/a", f"mean over the {defined} findings with both sides"],
        ["micro AUROC", _value(metrics["micro_auroc"], _ci(metrics, "micro_auroc")),
         metrics.get("micro_auroc_vs_chance") or "n/a", "every known (image, finding) entry pooled"],
    ]  # fmt: skip
    rows = []
    for name, m in metrics["per_finding"].items():
        prevalence = "n/a" if m["prevalence"] is None else f"{m['n_pos']} of {m['n_known']} ({m['prevalence']:.1%})"
        rows.append([
            name, prevalence,
            _value(m["auroc"], _ci(metrics, f"auroc/{name}")), m.get("auroc_vs_chance") or "n/a",
            _value(m["average_precision"], _ci(metrics, f"average_precision/{name}")),
            "n/a" if m["average_precision_baseline"] is None else f"{m['average_precision_baseline']:.3f}",
            "each fold's own" if m["threshold"] is None else f"{m['threshold']:.3f}",
            _value(m["sensitivity"], _ci(metrics, f"sensitivity/{name}")),
            _value(m["specificity"], _ci(metrics, f"specificity/{name}")),
        ])  # fmt: skip
    header = ["finding", "positives of known", "AUROC (95% CI)", f"against chance ({CHANCE})",
              "average precision (95% CI)", "its chance (prevalence)", "threshold", "sensitivity (95% CI)",
              "specificity (95% CI)"]  # fmt: skip
    return (
        f"<p>{metrics['n']} images, {len(metrics['findings'])} findings. Each finding is scored on the images "
        "whose label for it is known; an unknown label is left out, never counted negative. "
        f"{html.escape(_intervals_said(metrics))}</p>"
        + table(["", "value (95% CI)", f"against chance ({CHANCE})", "over"], head)
        + table(header, rows)
        + f"<p>{html.escape(_thresholds_said(metrics))} Average precision is read against its chance level, "
        "the finding's prevalence, not against 0.5.</p>"
    )


def prevalence_tables(prevalence: dict[str, dict]) -> str:
    """Each ``metrics_multilabel.prevalence_table`` (by title, e.g. "per split", "per site") as one
    table: a row per finding, a column per part, each cell positives of known (prevalence)."""
    out = []
    for title, parts in prevalence.items():
        findings = list(dict.fromkeys(f for counts in parts.values() for f in counts))
        rows = []
        for f in findings:
            cells = []
            for counts in parts.values():
                c = counts.get(f)
                cells.append("n/a" if not c or c["prevalence"] is None else
                             f"{c['positives']} of {c['known']} ({c['prevalence']:.1%})")  # fmt: skip
            rows.append([f, *cells])
        out.append(f"<h3>{html.escape(title)}</h3>" + table(["finding", *parts], rows))
    return "".join(out)


def scores_of(images: list[dict] | None, findings: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Targets (N, F; NaN unknown) and probabilities (N, F) of predictions.json's (or cv's out-of-fold)
    images, each with ``"probabilities"`` and ``"targets"`` ({finding: 1, 0 or null}); None when some
    image lacks either."""
    if not images or any("targets" not in it or "probabilities" not in it for it in images):
        return None
    y = np.array([[np.nan if it["targets"].get(f) is None else it["targets"][f] for f in findings] for it in images])
    return y.astype(np.float64), np.array([[it["probabilities"][f] for f in findings] for it in images])


def roc_panels(y: np.ndarray, probs: np.ndarray, findings: list[str]) -> str:
    from lungxray.plots import multilabel_roc_figure

    alt = f"ROC curve of each finding on its known entries: {', '.join(findings)}"
    return figure(multilabel_roc_figure(y, probs, findings), alt)


def multilabel_sections(
    metrics: dict,
    images: list[dict] | None = None,
    prevalence: dict[str, dict] | None = None,
    pooled: bool = False,
) -> list[str]:
    """The report's sections for a multi-label ``metrics`` dict: the metrics ("metrics"), the
    prevalence tables ("prevalence": ``prevalence``, default metrics.json's "prevalence") and the
    ROC panels ("roc") when ``images`` carry their targets (``scores_of``). ``pooled``: the
    figures are a cross-validation's pooled out-of-fold ones."""
    title = "Pooled out-of-fold metrics, per finding" if pooled else "Test metrics, per finding"
    sections = [section("metrics", title, metrics_table(metrics))]
    prevalence = prevalence if prevalence is not None else metrics.get("prevalence")
    if prevalence:
        sections.append(section("prevalence", "Label prevalence", prevalence_tables(prevalence)))
    scores = scores_of(images, metrics["findings"])
    if scores is not None:
        sections.append(section("roc", "ROC curves, per finding", roc_panels(*scores, metrics["findings"])))
    return sections


def multilabel_section(
    metrics: dict, prevalence: dict[str, dict] | None = None, images: list[dict] | None = None
) -> str:
    """``multilabel_sections`` as one HTML string, for a page other than the run's report."""
    return "".join(multilabel_sections(metrics, images, prevalence))


def figures_against_chance(metrics: dict) -> str:
    """Macro and micro AUROC against chance, then each finding's AUROC: one line."""
    parts = [_auroc_words(metrics, k, metrics.get(f"{k}_vs_chance")) for k in ("macro_auroc", "micro_auroc")]
    per = [
        f"{name} {_value(m['auroc'], _ci(metrics, f'auroc/{name}'), 2)}"
        for name, m in metrics["per_finding"].items()
        if m["auroc"] is not None
    ]
    return "; ".join(parts + ([f"AUROC per finding {', '.join(per)}"] if per else []))


def summary_rows(metrics: dict) -> list[list]:
    """The report's top rows for a multi-label model, in place of accuracy and F1."""
    return [
        ["findings", ", ".join(metrics["findings"])],
        ["macro AUROC", _value(metrics["macro_auroc"], _ci(metrics, "macro_auroc"), 4)],
        ["micro AUROC", _value(metrics["micro_auroc"], _ci(metrics, "micro_auroc"), 4)],
    ]


def headline_row(metrics: dict, label: str) -> dict:
    """``card.headline``'s row for a multi-label model: its figures against chance, no balanced
    accuracy, and the finding with the lowest sensitivity at its threshold as the lowest recall."""
    sensitivity = {f: m["sensitivity"] for f, m in metrics["per_finding"].items() if m["sensitivity"] is not None}
    lowest = min(sensitivity, key=sensitivity.get, default=None)
    return {
        "label": label,
        "figures": figures_against_chance(metrics),
        "balanced_accuracy": None,
        "lowest_recall": None if lowest is None else {"class": lowest, "recall": sensitivity[lowest]},
    }


def card_lines(metrics: dict) -> list[str]:
    """The model card's evaluation section for a multi-label model."""
    lines = [
        "## Evaluation",
        "",
        f"On the {metrics['n']} held-out test images, read once, after tuning and training; each finding on "
        "the images whose label for it is known:",
        "",
        f"- {_auroc_words(metrics, 'macro_auroc', metrics.get('macro_auroc_vs_chance'))}; "
        f"{_auroc_words(metrics, 'micro_auroc', metrics.get('micro_auroc_vs_chance'))}.",
    ]
    for name, m in metrics["per_finding"].items():
        ap_base = m["average_precision_baseline"]
        lines.append(
            f"- {name} ({m['n_pos']} of {m['n_known']} positive): AUROC "
            f"{_value(m['auroc'], _ci(metrics, f'auroc/{name}'))}"
            + (f", {m['auroc_vs_chance']}" if m.get("auroc_vs_chance") else "")
            + f"; average precision {_value(m['average_precision'], _ci(metrics, f'average_precision/{name}'))}"
            + ("" if ap_base is None else f" against {ap_base:.3f} for chance")
            + ("; at each fold's threshold" if m["threshold"] is None else f"; at threshold {m['threshold']:.3f}")
            + ", sensitivity "
            f"{_value(m['sensitivity'], _ci(metrics, f'sensitivity/{name}'))}, specificity "
            f"{_value(m['specificity'], _ci(metrics, f'specificity/{name}'))}."
        )
    return lines + ["", _intervals_said(metrics) + " " + _thresholds_said(metrics), ""]
