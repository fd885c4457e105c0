"""Multi-label folds: how evenly each finding spreads over 5 folds that keep patients whole.

A synthetic set of 20,000 films and 14 findings at ChestX-ray14-like prevalences, 1-10 films per
patient (most have few), drawn through a seeded latent model: each finding is positive where a
latent normal variable passes its prevalence's threshold; the latent variables share five factors
(heart and fluid, airspace, lesion, chronic change, overall illness), so effusion comes with
cardiomegaly, edema and atelectasis, pneumonia with consolidation and infiltration, mass with
nodule; and a patient's films share most of their latent draw, so they share findings often.

Three ways to make the folds, timed:
  grouped-stratified  ``splits.multilabel_folds`` (iterative stratification over patients)
  grouped-only        scikit-learn's ``GroupKFold`` (patients whole, fold sizes balanced)
  ungrouped           ``splits.multilabel_folds`` with every film its own group (for reference)

For each finding: the spread of its prevalence across the folds (max - min, and std, in
percentage points), averaged over the seeds; and the patients whose films straddle folds.

    .venv/bin/python bench/stratify_bench.py [--seeds 0 1 2] [--films 20000] [--folds 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import ndtri
from sklearn.model_selection import GroupKFold

from lungxray.splits import multilabel_folds

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, update_section  # noqa: E402

PREVALENCE = {  # share of films with the finding, about ChestX-ray14's
    "infiltration": 0.18,
    "effusion": 0.12,
    "atelectasis": 0.10,
    "nodule": 0.06,
    "mass": 0.05,
    "pneumothorax": 0.05,
    "consolidation": 0.04,
    "pleural_thickening": 0.03,
    "cardiomegaly": 0.025,
    "emphysema": 0.02,
    "edema": 0.02,
    "fibrosis": 0.015,
    "pneumonia": 0.012,
    "hernia": 0.002,
}
LOADINGS = {  # finding -> its loading on (heart and fluid, airspace, lesion, chronic, illness)
    "infiltration": (0.2, 0.5, 0.0, 0.0, 0.3),
    "effusion": (0.6, 0.1, 0.0, 0.0, 0.3),
    "atelectasis": (0.4, 0.3, 0.0, 0.0, 0.3),
    "nodule": (0.0, 0.0, 0.6, 0.0, 0.2),
    "mass": (0.0, 0.0, 0.6, 0.0, 0.3),
    "pneumothorax": (0.0, 0.0, 0.0, 0.4, 0.2),
    "consolidation": (0.2, 0.6, 0.0, 0.0, 0.3),
    "pleural_thickening": (0.0, 0.0, 0.3, 0.5, 0.2),
    "cardiomegaly": (0.6, 0.0, 0.0, 0.0, 0.2),
    "emphysema": (0.0, 0.0, 0.0, 0.6, 0.2),
    "edema": (0.6, 0.3, 0.0, 0.0, 0.3),
    "fibrosis": (0.0, 0.0, 0.2, 0.6, 0.2),
    "pneumonia": (0.2, 0.6, 0.0, 0.0, 0.3),
    "hernia": (0.0, 0.0, 0.0, 0.0, 0.1),
}
FINDINGS = list(PREVALENCE)
SHARED = 0.7  # share of a film's latent variance that is its patient's


def make_films(n_films: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(targets (N, 14) of 0/1, patient of each film (N,)), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    per_patient = np.arange(1, 11)
    weights = 0.72 ** (per_patient - 1)  # most patients have one to three films, a few have ten
    sizes = rng.choice(per_patient, size=n_films, p=weights / weights.sum())
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), n_films) + 1]
    sizes[-1] -= sizes.sum() - n_films  # the last patient's films make the total exact
    patient = np.repeat(np.arange(len(sizes)), sizes)  # (N,)
    loadings = np.array([LOADINGS[f] for f in FINDINGS])  # (F, 5)
    unique = np.sqrt(1 - (loadings**2).sum(axis=1))  # (F,) so each latent variable has variance 1
    factors = rng.standard_normal((len(sizes), loadings.shape[1]))  # (P, 5)
    latent = factors @ loadings.T + unique * rng.standard_normal((len(sizes), len(FINDINGS)))  # (P, F)
    films = np.sqrt(SHARED) * latent[patient] + np.sqrt(1 - SHARED) * rng.standard_normal((n_films, len(FINDINGS)))
    threshold = ndtri(1 - np.array([PREVALENCE[f] for f in FINDINGS]))  # (F,)
    return (films > threshold).astype(np.float32), patient


def fold_figures(targets: np.ndarray, patient: np.ndarray, folds: list[np.ndarray]) -> dict:
    """Per finding the prevalence spread (max - min) and std across folds, in percentage points;
    the patients whose films are in more than one fold."""
    prevalence = 100 * np.array([targets[fold].mean(axis=0) for fold in folds])  # (k, F)
    fold_of = np.empty(len(patient), dtype=np.int64)
    for i, fold in enumerate(folds):
        fold_of[fold] = i
    pairs = np.unique(np.stack([patient, fold_of]), axis=1)  # (2, distinct patient-fold pairs)
    return {
        "spread": prevalence.max(axis=0) - prevalence.min(axis=0),
        "std": prevalence.std(axis=0),
        "films_apart": int(np.ptp(np.array([targets[fold].sum(axis=0) for fold in folds]), axis=0).max()),
        "straddling": int((np.bincount(pairs[0]) > 1).sum()),
        "sizes": [len(fold) for fold in folds],
    }


METHODS = {
    "grouped-stratified": lambda y, g, k, seed: multilabel_folds(y, g, k, seed),
    "grouped-only (GroupKFold)": lambda y, g, k, seed: [t for _, t in GroupKFold(k).split(y, groups=g)],
    "ungrouped stratified": lambda y, g, k, seed: multilabel_folds(y, np.full(len(g), -1), k, seed),
}


def run(n_films: int, k: int, seeds: list[int]) -> tuple[dict, dict]:
    """Every method's figures on every seed's set: ({method: [figures per seed]}, set summary)."""
    results: dict[str, list[dict]] = {name: [] for name in METHODS}
    summary = {"patients": [], "prevalence": [], "multi": []}
    for seed in seeds:
        targets, patient = make_films(n_films, seed)
        summary["patients"].append(len(np.unique(patient)))
        summary["prevalence"].append(100 * targets.mean(axis=0))
        summary["multi"].append(100 * float((targets.sum(axis=1) > 1).mean()))
        for name, method in METHODS.items():
            start = time.perf_counter()
            folds = method(targets, patient, k, seed)
            seconds = time.perf_counter() - start
            results[name].append(fold_figures(targets, patient, folds) | {"seconds": seconds})
    return results, summary


def table(results: dict, summary: dict) -> str:
    names = list(results)
    head = "| finding | prevalence % | " + " | ".join(f"{n}: spread (std)" for n in names) + " |"
    rows = [head, "|---|---|" + "---|" * len(names)]
    prevalence = np.mean(summary["prevalence"], axis=0)
    mean = {
        n: (np.mean([r["spread"] for r in results[n]], axis=0), np.mean([r["std"] for r in results[n]], axis=0))
        for n in names
    }
    for f, finding in enumerate(FINDINGS):
        cells = " | ".join(f"{mean[n][0][f]:.2f} ({mean[n][1][f]:.2f})" for n in names)
        rows.append(f"| {finding} | {prevalence[f]:.2f} | {cells} |")
    cells = " | ".join(f"**{mean[n][0].mean():.2f} ({mean[n][1].mean():.2f})**" for n in names)
    rows.append(f"| mean over findings | | {cells} |")
    relative = " | ".join(f"{np.mean(mean[n][0] / prevalence):.2f}" for n in names)
    rows.append(f"| mean spread / prevalence | | {relative} |")
    apart = " | ".join(str(max(r["films_apart"] for r in results[n])) for n in names)
    rows.append(f"| most positive films apart, any finding and seed | | {apart} |")
    straddle = " | ".join(", ".join(str(r["straddling"]) for r in results[n]) for n in names)
    rows.append(f"| patients straddling folds (per seed) | | {straddle} |")
    sizes = " | ".join(
        f"{min(min(r['sizes']) for r in results[n])}-{max(max(r['sizes']) for r in results[n])}" for n in names
    )
    rows.append(f"| films per fold (min-max) | | {sizes} |")
    seconds = " | ".join(", ".join(f"{r['seconds']:.2f}" for r in results[n]) for n in names)
    rows.append(f"| seconds (per seed) | | {seconds} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--films", type=int, default=20_000)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    results, summary = run(args.films, args.folds, args.seeds)
    seeds = " ".join(map(str, args.seeds))
    body = f"""## Multi-label folds: each finding's prevalence across {args.folds} patient-grouped folds

