"""CNN recipe sweep: 5-fold cross-validation of variants of the default CNN, on the same folds.

Each variant changes the registered defaults (hyperparameters, training options, input size,
members of an ensemble) and is scored like ``lungxray cv``: macro-F1 on every fold's test part,
mean over folds and pooled over the out-of-fold predictions, for one or more training seeds.
Fits run in parallel worker processes, so a many-core or GPU machine can try many variants; the
numbers that count are re-measured with ``lungxray cv`` on the target machine.

    # preprocessed images, labels and the folds of `lungxray cv --seed 0`, in one file
    .venv/bin/python bench/cnn_sweep.py export DATA bench/out/sweep/data.npz --sizes 128 192
    # score variants (all when none are named); one JSON line per variant
    .venv/bin/python bench/cnn_sweep.py run bench/out/sweep/data.npz out.jsonl --seeds 0 1 2 --workers 2
    # markdown table of one or more logs
    .venv/bin/python bench/cnn_sweep.py table out.jsonl
    # images that several `lungxray cv` runs (same folds) get wrong; averages of their predictions
    .venv/bin/python bench/cnn_sweep.py oof bench/out/models/*/cv.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).parent))
from _report import PLAIN  # noqa: E402

# name -> changes to the default CNN. hp: model/optimiser hyperparameters; cfg: TrainConfig fields;
# size: input side; members: fits (seeds) averaged per fold; trainval: train on train + val, keep
# the last epoch. Ordered by priority: earlier ones finish first.
VARIANTS: dict[str, dict] = {
    "baseline": {},
    "members3": {"members": 3},
    "ema.99": {"cfg": {"ema": 0.99}},
    "ls.1": {"cfg": {"label_smoothing": 0.1}},
    "trainval": {"trainval": True},
    "last": {"cfg": {"keep": "last"}},
    "standardize": {"hp": {"standardize": True}},
    "size192": {"size": 192},
    "ema.99+ls.1": {"cfg": {"ema": 0.99, "label_smoothing": 0.1}},
    "ema.99+members3": {"cfg": {"ema": 0.99}, "members": 3},
    "trainval+members3": {"trainval": True, "members": 3},
    "ema.99+ls.1+members3": {"cfg": {"ema": 0.99, "label_smoothing": 0.1}, "members": 3},
    "members5": {"members": 5},
    "noaug": {"cfg": {"augment": False}},
    "ep50-last": {"cfg": {"epochs": 50, "keep": "last"}},
    "lr1e-3": {"hp": {"learning_rate": 1e-3}},
    "lr4e-3": {"hp": {"learning_rate": 4e-3}},
    "wd5e-2": {"hp": {"weight_decay": 5e-2}},
    "bs8": {"hp": {"batch_size": 8}},
    "drop.3": {"hp": {"dropout": 0.3}},
    "width24": {"hp": {"width": 24}},
    "width32": {"hp": {"width": 32}},
    "standardize+members3": {"hp": {"standardize": True}, "members": 3},
    "size192+members3": {"size": 192, "members": 3},
    "classw": {"cfg": {"class_weighted": True}},
    "size256": {"size": 256},
    "ema.995": {"cfg": {"ema": 0.995}},
    "bs32": {"hp": {"batch_size": 32}},
}


def without_scanner(cfg):
    """The settings with scanner augmentation off: the sweep was measured before it was the cnn's default."""
    from dataclasses import replace

    return replace(cfg, augment=replace(cfg.augment, scanner=False))


def export(data: Path, out: Path, sizes: list[int], folds: int, seed: int, cache: Path) -> None:
    from lungxray.config import DataConfig, Preprocessing
    from lungxray.data import load_dataset
    from lungxray.splits import make_folds

    arrays, first = {}, None
    for size in sizes:
        ds = load_dataset(data, DataConfig(Preprocessing(img_size=size, **PLAIN), cache_dir=cache), progress=False)
        first = first or ds
        assert [s.path for s in ds.samples] == [s.path for s in first.samples]
        arrays[f"x{size}"] = ds.images
    ds = first  # folds from the first size's duplicate groups, as `lungxray cv --img-size` would
    parts = make_folds(ds.labels, ds.groups, folds, seed)
    for i, part in enumerate(parts):
        arrays[f"train{i}"], arrays[f"val{i}"], arrays[f"test{i}"] = part.train, part.val, part.test
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, labels=ds.labels, classes=np.array(ds.classes), folds=folds, seed=seed, **arrays)
    print(f"wrote {out}: {len(ds.labels)} images, sizes {sizes}, {folds} folds (seed {seed})")


