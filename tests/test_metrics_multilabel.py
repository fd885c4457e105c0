"""Metrics of a multi-label model: thresholds chosen on validation, per-finding and pooled figures
that leave unknown labels out, their intervals, prevalence per part, and the report and model card
built from them."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from lungxray import metrics_multilabel
from lungxray.card import headline, model_card
from lungxray.metrics import proportion_ci
from lungxray.metrics_multilabel import (
    choose_thresholds,
    compute_multilabel_metrics,
    prevalence_table,
    rank_entries,
    ranked_figures,
)
from lungxray.report import write_report
from lungxray.report_multilabel import multilabel_section

FINDINGS = ["cardiomegaly", "effusion", "nodule"]


def _scored(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Targets (n, 3) with about 15% unknown (NaN) and probabilities that follow them loosely."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < [0.3, 0.2, 0.4]).astype(float)
    probs = 0.3 * y + 0.7 * rng.random((n, 3))
    y[rng.random((n, 3)) < 0.15] = np.nan
    return y, probs


def test_the_youden_threshold_is_chosen_on_the_known_entries_and_a_one_sided_finding_falls_back():
    # finding 0: at 0.5 sensitivity 3/3, specificity 3/4 (J 0.75); at 0.7 J is 2/3. The unknown
    # entry scored 0.55 would make 0.5 worse (specificity 3/5) if it were read as negative.
    y = np.array([[0, 0], [0, 0], [0, 0], [0, 0], [1, 0], [1, 0], [1, 0], [np.nan, 0]])
    p = np.array([[0.1, 0.2], [0.2, 0.3], [0.3, 0.9], [0.6, 0.1], [0.5, 0.4], [0.7, 0.5], [0.9, 0.6], [0.55, 0.2]])
    chosen = choose_thresholds(y, p, ["a", "b"], prevalence={"b": 0.07})
    assert chosen["a"] == {"threshold": 0.5, "rule": "youden", "n_pos": 3, "n_neg": 4}
    assert chosen["b"]["threshold"] == 0.07 and chosen["b"]["rule"] == "training prevalence"
    assert (chosen["b"]["n_pos"], chosen["b"]["n_neg"]) == (0, 8) and "no positive" in chosen["b"]["reason"]
    fixed = choose_thresholds(y, p, ["a", "b"])["b"]
    assert (fixed["threshold"], fixed["rule"]) == (0.5, "fixed 0.5")


def test_auroc_average_precision_and_micro_auroc_equal_sklearns_on_the_known_entries():
    y, probs = _scored()
    m = compute_multilabel_metrics(y, probs, FINDINGS, dict.fromkeys(FINDINGS, 0.5), resamples=0)
    assert m["task"] == "multilabel" and m["findings"] == FINDINGS and m["n"] == 120
    for f, name in enumerate(FINDINGS):
        known = ~np.isnan(y[:, f])
        got = m["per_finding"][name]
        assert got["n_known"] == known.sum() and got["n_pos"] == (y[known, f] == 1).sum()
        assert got["prevalence"] == pytest.approx(y[known, f].mean())
        assert got["auroc"] == pytest.approx(roc_auc_score(y[known, f], probs[known, f]), abs=1e-12)
        assert got["average_precision"] == pytest.approx(average_precision_score(y[known, f], probs[known, f]))
        assert got["average_precision_baseline"] == got["prevalence"] == m["baseline"]["average_precision"][name]
    known = ~np.isnan(y)
    assert m["micro_auroc"] == pytest.approx(roc_auc_score(y[known], probs[known]), abs=1e-12)
    assert m["macro_auroc"] == pytest.approx(np.mean([m["per_finding"][f]["auroc"] for f in FINDINGS]))
    assert m["baseline"]["auroc"] == 0.5


def test_sensitivity_and_specificity_are_read_at_the_threshold_with_exact_intervals():
    y = np.array([[1.0], [1.0], [1.0], [1.0], [0.0], [0.0], [0.0], [np.nan]])
    p = np.array([[0.9], [0.6], [0.34], [0.3], [0.35], [0.2], [0.1], [0.99]])
    m = compute_multilabel_metrics(y, p, ["a"], {"a": {"threshold": 0.35, "rule": "youden"}}, resamples=50)
    a = m["per_finding"]["a"]
    # positive when p >= 0.35: 2 of 4 positives (0.9, 0.6); 2 of 3 negatives below (0.2, 0.1), 0.35 not
    assert (a["sensitivity"], a["specificity"], a["threshold"], a["threshold_rule"]) == (0.5, 2 / 3, 0.35, "youden")
    assert m["ci95"]["sensitivity/a"] == proportion_ci(2, 4) and m["ci95"]["specificity/a"] == proportion_ci(2, 3)


def test_an_unknown_entry_changes_nothing_whatever_its_probability():
    y, probs = _scored()
    moved = probs.copy()
    moved[np.isnan(y)] = 1 - moved[np.isnan(y)]  # every unknown entry's probability changed
    first = compute_multilabel_metrics(y, probs, FINDINGS, dict.fromkeys(FINDINGS, 0.5), resamples=200)
    assert compute_multilabel_metrics(y, moved, FINDINGS, dict.fromkeys(FINDINGS, 0.5), resamples=200) == first
    read_as_negative = compute_multilabel_metrics(np.nan_to_num(y), probs, FINDINGS, dict.fromkeys(FINDINGS, 0.5),
                                                  resamples=0)  # fmt: skip
    assert read_as_negative["micro_auroc"] != first["micro_auroc"]


def test_a_finding_without_positives_has_no_auroc_and_the_macro_skips_it():
    y, probs = _scored()
    y[:, 2] = np.where(np.isnan(y[:, 2]), np.nan, 0.0)
    m = compute_multilabel_metrics(y, probs, FINDINGS, dict.fromkeys(FINDINGS, 0.5), resamples=100)
    nodule = m["per_finding"]["nodule"]
    assert nodule["auroc"] is None and nodule["average_precision"] is None and nodule["sensitivity"] is None
    assert nodule["prevalence"] == 0.0 and nodule["auroc_vs_chance"] is None
    assert m["ci95"]["auroc/nodule"] is None and m["ci95"]["sensitivity/nodule"] is None
    assert m["macro_auroc"] == pytest.approx(np.mean([m["per_finding"][f]["auroc"] for f in FINDINGS[:2]]))


def test_intervals_hold_their_point_estimate_and_the_same_seed_gives_the_same_ones():
    y, probs = _scored(200)
    thresholds = dict.fromkeys(FINDINGS, 0.5)
    m = compute_multilabel_metrics(y, probs, FINDINGS, thresholds, seed=3, resamples=400)
    figures = {"macro_auroc": m["macro_auroc"], "micro_auroc": m["micro_auroc"]}
    for name, f in m["per_finding"].items():
        figures |= {f"{k}/{name}": f[k] for k in ("auroc", "average_precision", "sensitivity", "specificity")}
    for key, value in figures.items():
        low, high = m["ci95"][key]
        assert low <= value <= high and low < high, key
    assert m["bootstrap"] == {"method": "percentile", "resamples": 400, "seed": 3, "unit": "image"}
    assert "sensitivity/<finding>, specificity/<finding>" in m["intervals"]
    assert m["per_finding"]["effusion"]["auroc_vs_chance"] == "better than chance"
    again = compute_multilabel_metrics(y, probs, FINDINGS, thresholds, seed=3, resamples=400)
    other = compute_multilabel_metrics(y, probs, FINDINGS, thresholds, seed=4, resamples=400)
    assert again["ci95"] == m["ci95"] and other["ci95"]["micro_auroc"] != m["ci95"]["micro_auroc"]


@pytest.mark.parametrize("ties", [False, True])
def test_each_resamples_figures_equal_sklearns_with_the_draws_as_weights(ties):
    rng = np.random.default_rng(1)
    truth = (rng.random(300) < 0.2).astype(float)
    scores = rng.random(300) + 0.3 * truth
    scores = np.round(scores, 1) if ties else scores  # ties within and across the classes
    ranked = rank_entries(np.arange(300), truth, scores)
    draws = rng.multinomial(300, np.full(300, 1 / 300), size=4)  # (B, N)
    pos_groups = np.zeros((4, ranked.n_groups), dtype=np.int32)
    neg_bins = np.zeros((4, 2 * ranked.n_groups + 1), dtype=np.int32)
    np.add.at(pos_groups.T, ranked.pos_group, draws[:, ranked.pos_rows].T)
    np.add.at(neg_bins.T, ranked.neg_bin, draws[:, ranked.neg_rows].T)
    auroc, ap = ranked_figures(pos_groups, neg_bins)
    for b in range(4):
        assert auroc[b] == pytest.approx(roc_auc_score(truth, scores, sample_weight=draws[b]), abs=1e-12)
        assert ap[b] == pytest.approx(average_precision_score(truth, scores, sample_weight=draws[b]), abs=1e-12)


def test_many_entries_get_fewer_resamples_and_metrics_json_says_so(monkeypatch):
    y, probs = _scored()
    entries = int((~np.isnan(y)).sum())
    monkeypatch.setattr(metrics_multilabel, "BOOTSTRAP_BUDGET", 600 * entries)
    monkeypatch.setattr(metrics_multilabel, "MIN_RESAMPLES", 100)
    m = compute_multilabel_metrics(y, probs, FINDINGS, dict.fromkeys(FINDINGS, 0.5), resamples=2000)
    assert m["bootstrap"]["resamples"] == 600 and m["bootstrap"]["requested"] == 2000
    assert f"{entries} known entries" in m["bootstrap"]["reduced"]


def test_the_prevalence_table_counts_positives_among_known_entries_per_part():
    targets = np.array([[1, 0], [0, np.nan], [1, 1], [np.nan, np.nan], [0, 1]], dtype=float)
    table = prevalence_table(targets, ["a", "b"], {"train": np.array([0, 1, 2]), "site X": np.array([3, 4])})
    assert table["train"]["a"] == {"positives": 2, "known": 3, "prevalence": 2 / 3}
    assert table["train"]["b"] == {"positives": 1, "known": 2, "prevalence": 0.5}
    assert table["site X"]["a"] == {"positives": 0, "known": 1, "prevalence": 0.0}
    assert table["site X"]["b"] == {"positives": 1, "known": 1, "prevalence": 1.0}
    masked = prevalence_table(targets, ["a", "b"], {"none known": np.array([False, False, False, True, False])})
    assert masked["none known"]["a"] == {"positives": 0, "known": 0, "prevalence": None}


def _run_folder(tmp_path, y, probs):
    """A run folder of a multi-label model: splits.json, metrics.json (with prevalence tables) and a
    predictions.json whose images carry their targets."""
    metrics = compute_multilabel_metrics(y, probs, FINDINGS, dict.fromkeys(FINDINGS, 0.5), resamples=100)
    parts = {"train": np.arange(0, 60), "val": np.arange(60, 90), "test": np.arange(90, 120)}
    metrics["prevalence"] = {
        "per split": prevalence_table(y, FINDINGS, parts),
        "per site": prevalence_table(y, FINDINGS, {"A": np.arange(120) % 2 == 0, "B": np.arange(120) % 2 == 1}),
    }
    images = [
        {"path": f"/data/{i}.png", "probabilities": dict(zip(FINDINGS, map(float, probs[i]), strict=True)),
         "targets": {f: None if np.isnan(v) else float(v) for f, v in zip(FINDINGS, y[i], strict=True)}}
        for i in range(len(y))
    ]  # fmt: skip
    (tmp_path / "splits.json").write_text(json.dumps({"seed": 0, "sizes": {"train": 60, "val": 30, "test": 30}}))
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    predictions = {"classes": FINDINGS, "temperature": 1.0, "images": images}
    (tmp_path / "predictions.json").write_text(json.dumps(predictions))
    return metrics


def test_the_report_of_a_multilabel_run_shows_each_finding_against_its_baselines(tmp_path):
    y, probs = _scored()
    metrics = _run_folder(tmp_path, y, probs)
    with pytest.warns(UserWarning, match="no model bundle"):  # a folder without model/: no gallery to draw
        page = write_report(tmp_path).read_text()
    assert [s.split('"')[0] for s in page.split('<section id="')[1:]] == ["summary", "metrics", "prevalence", "roc"]
    m, ci = metrics["per_finding"]["effusion"], metrics["ci95"]
    auroc = f"{m['auroc']:.3f} ({ci['auroc/effusion'][0]:.3f}-{ci['auroc/effusion'][1]:.3f})"
    assert f"<td>effusion</td><td>{m['n_pos']} of {m['n_known']} ({m['prevalence']:.1%})</td><td>{auroc}</td>" in page
    assert f"<td>{m['average_precision_baseline']:.3f}</td>" in page  # average precision beside its chance level
    low, high = ci["sensitivity/effusion"]
    assert f"{m['sensitivity']:.3f} ({low:.3f}-{high:.3f})" in page
    assert f"<td>micro AUROC</td><td>{metrics['micro_auroc']:.4f}" in page  # in the summary
    assert "<h3>per split</h3>" in page and "<h3>per site</h3>" in page
    train = metrics["prevalence"]["per split"]["train"]["nodule"]
    assert f"<td>{train['positives']} of {train['known']} ({train['prevalence']:.1%})</td>" in page
    assert page.count("<img ") == 1 and "ROC curve of each finding" in page
    png = base64.b64decode(page.split('src="data:image/png;base64,')[1].split('"')[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "accuracy" not in page.split('<section id="metrics"')[0]  # no single-label headline
    body = multilabel_section(metrics)  # the same sections for a page built elsewhere; no images: no ROC
    assert 'id="prevalence"' in body and 'id="roc"' not in body


def test_the_model_card_and_headline_of_a_multilabel_model_read_each_finding():
    y, probs = _scored()
    metrics = compute_multilabel_metrics(y, probs, FINDINGS, dict.fromkeys(FINDINGS, 0.5), resamples=100)
    config = {
        "model": {"name": "cnn", "hyperparameters": {}},
        "preprocessing": {"img_size": 16, "equalize": "none"},
        "classes": FINDINGS,
        "task": "multilabel",
    }
    scan = {"root": "/data/cxr", "layout": "csv", "n_images": 120, "counts": {}, "skipped": [], "duplicate_groups": []}
    card = model_card(config, scan, metrics)
    macro_ci = metrics["ci95"]["macro_auroc"]
    assert f"macro AUROC {metrics['macro_auroc']:.2f} ({macro_ci[0]:.2f}-{macro_ci[1]:.2f})" in card
    m = metrics["per_finding"]["nodule"]
    assert f"- nodule ({m['n_pos']} of {m['n_known']} positive): AUROC {m['auroc']:.3f}" in card
    assert f"against {m['prevalence']:.3f} for chance" in card and "Youden" not in card  # thresholds given, not chosen
    (row,) = headline(metrics, {})
    lowest = min(FINDINGS, key=lambda f: metrics["per_finding"][f]["sensitivity"])
    assert row["lowest_recall"] == {"class": lowest, "recall": metrics["per_finding"][lowest]["sensitivity"]}
    assert row["label"] == "test split (120 images)" and row["figures"].startswith("macro AUROC")


def test_micro_auroc_is_read_against_the_prevalences_alone_not_against_half():
    """Pooled over findings of different prevalences, a model that answers each finding's prevalence
    and nothing else reaches a micro AUROC far above 0.5: that is its baseline, and it is no better."""
    rng = np.random.default_rng(0)
    prevalence = np.array([0.5, 0.05, 0.2])
    y = (rng.random((2000, 3)) < prevalence).astype(float)
    knows_nothing = np.broadcast_to(y.mean(axis=0), y.shape).copy()
    m = compute_multilabel_metrics(y, knows_nothing, ["a", "b", "c"], {"a": 0.5, "b": 0.5, "c": 0.5}, resamples=200)
    assert m["micro_auroc"] > 0.7 and m["macro_auroc"] == pytest.approx(0.5)
    assert m["baseline"]["micro_auroc"] == pytest.approx(m["micro_auroc"])
    assert m["micro_auroc_vs_chance"].startswith("no better than the findings' prevalences alone")
    learned = np.clip(knows_nothing + 0.3 * (y - knows_nothing), 0, 1)  # some signal on every finding
    better = compute_multilabel_metrics(y, learned, ["a", "b", "c"], {"a": 0.5, "b": 0.5, "c": 0.5}, resamples=200)
    assert better["micro_auroc_vs_chance"].startswith("better than the findings' prevalences alone")


def test_a_finding_training_saw_one_side_of_falls_back_to_half_not_to_its_prevalence():
    y_val = np.array([[0.0], [0.0], [0.0]])  # no positive among the known validation entries
    p_val = np.array([[0.1], [0.2], [0.3]])
    never = choose_thresholds(y_val, p_val, ["x"], prevalence={"x": 0.0})  # nor in training
    assert never["x"]["threshold"] == 0.5 and never["x"]["rule"] == "fixed 0.5"
    seen = choose_thresholds(y_val, p_val, ["x"], prevalence={"x": 0.1})
    assert seen["x"]["threshold"] == 0.1 and seen["x"]["rule"] == "training prevalence"
