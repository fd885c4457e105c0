"""Leave-one-site-out on the shared data's five sites (``bench/five_sites.py``): how a model does on
a hospital it never saw, trained the way a user can train it today.

Rows (each model, each seed; the model's registered hyperparameters, no search):
- "shared folders alone": trained on covid19-image-dataset (sites montreal and pediatric), scored
  on each external-dev site (hannover, actualmed, ieee8023), none of which it saw. It cannot hold
  out montreal or pediatric: without one of them a class is missing from training.
- "sites merged": ``lungxray cv --by site`` on all five, through the Python API: each site held out
  in turn, the model trained on the other four.
- "+ site-balanced sampling" (``--site-balanced``), "+ per-site normalisation" (and
  ``--site-normalise``), "+ held-out threshold" (and ``--val-by site``): the same, each row adding
  one training-across-sites option to the row above it.

Beside them, "internal macro-F1": ``lungxray cv`` with 5 grouped folds over the same five sites
(every site seen in training), the row's options on: what the option costs where the model has
seen the hospital. The held-out threshold needs a site held out, so that row has none.

For each held-out site: per-class recall with its exact 95% interval, and the covid-vs-normal
AUROC (the covid probability ranking the site's covid against its normal films) where the site has
both. Pooled over every held-out prediction of a row: covid-vs-normal AUROC, balanced accuracy
and normal recall. Seeds give the spread (mean +- std). Prints a Markdown table for BENCHMARKS.md:

    .venv/bin/python bench/loso_bench.py --models mlp cnn --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).parent))
import five_sites  # noqa: E402

from lungxray.data import load_dataset  # noqa: E402
from lungxray.infer import predict_logits  # noqa: E402
from lungxray.job import Job  # noqa: E402
from lungxray.metrics import proportion_ci  # noqa: E402
from lungxray.models import get_spec  # noqa: E402
from lungxray.pipeline import tensors  # noqa: E402
from lungxray.splits import Split, check_no_leakage, hold_out  # noqa: E402
from lungxray.train import FitData, fit  # noqa: E402

SHARED_SITES = ("montreal", "pediatric")


def shared_alone(ds, seed: int) -> Split:
    """Train and validate on the shared dataset's sites, test on every other site."""
    sites = np.array([s.site for s in ds.samples])
    shared = np.flatnonzero(np.isin(sites, SHARED_SITES))
    test = np.flatnonzero(~np.isin(sites, SHARED_SITES))
    shared = shared[~np.isin(ds.groups[shared], ds.groups[test])]
    train, val = hold_out(shared, ds.labels, ds.groups, 0.125, seed + 1)
    split = Split(train, val, test, "shared alone", seed)
    check_no_leakage(split, ds.groups)
    return split


def held_out_probs(job: Job, ds, parts: list[Split]) -> np.ndarray:
    """Every held-out image's probabilities, each part's model trained as ``cv`` trains a fold
    (the threads set as ``cv`` sets them)."""
    from lungxray.infer import set_threads

    set_threads(job.final.threads)
    params = dict(get_spec(job.model).defaults)
    probs = np.full((len(ds.samples), len(ds.classes)), np.nan)
    for part in parts:
        data = FitData(tensors(ds, part.train), tensors(ds, part.val), len(ds.classes))
        result = fit(job.model, params, data, job.final.for_params(params))
        logits = predict_logits(result.model, tensors(ds, part.test)[0]).double()
        probs[part.test] = torch.softmax(logits, dim=1).numpy()
    return probs


ROWS = {  # row -> the cv options it adds to plain leave-one-site-out
    "sites merged": {},
    "+ site-balanced sampling": {"site_balanced": True},
    "+ per-site normalisation": {"site_balanced": True, "site_normalise": True},
    "+ held-out threshold": {"site_balanced": True, "site_normalise": True, "val_by": "site"},
}


def cv_run(job: Job, ds, folder: Path, by: str, options: dict) -> tuple[np.ndarray, dict]:
    """``lungxray cv`` itself (the Python API) with ``options``: every image's held-out
    probabilities in the order of ``ds.samples``, and the pooled out-of-fold metrics."""
    import lungxray

    name = "-".join(f"{k}={v}" for k, v in options.items()) or "plain"
    report = lungxray.cross_validate(job.data[0], folder / f"cv-{job.model}-{job.seed}-{by}-{name}", model=job.model,
                                     seed=job.seed, image_dir=job.dataset.manifest.image_dir, by=by,
                                     progress=False, force=True, **options)  # fmt: skip
    by_path = {row["path"]: row["probabilities"] for row in report["out_of_fold"]}
    probs = np.array([[by_path[str(s.path)][c] for c in ds.classes] for s in ds.samples], dtype=np.float64)
    return probs, report["pooled"]