Command: `.venv/bin/python bench/stratify_bench.py --seeds {seeds} --films {args.films} --folds {args.folds}`
on {machine()}.

A synthetic set of {args.films:,} films with 14 findings at ChestX-ray14-like prevalences, drawn
through a seeded latent model (five shared factors: effusion comes with cardiomegaly, edema and
atelectasis, pneumonia with consolidation and infiltration, mass with nodule; {np.mean(summary["multi"]):.1f}% of
films have two findings or more), 1-10 films per patient ({np.mean(summary["patients"]):,.0f} patients on
average), a patient's films sharing {SHARED:.0%} of their latent draw. One set per seed; each method
splits it into {args.folds} folds. Per finding: the spread of its prevalence across the folds, max - min
(and the std), in percentage points, averaged over the seeds {seeds}. Grouped-stratified is
`splits.multilabel_folds` (iterative stratification over patients, Sechidis et al. 2011);
grouped-only is scikit-learn's `GroupKFold` (patients whole, fold sizes balanced, findings
ignored); ungrouped stratified is `multilabel_folds` with every film its own group, for reference:
it stratifies best but puts a patient's films on both sides of a fold.

{table(results, summary)}

"Most positive films apart": the largest difference, over findings and seeds, between two folds'
counts of a finding's positive films. In a fold of {args.films // args.folds:,} films one film is
{100 * args.folds / args.films:.3f} percentage points of prevalence.
"""
    update_section("multilabel folds", body)
    print(body)


if __name__ == "__main__":
    main()