_DATA: dict = {}


def _fold_probs(npz: str, name: str, fold: int, seed: int, device: str, threads: int) -> tuple:
    """One variant, one fold, one training seed: (test probabilities, seconds)."""
    import torch

    from lungxray.config import TrainConfig
    from lungxray.infer import predict_logits, to_tensor
    from lungxray.job import Job
    from lungxray.models import get_spec
    from lungxray.train import FitData, fit

    torch.set_num_threads(threads)
    if npz not in _DATA:
        _DATA.clear()
        _DATA[npz] = dict(np.load(npz))
    d, v = _DATA[npz], VARIANTS[name]
    spec = get_spec("cnn")
    hp = {**spec.defaults, **v.get("hp", {})}
    x, y = to_tensor(d[f"x{v.get('size', 128)}"]), torch.as_tensor(d["labels"], dtype=torch.long)
    train, val, test = (d[f"{p}{fold}"] for p in ("train", "val", "test"))
    cfg = {"device": device, **v.get("cfg", {})}  # the rest is the cnn's recipe, filled by the Job
    if v.get("trainval"):
        train, cfg["keep"] = np.concatenate([train, val]), "last"
    start = time.perf_counter()
    probs = 0
    for m in range(v.get("members", 1)):
        result = fit(
            "cnn",
            hp,
            FitData((x[train], y[train]), (x[val], y[val]), len(d["classes"])),
            without_scanner(
                Job(
                    Path(npz), model="cnn", train=TrainConfig(seed=seed + 1000 * m, threads=threads, **cfg)
                ).final.for_params(hp)
            ),
        )
        probs = probs + torch.softmax(predict_logits(result.model, x[test]).double(), 1).numpy()
    return probs / v.get("members", 1), time.perf_counter() - start


def run(npz: Path, out: Path, names: list[str], seeds: list[int], workers: int, device: str, threads: int) -> None:
    from sklearn.metrics import f1_score

    d = np.load(npz)
    labels, k = d["labels"], int(d["folds"])
    tasks = [(name, seed, fold) for name in names for seed in seeds for fold in range(k)]
    results: dict[tuple[str, int], dict] = {}
    done_variants = set()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool, out.open("a") as log:
        futures = {
            pool.submit(_fold_probs, str(npz), name, fold, seed, device, threads): (name, seed, fold)
            for name, seed, fold in tasks
        }
        for future in as_completed(futures):
            name, seed, fold = futures[future]
            probs, seconds = future.result()
            entry = results.setdefault(
                (name, seed), {"probs": np.zeros((len(labels), len(d["classes"]))), "folds": {}, "seconds": 0.0}
            )
            test = d[f"test{fold}"]
            entry["probs"][test] = probs
            entry["folds"][fold] = f1_score(labels[test], probs.argmax(1), average="macro")
            entry["seconds"] += seconds
            if name in done_variants or any(len(results.get((name, s), {}).get("folds", {})) < k for s in seeds):
                continue
            done_variants.add(name)
            per_seed = []
            for s in seeds:
                e = results[(name, s)]
                per_seed.append(
                    {
                        "seed": s,
                        "mean": float(np.mean([e["folds"][f] for f in range(k)])),
                        "std": float(np.std([e["folds"][f] for f in range(k)], ddof=1)),
                        "pooled": float(f1_score(labels, e["probs"].argmax(1), average="macro")),
                        "errors": int((e["probs"].argmax(1) != labels).sum()),
                        "fit_s": e["seconds"],
                    }
                )
            line = {
                "variant": name,
                "changes": VARIANTS[name],
                "device": device,
                "mean_of_means": float(np.mean([p["mean"] for p in per_seed])),
                "per_seed": per_seed,
            }
            log.write(json.dumps(line) + "\n")
            log.flush()
            print(
                f"{name:28s} macro-F1 mean over folds, per seed: "
                + " ".join(f"{p['mean']:.4f}" for p in per_seed)
                + f" | avg {line['mean_of_means']:.4f} | errors "
                + " ".join(str(p["errors"]) for p in per_seed)
                + f" | {np.mean([p['fit_s'] for p in per_seed]):.0f} s fit per seed",
                flush=True,
            )


