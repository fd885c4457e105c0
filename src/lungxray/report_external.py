"""How the model does away from its own test: ``gap_in_words`` (the gap to data from elsewhere in a
few sentences, shared by the report and the model card), and the report's sections on external
data and on the out-of-distribution flag.

Lays out figures that ``evaluate`` computed and the run folder holds; computes no metric.
"""

from __future__ import annotations

import functools
import html

import numpy as np

from lungxray.plots import coverage_figure
from lungxray.report_blocks import figure, interval, table


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


def _interval(metrics: dict, key: str) -> str | None:
    ci = (metrics.get("ci95") or {}).get(key)
    return f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else None


def against_chance(metrics: dict) -> list[str]:
    """The figures that say whether a model does anything on a dataset, each beside what a model
    that knows nothing scores there: balanced accuracy, macro-F1 and accuracy against always
    answering the majority class; each class's recall with its interval; each defined one-vs-rest
    AUROC against 0.5, called no better than chance when its interval includes 0.5."""
    base = metrics["baseline"]
    parts = []
    for key, label in (("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1"), ("accuracy", "accuracy")):
        ci = _interval(metrics, key)
        beside = f"always answering {base['majority_class']}: {base[key]:.2f}"
        parts.append(f"{label} {metrics[key]:.2f} ({f'{ci}; ' if ci else ''}{beside})")
    present = {c: m for c, m in metrics["per_class"].items() if m["support"]}
    recalls = []
    for c, m in present.items():
        ci = _interval(metrics, f"recall/{c}")
        recalls.append(f"{c} {m['recall']:.2f}" + (f" ({ci})" if ci else ""))
    parts.append("recall " + ", ".join(recalls))
    aurocs = []
    for c, m in present.items():
        if m["auroc"] is not None:
            ci = _interval(metrics, f"auroc/{c}")
            verdict = m.get("auroc_vs_chance")
            aurocs.append(f"{c} {m['auroc']:.2f}" + (f" ({ci})" if ci else "") + (f": {verdict}" if verdict else ""))
    if aurocs:
        parts.append("one-vs-rest AUROC (chance: 0.50) " + ", ".join(aurocs))
    return parts


def site_rows(metrics: dict) -> list[tuple[str, str]]:
    """(label, figures against chance) for a test that is one held-out site, and for the worst of
    the sites the test images come from: the figures that say where the model fails."""
    rows = []
    site = (metrics.get("split") or {}).get("site")
    if site is not None:
        rows.append((f"held-out site {site} ({metrics['n']} images, none of its films in training)",
                     "; ".join(against_chance(metrics))))  # fmt: skip
    worst = metrics.get("worst_site")
    if worst is not None:
        figures = metrics["per_site"][worst]
        rows.append((f"worst site: {worst} ({figures['n']} images, of {len(metrics['per_site'])} sites)",
                     "; ".join(against_chance(figures))))  # fmt: skip
    return rows


OOD_TEXT = (
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


def ood_section(metrics: dict, external: dict[str, dict], label: str = "internal test") -> str:
    """The out-of-distribution flag on the test images (and each external set): how many it
    flagged, the metrics on the ones it accepts, coverage against accuracy, and what it cannot do."""
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
    plot = figure(coverage_figure(sets), "accuracy on the accepted images against the share accepted, per dataset")
    rows_table = table(["images", "flagged", "share flagged", "accuracy on accepted", "errors flagged"], rows)
    return OOD_TEXT + rows_table + plot


def _recall_rows(metrics: dict, ext: dict) -> list[list]:
    """Per class with images in ``ext``: internal and external recall with intervals, AUROC, flagged share."""
    ext_interval = functools.partial(interval, ext.get("ci95") or {})
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
            f"{m['recall']:.2f}{ext_interval(f'recall/{c}')}",
            _auroc_cell(m, ext_interval(f"auroc/{c}")),
            f"{ext['ood']['share_flagged_per_class'].get(c, 0):.0%}" if ext.get("ood") else "n/a",
        ])  # fmt: skip
    return rows


def _auroc_cell(m: dict, ci: str) -> str:
    if m["auroc"] is None:
        return "n/a (one class only)"
    return f"{m['auroc']:.2f}{ci}" + (f", {m['auroc_vs_chance']}" if m.get("auroc_vs_chance") else "")


def external_section(metrics: dict, external: dict[str, dict]) -> str:
    """Each external dataset next to the internal test: per-class recall with CIs, AUROC where
    defined, the flagged share, and in words which class the model mistakes for which."""
    parts = [
        "<p>The final model on data from elsewhere, never used for training, tuning or calibration. "
        "Figures for a class with few images have wide intervals.</p>"
    ]
    for name, ext in external.items():
        header = ["class", "images", "recall, internal test", f"recall, {name}", "AUROC (one vs rest)",
                  "flagged out of distribution"]  # fmt: skip
        parts.append(
            f"<h3>{html.escape(name)}</h3><p>{html.escape(ext.get('data', ''))}: {ext['n']} images; "
            + html.escape("; ".join(against_chance(ext)))
            + f" (internal test: accuracy {metrics['accuracy']:.2f}, macro-F1 {metrics['macro_f1']:.2f}).</p>"
            + table(header, _recall_rows(metrics, ext))
            + f"<p>{html.escape(gap_in_words(metrics, ext, name))}</p>"
        )
    return "".join(parts)