def covid_vs_normal(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> float | None:
    covid, normal = classes.index("covid"), classes.index("normal")
    keep = np.isin(y, [covid, normal])
    if len(np.unique(y[keep])) < 2:
        return None
    return float(roc_auc_score(y[keep] == covid, probs[keep, covid]))


def figures(ds, probs: np.ndarray) -> dict:
    """Per held-out site and pooled, from the rows of ``probs`` that were held out."""
    y, sites = ds.labels, np.array([s.site for s in ds.samples])
    scored = ~np.isnan(probs[:, 0])
    out = {}
    for site in sorted(set(sites[scored])):
        mask = sites == site
        recalls = {}
        for k, name in enumerate(ds.classes):
            n = int(np.sum(y[mask] == k))
            if n:
                hits = int(np.sum((y[mask] == k) & (probs[mask].argmax(1) == k)))
                recalls[name] = (hits / n, proportion_ci(hits, n), n)
        out[site] = {"recall": recalls, "covid_vs_normal": covid_vs_normal(y[mask], probs[mask], ds.classes)}
    yy, pp = y[scored], probs[scored]
    normal = ds.classes.index("normal")
    out["pooled"] = {
        "covid_vs_normal": covid_vs_normal(yy, pp, ds.classes),
        "balanced_accuracy": float(balanced_accuracy_score(yy, pp.argmax(1))),
        "normal_recall": float(np.mean(pp[yy == normal].argmax(1) == normal)),
        "n": int(scored.sum()),
    }
    return out


def spread(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{np.mean(values):.2f}" + (f" +- {np.std(values, ddof=1):.2f}" if len(values) > 1 else "")


def site_cell(runs: list[dict], site: str) -> str:
    """A held-out site's per-class recall over seeds, with the first seed's own recall and exact
    interval beside it, and its covid-vs-normal AUROC over seeds."""
    if site not in runs[0]:
        return "not held out"
    parts = []
    for name, (first, ci, n) in runs[0][site]["recall"].items():
        over = spread([r[site]["recall"][name][0] for r in runs])
        parts.append(f"{name} {over} (n={n}; first seed {first:.2f}, {ci[0]:.2f}-{ci[1]:.2f})")
    auc = [r[site]["covid_vs_normal"] for r in runs]
    if auc[0] is not None:
        parts.append(f"AUROC {spread(auc)}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--shared", type=Path, default=five_sites.SHARED)
    parser.add_argument("--rows", nargs="+", default=["shared folders alone", *ROWS], help="rows to run, by name")
    parser.add_argument("--internal-only", action="store_true", help="only each row's grouped-fold cv")
    parser.add_argument(
        "--internal-seeds",
        nargs="*",
        type=int,
        default=None,
        help="seeds that also run each row's grouped-fold cv (default: every seed; none: no value)",
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="loso-"))
    manifest = folder / "five-sites.csv"
    five_sites.main_to(manifest, args.shared)
    site_names = ["montreal", "pediatric", "hannover", "actualmed", "ieee8023"]
    print("| model | row | " + " | ".join(f"held out: {s}" for s in site_names)
          + " | pooled covid-vs-normal AUROC | pooled balanced accuracy | pooled normal recall"
          + " | internal macro-F1 |")  # fmt: skip
    print("|" + "---|" * (6 + len(site_names)))
    internal: dict[tuple[str, str], list[float]] = {}
    internal_seeds = args.seeds if args.internal_seeds is None else args.internal_seeds
    for model in args.models:
        rows: dict[str, list[dict]] = {name: [] for name in args.rows}
        for seed in args.seeds:
            job = Job.from_options(manifest, None, model=model, seed=seed, image_dir=args.shared, progress=False)
            ds = load_dataset(job.data, job.dataset, progress=False)
            if "shared folders alone" in rows:
                rows["shared folders alone"].append(figures(ds, held_out_probs(job, ds, [shared_alone(ds, seed)])))
            for name, options in ROWS.items():
                if name in rows and not args.internal_only:
                    probs, _ = cv_run(job, ds, folder, "site", options)
                    rows[name].append(figures(ds, probs))
                # the options' cost where the hospitals were seen, against plain training's ("sites merged")
                if (
                    (name in rows or name == "sites merged")
                    and options.get("val_by") != "site"
                    and seed in internal_seeds
                ):
                    _, pooled = cv_run(job, ds, folder, "group", options)
                    internal.setdefault((model, name), []).append(pooled["macro_f1"])
            print(f"  ({model}, seed {seed} done)", file=sys.stderr, flush=True)
        for name, runs in rows.items():
            if not runs:  # --internal-only
                continue
            pooled = [r["pooled"] for r in runs]
            cells = [site_cell(runs, s) for s in site_names]
            cells += [spread([p[k] for p in pooled]) for k in ("covid_vs_normal", "balanced_accuracy", "normal_recall")]
            cells.append(spread(internal.get((model, name), [])))
            print(f"| {model} | {name} | " + " | ".join(cells) + " |", flush=True)
        for name in ROWS:
            if (model, name) in internal and not rows.get(name):
                print(f"| {model} | {name} (internal only) |" + " |" * (len(site_names) + 3)
                      + f" {spread(internal[(model, name)])} |")  # fmt: skip
    pooled_n = " and ".join(f"{runs[0]['pooled']['n']} ({name})" for name, runs in rows.items() if runs)
    print(f"\nseeds {args.seeds}; internal macro-F1 over seeds {internal_seeds}")
    print(f"held-out predictions pooled over {pooled_n}")


if __name__ == "__main__":
    main()