def table(logs: list[Path], drop: list[str]) -> None:
    """Markdown rows from JSON-line logs (a later line for the same variant replaces an earlier one)."""
    lines = {}
    for log in logs:
        for text in log.read_text().splitlines():
            line = json.loads(text)
            if line["variant"] not in drop:
                lines[line["variant"]] = line
    base = lines.get("baseline", {}).get("mean_of_means")
    print(
        "| variant | changes | macro-F1 mean over folds, per training seed | average | vs baseline | "
        "pooled errors of 317, per seed |"
    )
    print("|---|---|---|---|---|---|")
    for line in sorted(lines.values(), key=lambda line: -line["mean_of_means"]):
        seeds = line["per_seed"]
        delta = f"{line['mean_of_means'] - base:+.4f}" if base is not None else ""
        means = " / ".join(f"{s['mean']:.4f}" for s in seeds)
        errors = " / ".join(str(s["errors"]) for s in seeds)
        print(
            f"| {line['variant']} | `{json.dumps(line['changes'])}` | {means} | {line['mean_of_means']:.4f} | "
            f"{delta} | {errors} |"
        )


def out_of_fold(cvs: list[Path], min_wrong: int) -> None:
    """Across ``lungxray cv`` runs on the same folds: images most of them get wrong, and the
    macro-F1 of averaging their out-of-fold probabilities (every combination; chosen after the
    fact, so an optimistic figure)."""
    from itertools import combinations

    from sklearn.metrics import f1_score

    runs = {}
    for path in cvs:
        cv = json.loads(path.read_text())
        classes = list(cv["out_of_fold"][0]["probabilities"])
        runs[path.parent.name] = np.array([[o["probabilities"][c] for c in classes] for o in cv["out_of_fold"]])
        labels = np.array([classes.index(o["label"]) for o in cv["out_of_fold"]])
        folds = np.array([o["fold"] for o in cv["out_of_fold"]])
        paths = [o["path"] for o in cv["out_of_fold"]]

    def mean_f1(probs: np.ndarray) -> float:
        return float(
            np.mean(
                [f1_score(labels[folds == f], probs[folds == f].argmax(1), average="macro") for f in np.unique(folds)]
            )
        )

    wrong = sum((p.argmax(1) != labels).astype(int) for p in runs.values())
    print(f"images wrong in at least {min_wrong} of {len(runs)} runs:")
    for i in np.argsort(-wrong, kind="stable"):
        if wrong[i] >= min_wrong:
            print(f"  {wrong[i]}  {classes[labels[i]]:<16} {paths[i]}")
    scored = [
        (mean_f1(sum(runs[n] for n in combo) / len(combo)), combo)
        for k in range(1, len(runs) + 1)
        for combo in combinations(runs, k)
    ]
    print("macro-F1 mean over folds of averaged probabilities (best 5 combinations, then each run alone):")
    for f1, combo in sorted(scored, reverse=True)[:5] + [s for s in scored if len(s[1]) == 1]:
        print(f"  {f1:.4f}  {' + '.join(combo)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="preprocessed images, labels and folds to one .npz")
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--sizes", type=int, nargs="+", default=[128])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=ROOT / "bench" / "out" / "models" / "cache")
    p = sub.add_parser("run", help="score variants; one JSON line each")
    p.add_argument("npz", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per worker")
    p = sub.add_parser("table", help="markdown table of JSON-line logs")
    p.add_argument("logs", type=Path, nargs="+")
    p.add_argument("--drop", nargs="*", default=[], help="variants to leave out")
    p = sub.add_parser("oof", help="images several cv runs get wrong, and averages of their predictions")
    p.add_argument("cvs", type=Path, nargs="+", help="cv.json files of runs on the same folds")
    p.add_argument("--min-wrong", type=int, default=4)
    args = parser.parse_args()
    if args.command == "table":
        table(args.logs, args.drop)
    elif args.command == "oof":
        out_of_fold(args.cvs, args.min_wrong)
    elif args.command == "export":
        export(args.data, args.out, args.sizes, args.folds, args.seed, args.cache)
    else:
        unknown = set(args.variants) - set(VARIANTS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
        run(args.npz, args.out, args.variants, args.seeds, args.workers, args.device, args.threads)


if __name__ == "__main__":
    main()
