"""Model comparison: 5-fold cross-validation of every registered model, side by side in one run.

The same folds (stratified, duplicate groups kept whole, one seed) for each model, fixed
hyperparameters (each model's registered defaults; the MLP with the best parameters the
tutorial-sized search found on seed 0), each model's own training recipe. Reports macro-F1
mean +- std over folds, pooled macro AUROC with its bootstrap CI, parameters, training and
inference images/s and wall time. Writes BENCHMARKS.md unless --no-write.

    .venv/bin/python bench/models_bench.py [DATA] [--models cnn mlp resnet18 densenet121] [--big-epochs 8]

It also runs the default CNN without augmentation and with larger augmentation ranges (--no-ablation
skips them), the measurement behind the mild default ranges.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _report import PLAIN, machine, update_section  # noqa: E402

# The best parameters of `make demo`'s search (seed 0, BENCHMARKS.md section (b)).
MLP_PARAMS = {
    "activation": "tanh",
    "layer_1": 128,
    "layer_2": 128,
    "layer_3": 128,
    "dropout_1": 0.1,
    "dropout_2": 0.2,
    "learning_rate": 0.0001,
}
BIG = ("resnet18", "densenet121")


# Augmentation ablation rows for the default CNN: name -> TrainConfig.augment
ABLATION = {
    "cnn, no augmentation": False,
    "cnn, larger augmentation (10 deg, 6% shift, 10% zoom and brightness, 15% contrast)": {
        "rotation": 10.0,
        "shift": 0.06,
        "scale": 0.10,
        "brightness": 0.10,
        "contrast": 0.15,
    },
}


def cross_validate(
    model: str, data: Path, out: Path, folds: int, seed: int, epochs: int | None, augment=None
) -> tuple[dict, float]:
    from lungxray.config import AugmentConfig, CVConfig, DataConfig, Preprocessing, TrainConfig
    from lungxray.cv import cross_validate as lungxray_cv
    from lungxray.job import Job
    from lungxray.models import get_spec

    params = MLP_PARAMS if model == "mlp" else dict(get_spec(model).defaults)
    # Unset fields (epochs, optimizer, schedule, augmentation) are the model's recipe: the Job resolves them.
    cfg = TrainConfig(
        epochs=epochs,
        seed=seed,
        # scanner augmentation off: these figures were measured before it was the cnn's default
        augment=AugmentConfig(enabled=True, scanner=False, **augment)
        if isinstance(augment, dict)
        else AugmentConfig(enabled=augment, scanner=False),
    )
    start = time.perf_counter()
    name = model if augment is None else f"{model}-augment-{'off' if augment is False else 'large'}"
    data_cfg = DataConfig(Preprocessing(**PLAIN), cache_dir=out / "cache")
    job = Job(data, out / name, model, data_cfg, train=cfg, cv=CVConfig(folds=folds), force=True, progress=False)
    report = lungxray_cv(job, params)
    return report, time.perf_counter() - start


def row(model: str, report: dict, wall: float) -> str:
    s = report["summary"]
    f1, auroc = s["macro_f1"], s["macro_auroc"]
    folds = report["per_fold"]
    train_ips = statistics.mean(f["train_images_per_s"] for f in folds)
    infer_ips = statistics.mean(f["predict_images_per_s"] for f in folds)
    epochs = report["settings"]["train"]["epochs"]
    ci = auroc["ci95"]
    return (
        f"| {model} | {f1['mean']:.4f} +- {f1['std']:.4f} | {s['accuracy']['mean']:.4f} | "
        f"{auroc['pooled']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] | {report['n_parameters']:,} | {epochs} | "
        f"{train_ips:,.0f} | {infer_ips:,.0f} | {wall:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "data", nargs="?", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/covid19-image-dataset"
    )
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp", "resnet18", "densenet121"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--big-epochs", type=int, default=8, help="epochs for ResNet-18 and DenseNet-121")
    parser.add_argument(
        "--ablation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the default CNN without and with larger augmentation",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "models")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    rows = []
    for model in args.models:
        report, wall = cross_validate(
            model, args.data, args.out, args.folds, args.seed, args.big_epochs if model in BIG else None
        )
        rows.append(row(model, report, wall))
        print(rows[-1], flush=True)
    if args.ablation:
        for name, augment in ABLATION.items():
            report, wall = cross_validate("cnn", args.data, args.out, args.folds, args.seed, None, augment)
            rows.append(row(name, report, wall))
            print(rows[-1], flush=True)
    command = (
        f"`.venv/bin/python bench/models_bench.py {args.data} --models {' '.join(args.models)} "
        f"--folds {args.folds} --seed {args.seed} --big-epochs {args.big_epochs}"
        f"{'' if args.ablation else ' --no-ablation'}`"
    )
    body = "\n".join(
        [
            "## Models compared: 5-fold cross-validation",
            "",
            f"Command: {command} ({machine()}). The same folds for every model (stratified, duplicate groups "
            "kept whole), fixed hyperparameters: each CNN's registered defaults, the MLP with the best "
            f"parameters of the seed-0 search above (`{json.dumps(MLP_PARAMS)}`). Each model's own recipe: "
            "the MLP trains as the tutorial (Adam, constant rate, no augmentation); the CNNs with AdamW, "
            "cosine decay and augmentation. ResNet-18 and DenseNet-121 run "
            f"{args.big_epochs} epochs instead of their recipe's 12 to fit the run in the time of one sitting. "
            "Early stopping (patience 16) on each fold's validation part.",
            "",
            "| model | macro-F1 mean +- std over folds | accuracy mean | macro AUROC, pooled [95% CI] | parameters | "
            "epochs | training images/s | inference images/s | wall s (5 folds) |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Training images/s counts every epoch's training images over the fold's fit time (validation "
            "passes included); inference images/s is one pass over the fold's test part in batches of 256. "
            "Both on all CPU threads.",
        ]
    )
    print(body)
    if not args.no_write:
        update_section("models", body)


if __name__ == "__main__":
    main()
