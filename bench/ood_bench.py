"""The out-of-distribution flag of the default model on foreign inputs, against two alternatives.

Trains the default model (``lungxray train``'s defaults: the CNN with its registered
hyperparameters, the default preprocessing) on the standard split of DATA (seed 0) and saves it as a
bundle, whose out-of-distribution score is the one every prediction carries. Then makes foreign
inputs, each written as a PNG file and read back through the bundle's own decoding:

- from EXTERNAL films (adult chest X-rays from other hospitals): inverted, rotated 90 degrees,
  upside down, cropped to a quarter (one random quadrant);
- things that are not radiographs: uniform noise, rendered text, a colour photograph-like image
  (gradients and shapes), a flat grey image;

and prints the share each detector flags: lungxray's score (Mahalanobis distance of the input
descriptors, its own cross-fitted threshold) and two alternatives thresholded at the 95th
percentile of the validation images' scores, the
Mahalanobis distance of the penultimate features to the training classes (Lee et al., 2018) and
the energy score (Liu et al., 2020). Also: the internal test images, the external images, and the
share of the external images the model gets wrong that the flag catches.

    .venv/bin/python bench/ood_bench.py DATA EXTERNAL [--per-kind 60]

Writes BENCHMARKS.md's "ood" section unless --no-write.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, update_section  # noqa: E402

KINDS = ("inverted", "rotated 90", "upside down", "quarter crop", "noise", "text", "photograph-like", "flat")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def foreign(films: list[Path], per_kind: int, seed: int = 0) -> dict[str, list[bytes]]:
    """kind -> PNG files: four transformations of real films and four kinds of non-radiograph."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[bytes]] = {k: [] for k in KINDS}
    for path in rng.choice(films, per_kind, replace=len(films) < per_kind):
        film = Image.open(path).convert("L")
        w, h = film.size
        qx, qy = rng.integers(0, 2, 2)
        out["inverted"].append(_png(Image.fromarray(255 - np.asarray(film))))
        out["rotated 90"].append(_png(film.rotate(90, expand=True)))
        out["upside down"].append(_png(film.transpose(Image.Transpose.FLIP_TOP_BOTTOM)))
        box = (int(qx) * w // 2, int(qy) * h // 2, int(qx) * w // 2 + w // 2, int(qy) * h // 2 + h // 2)
        out["quarter crop"].append(_png(film.crop(box)))
    for _ in range(per_kind):
        out["noise"].append(_png(Image.fromarray(rng.integers(0, 256, (512, 512), dtype=np.uint8))))
        page = Image.new("L", (512, 512), int(rng.integers(180, 256)))
        draw = ImageDraw.Draw(page)
        font = ImageFont.load_default(size=int(rng.integers(18, 40)))
        for line in range(12):
            words = "".join(rng.choice(list("abcdefghij klmnopqrst")) for _ in range(30))
            draw.text((10, 10 + 40 * line), words, fill=int(rng.integers(0, 80)), font=font)
        out["text"].append(_png(page))
        yy, xx = np.mgrid[0:384, 0:512] / 512
        rgb = np.stack(
            [
                np.sin(xx * rng.uniform(2, 8) + rng.uniform(0, 6)),
                np.cos(yy * rng.uniform(2, 8)),
                np.sin((xx + yy) * rng.uniform(1, 5)),
            ],
            axis=-1,
        )
        photo = Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(photo)
        for _ in range(8):
            x0, y0 = (int(v) for v in rng.integers(0, 400, 2))
            size = (int(v) for v in rng.integers(20, 150, 2))
            draw.ellipse(
                (x0, y0, x0 + next(size), y0 + next(size)), fill=tuple(int(c) for c in rng.integers(0, 256, 3))
            )
        out["photograph-like"].append(_png(photo))
        out["flat"].append(_png(Image.new("L", (400, 400), int(rng.integers(0, 256)))))
    return out


class Alternatives:
    """Lee et al.'s penultimate-feature Mahalanobis score and the energy score of a trained model."""

    def __init__(self, model: torch.nn.Module, train: np.ndarray, y_train: np.ndarray, val: np.ndarray) -> None:
        from sklearn.covariance import LedoitWolf

        self.model = model.eval()
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]  # the class layer
        self._features: list[torch.Tensor] = []
        last.register_forward_pre_hook(lambda _, args: self._features.append(args[0].detach()))
        f, _ = self._run(train)
        self.means = np.stack([f[y_train == c].mean(axis=0) for c in np.unique(y_train)])
        self.precision = LedoitWolf().fit(f - self.means[y_train]).precision_
        mahalanobis, energy = self.scores(val)
        self.thresholds = {
            "penultimate Mahalanobis": np.percentile(mahalanobis, 95),
            "energy": np.percentile(energy, 95),
        }

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from lungxray.infer import predict_logits, to_tensor

        self._features.clear()
        logits = predict_logits(self.model, to_tensor(images)).double()
        return torch.cat(self._features).double().numpy(), logits.numpy()

    def scores(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f, logits = self._run(images)
        d = np.stack([np.einsum("ij,jk,ik->i", f - m, self.precision, f - m) for m in self.means], axis=1)
        return d.min(axis=1), -torch.logsumexp(torch.from_numpy(logits), dim=1).numpy()

    def flagged(self, images: np.ndarray) -> dict[str, np.ndarray]:
        mahalanobis, energy = self.scores(images)
        return {
            "penultimate Mahalanobis": mahalanobis > self.thresholds["penultimate Mahalanobis"],
            "energy": energy > self.thresholds["energy"],
        }


def flagged_by_variant(data: Path, external: Path, folds: int = 5) -> str:
    """Per preprocessing variant (external_bench.py's): the share of internal images flagged when
    held out (each fold's score fitted on its training part, thresholded on its val part) and of
    the external normal images. The score needs no network, so no model is trained here."""
    from external_bench import VARIANTS

    from lungxray.config import DataConfig
    from lungxray.data import load_dataset
    from lungxray.job import build
    from lungxray.ood import fit_ood
    from lungxray.splits import make_folds

    rows = []
    for name, (fields, _) in VARIANTS.items():
        if "scanner" in name:
            continue  # augmentation does not change the images the score sees
        ds = load_dataset(data, build(DataConfig, fields), progress=False)
        ext = load_dataset(external, build(DataConfig, fields), progress=False, min_classes=1)
        normals = ext.images[[s.label == "normal" for s in ext.samples]]
        held_out, normal = np.zeros(len(ds.samples), dtype=bool), []
        for fold in make_folds(ds.labels, ds.groups, folds, 0):
            score = fit_ood(ds.images[fold.train], ds.images[fold.val])
            held_out[fold.test] = score.score(ds.images[fold.test]) > 1
            normal.append((score.score(normals) > 1).mean())
        rows.append(f"| {name} | {held_out.mean():.1%} | {np.mean(normal):.1%} |\n")
    return (
        "| preprocessing | flagged: internal held-out (5 folds) | flagged: external normals (mean over folds) |\n"
        "|---|---|---|\n" + "".join(rows)
    )


def main() -> None:
    from lungxray.config import DataConfig
    from lungxray.data import load_dataset
    from lungxray.job import Job
    from lungxray.models import get_spec
    from lungxray.pipeline import prepare, train_stage
    from lungxray.predictor import Predictor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("external", type=Path)
    parser.add_argument("--per-kind", type=int, default=60)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(2)
    data_cfg = DataConfig()
    with tempfile.TemporaryDirectory() as tmp:
        job = Job(args.data, Path(tmp), args.model, data_cfg, progress=False)
        ds, split = prepare(job, write=False)
        _, folder = train_stage(job, ds, split, dict(get_spec(args.model).defaults))
        predictor = Predictor(folder, backend="torch")
    alternatives = Alternatives(predictor.model_, ds.images[split.train], ds.labels[split.train], ds.images[split.val])
    ext = load_dataset(args.external, data_cfg, progress=False, min_classes=1)
    sets = {"internal test": ds.images[split.test], "external, all": ext.images}
    normal = np.array([s.label == "normal" for s in ext.samples])
    sets["external, normal"] = ext.images[normal]
    made = foreign([s.path for s in ext.samples], args.per_kind)
    sets |= {kind: np.stack([predictor.decode(b) for b in files]) for kind, files in made.items()}
    rows = []
    for name, images in sets.items():
        ours = predictor.ood_scores(images) > 1
        other = alternatives.flagged(images)
        rows.append([name, len(images), ours.mean(), other["penultimate Mahalanobis"].mean(), other["energy"].mean()])
    probs = predictor.predict_arrays(ext.images)
    index = {c: i for i, c in enumerate(predictor.classes_)}
    wrong = probs.argmax(1) != np.array([index[s.label] for s in ext.samples])
    flagged = predictor.ood_scores(ext.images) > 1
    table = (
        "| images | n | lungxray's score (input Mahalanobis) | penultimate-feature Mahalanobis | energy |\n"
        "|---|---|---|---|---|\n"
        + "".join(f"| {r[0]} | {r[1]} | {r[2]:.0%} | {r[3]:.0%} | {r[4]:.0%} |\n" for r in rows)
        + f"\nExternal images the model gets wrong: {int(wrong.sum())} of {len(wrong)}; the flag catches "
        f"{int((wrong & flagged).sum())} of them ({(wrong & flagged).sum() / max(1, wrong.sum()):.0%}); it flags "
        f"{int((~wrong & flagged).sum())} of the {int((~wrong).sum())} it gets right "
        f"({(~wrong & flagged).sum() / max(1, (~wrong).sum()):.0%}).\n"
    )
    by_variant = flagged_by_variant(args.data, args.external)
    print(table)
    print(by_variant)
    if not args.no_write:
        command = f"`.venv/bin/python bench/ood_bench.py {' '.join(sys.argv[1:3])} --per-kind {args.per_kind}`"
        update_section(
            "ood",
            f"## Out-of-distribution flag\n\nCommand: {command} ({machine()}; {time.perf_counter() - start:.0f} s). "
            f"The default model ({args.model}, registered hyperparameters, default preprocessing) trained on the "
            "standard split (seed 0); lungxray's threshold is the 95th percentile of the cross-fitted distances of "
            "the training and validation images, each alternative's the 95th percentile of its scores on the "
            "validation images. Shares flagged:\n\n"
            + table
            + "\nThe flag (no network involved) per preprocessing variant, on the folds of bench/external_bench.py:\n\n"
            + by_variant,
        )


if __name__ == "__main__":
    main()
