"""External validation per preprocessing variant: does any option narrow the gap between hospitals?

For each variant (equalisation, border cropping, scanner augmentation, combinations), each model
(the default CNN with its registered hyperparameters, the MLP with the demo search's best) and each
training seed: 5-fold cross-validation on DATA (stratified, duplicate groups whole, the same folds
for every row), and every fold's model also scores EXTERNAL, which is never trained or tuned on.
One table, measured in one run:

- internal cv macro-F1: pooled over the out-of-fold predictions, mean +- std over training seeds;
- external covid-vs-normal AUROC: P(covid) on the external covid and normal images, per fold model,
  mean over folds and seeds (+- std over seeds);
- external normal recall: the same way;
- flagged share of the external normal images and of the internal held-out (out-of-fold) images by
  the out-of-distribution score, fitted on each fold's training part, thresholded on its val part.

    .venv/bin/python bench/external_bench.py DATA EXTERNAL [--seeds 0 1 2] [--variants ...] [--models cnn mlp]

Writes BENCHMARKS.md's "external" section and bench/results/external.json unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, update_section  # noqa: E402

# The best parameters of `make demo`'s search (seed 0, BENCHMARKS.md section (b)), as models_bench.py.
MLP_PARAMS = {"activation": "tanh", "layer_1": 128, "layer_2": 128, "layer_3": 128, "dropout_1": 0.1,
              "dropout_2": 0.2, "learning_rate": 0.0001}  # fmt: skip

# name -> (DataConfig fields, scanner augmentation); each spells both options, whatever the defaults
VARIANTS = {
    "none": ({"crop_borders": False, "equalize": "none"}, False),
    "hist": ({"crop_borders": False, "equalize": "hist"}, False),
    "clahe": ({"crop_borders": False, "equalize": "clahe"}, False),
    "crop": ({"crop_borders": True, "equalize": "none"}, False),
    "crop+clahe": ({"crop_borders": True, "equalize": "clahe"}, False),
    "scanner-aug": ({"crop_borders": False, "equalize": "none"}, True),
    "clahe+scanner-aug": ({"crop_borders": False, "equalize": "clahe"}, True),
}


def covid_vs_normal_auroc(classes: list[str], labels: np.ndarray, probs: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    covid, normal = classes.index("covid"), classes.index("normal")
    keep = np.isin(labels, [covid, normal])
    y = labels[keep] == covid
    return float(roc_auc_score(y, probs[keep, covid])) if 0 < y.sum() < len(y) else None


def one_row(data: Path, external: Path, variant: str, model: str, seeds: list[int], folds: int) -> dict:
    from lungxray.config import DataConfig, TrainConfig
    from lungxray.data import load_dataset
    from lungxray.infer import predict_logits, to_tensor
    from lungxray.job import Job, build
    from lungxray.metrics import compute_metrics
    from lungxray.models import get_spec
    from lungxray.ood import fit_ood
    from lungxray.pipeline import tensors
    from lungxray.splits import make_folds
    from lungxray.train import FitData, fit

    data_fields, scanner = VARIANTS[variant]
    data_cfg = build(DataConfig, data_fields)
    ds = load_dataset(data, data_cfg, progress=False)
    ext = load_dataset(external, data_cfg, progress=False, min_classes=1)
    index = {c: i for i, c in enumerate(ds.classes)}
    ext_y = np.array([index[s.label] for s in ext.samples])
    ext_x = to_tensor(ext.images)
    normal = ext_y == index["normal"]
    parts = make_folds(ds.labels, ds.groups, folds, 0)  # the same folds for every row
    params = dict(get_spec(model).defaults) if model == "cnn" else dict(MLP_PARAMS)
    per_seed = []
    for seed in seeds:
        base = TrainConfig(seed=seed, threads=2)
        base.augment = replace(base.augment, scanner=scanner)
        cfg = Job(data, model=model, train=base).final.for_params(params)
        oof = np.zeros((len(ds.samples), len(ds.classes)))
        flagged_internal = np.zeros(len(ds.samples), dtype=bool)
        aurocs, normal_recalls, flagged_normals = [], [], []
        for fold in parts:
            result = fit(model, params, FitData(tensors(ds, fold.train), tensors(ds, fold.val), len(ds.classes)), cfg)
            oof[fold.test] = torch.softmax(predict_logits(result.model, tensors(ds, fold.test)[0]).double(), 1).numpy()
            probs = torch.softmax(predict_logits(result.model, ext_x).double(), 1).numpy()
            aurocs.append(covid_vs_normal_auroc(ds.classes, ext_y, probs))
            normal_recalls.append(float((probs[normal].argmax(1) == index["normal"]).mean()))
            ood = fit_ood(ds.images[fold.train], ds.images[fold.val])
            flagged_internal[fold.test] = ood.score(ds.images[fold.test]) > 1
            flagged_normals.append(float((ood.score(ext.images[normal]) > 1).mean()))
        pooled = compute_metrics(ds.labels, oof, ds.classes, resamples=0)
        per_seed.append(
            {
                "seed": seed,
                "cv_macro_f1": pooled["macro_f1"],
                "external_auroc_covid_vs_normal": float(np.mean(aurocs)),
                "external_normal_recall": float(np.mean(normal_recalls)),
                "flagged_external_normals": float(np.mean(flagged_normals)),
                "flagged_internal_heldout": float(flagged_internal.mean()),
            }
        )
        print(f"  {variant:18s} {model:4s} seed {seed}: {per_seed[-1]}", flush=True)
    keys = [k for k in per_seed[0] if k != "seed"]
    summary = {k: (float(np.mean([s[k] for s in per_seed])), float(np.std([s[k] for s in per_seed], ddof=1)))
               for k in keys}  # fmt: skip
    return {"variant": variant, "model": model, "per_seed": per_seed, "summary": summary}


def table(rows: list[dict], seeds: list[int]) -> str:
    head = (
        "| variant | model | internal cv macro-F1 | external covid-vs-normal AUROC | external normal recall "
        "| flagged: external normals | flagged: internal held-out |\n|---|---|---|---|---|---|---|\n"
    )
    fmt = lambda m, s: f"{m:.3f} +- {s:.3f}"  # noqa: E731
    body = "".join(
        f"| {r['variant']} | {r['model']} | {fmt(*r['summary']['cv_macro_f1'])} | "
        f"{fmt(*r['summary']['external_auroc_covid_vs_normal'])} | {fmt(*r['summary']['external_normal_recall'])} | "
        f"{r['summary']['flagged_external_normals'][0]:.1%} | {r['summary']['flagged_internal_heldout'][0]:.1%} |\n"
        for r in rows
    )
    return head + body + f"\nMean +- standard deviation over training seeds {', '.join(map(str, seeds))}.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("external", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=["cnn", "mlp"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    rows = []
    results = ROOT / "bench" / "results" / "external.json"
    for variant in args.variants:
        for model in args.models:
            rows.append(one_row(args.data, args.external, variant, model, args.seeds, args.folds))
            if not args.no_write:  # partial results survive an interrupted run
                results.parent.mkdir(exist_ok=True)
                results.write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows, args.seeds)
    print(text)
    if args.no_write:
        return
    command = (
        f"`.venv/bin/python bench/external_bench.py {' '.join(sys.argv[1:3])} --seeds {' '.join(map(str, args.seeds))}`"
    )
    update_section(
        "external",
        f"## External validation per preprocessing variant\n\nCommand: {command} ({machine()}; "
        f"{time.perf_counter() - start:.0f} s). {args.folds}-fold cross-validation on the shared dataset (the same "
        "folds for every row); each fold's model also scores the external set, which is never trained or tuned on; "
        "the CNN with its registered hyperparameters, the MLP with the demo search's best.\n\n" + text,
    )


if __name__ == "__main__":
    main()
