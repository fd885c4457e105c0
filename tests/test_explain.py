"""Saliency overlays, the shortcut audit's masks and verdicts, on models trained here on tiny images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import settings, synthetic_image
from helpers import figure_size
from PIL import Image

from lungxray.bundle import save_bundle
from lungxray.infer import to_tensor
from lungxray.models import get_spec
from lungxray.predictor import Predictor
from lungxray.saliency import LUNG_FIELD, audit, hide, lung_box, overlay, saliency
from lungxray.train import FitData, fit

SIZE = 32


def _bundle(tmp_path, name: str, images: np.ndarray, labels: np.ndarray, epochs: int = 15) -> Predictor:
    """Train ``name`` on (images, labels) for a few epochs and load it back as a bundle."""
    x, y = to_tensor(images), torch.from_numpy(labels)
    hp = dict(get_spec(name).defaults)
    if name == "cnn":
        hp.update(width=8, batch_size=8)
    result = fit(
        name, hp, FitData((x, y), (x, y), 3), settings(name, hp, epochs=epochs, batch_size=8, patience=0, augment=False)
    )
    folder = tmp_path / f"{name}-bundle"
    save_bundle(
        folder,
        result.model,
        {
            "classes": ["a", "b", "c"],
            "model": {"name": name, "hyperparameters": hp, "input_shape": [1, SIZE, SIZE]},
            "preprocessing": {"img_size": SIZE},
        },
    )
    return Predictor(folder)


def _marked(where: str, n_per_class: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Noise images whose class shows as a bright square: at the top-left corner (a 'hospital
    marker', outside the lung field) or in the middle of the lung field."""
    rng = np.random.default_rng(0)
    images = rng.normal(80, 20, (3 * n_per_class, SIZE, SIZE))
    labels = np.repeat(np.arange(3), n_per_class)
    for i, label in enumerate(labels):
        if where == "corner":
            images[i, 0:4, 0:10] += 60 * label + 40
        else:
            images[i, 12:20, 12:20] += 60 * label + 40
    return np.clip(images, 0, 255).astype(np.uint8), labels


# Grad-CAM on a CNN is also drawn in the fast tier (the explanation figure's test below, and the
# service's /explain); training this one for 4 epochs is left to the slow tier.
@pytest.mark.parametrize("name", [pytest.param("cnn", marks=pytest.mark.slow), "mlp"])
def test_saliency_overlay_has_the_image_size_and_is_not_constant(tmp_path, name):
    images = np.stack([synthetic_image(c, i, SIZE) for c in range(3) for i in range(8)])
    labels = np.repeat(np.arange(3), 8)
    predictor = _bundle(tmp_path, name, images, labels, epochs=4)
    maps = saliency(predictor, images[:5])
    assert maps.shape == (5, SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1
    assert all(m.std() > 0.01 for m in maps)  # a map, not a constant
    rgb = overlay(images[0], maps[0])
    assert rgb.shape == (SIZE, SIZE, 3) and rgb.dtype == np.uint8
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 10
    # the CLI writes one overlay PNG per image and the probabilities next to it
    from lungxray.cli import main

    files = []
    for k in range(2):
        files.append(tmp_path / f"x{k}.png")
        Image.fromarray(images[k * 9]).save(files[-1])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code = main(
        [
            "explain",
            str(predictor.folder),
            *map(str, files),
            str(tmp_path / "broken.png"),
            "--out",
            str(tmp_path / "explained"),
        ]
    )
    assert code == 0  # one file could not be read, and is listed with why; the others are explained
    results = json.loads((tmp_path / "explained" / "explain.json").read_text())
    assert "error" in results[2] and "broken.png" in results[2]["path"]
    # a failure only when nothing could be explained
    assert main(["explain", str(predictor.folder), str(tmp_path / "broken.png"), "--out", str(tmp_path / "e2")]) == 1
    for r in results[:2]:
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        with Image.open(r["overlay"]) as img:  # square files: two 512-px panels and the colour scale
            assert img.size == figure_size(SIZE, SIZE) and img.mode == "RGB"


def test_explanations_keep_the_films_aspect_with_the_original_beside_and_a_colour_scale(tmp_path):
    images = np.stack([synthetic_image(c, i, SIZE) for c in range(3) for i in range(8)])
    predictor = _bundle(tmp_path, "cnn", images, np.repeat(np.arange(3), 8), epochs=2)
    wide = np.asarray(Image.fromarray(images[3]).resize((480, 320), Image.Resampling.BILINEAR))
    Image.fromarray(wide).save(tmp_path / "wide.png")
    from lungxray.saliency import explain_files

    [result] = explain_files(predictor, [tmp_path / "wide.png"], tmp_path / "out")
    figure = np.asarray(Image.open(result["overlay"]))
    assert figure.shape[1::-1] == figure_size(480, 320) == (1110, 367)  # 512 x 341 panels: the film's 3:2
    left = figure[26:, :512]
    expected = np.asarray(Image.fromarray(wide).resize((512, 341), Image.Resampling.BILINEAR))
    assert np.array_equal(left[..., 0], expected) and np.array_equal(left[..., 0], left[..., 2])  # the film, gray
    right = figure[26:, 524:1036].astype(int)
    assert np.abs(right - right.mean(axis=2, keepdims=True)).mean() > 5  # coloured by the map, not gray
    bar = figure[26:, 1048]
    assert tuple(bar[0]) == (128, 0, 0) and tuple(bar[-1]) == (0, 0, 128)  # jet: dark red on top, dark blue below


def test_masks_cover_what_they_claim():
    images = np.random.default_rng(1).integers(0, 256, (3, 40, 40), dtype=np.uint8)
    box = lung_box(40)
    top, bottom, left, right = (round(f * 40) for f in LUNG_FIELD)
    assert box[top:bottom, left:right].all() and box.sum() == (bottom - top) * (right - left)
    lungs_hidden, borders_hidden = hide(images, "lungs"), hide(images, "borders")
    for k in range(3):
        fill = np.rint(images[k].mean())
        assert (lungs_hidden[k][box] == fill).all() and (lungs_hidden[k][~box] == images[k][~box]).all()
        assert (borders_hidden[k][~box] == fill).all() and (borders_hidden[k][box] == images[k][box]).all()
    assert images.std() > 50  # the originals were not touched
    assert not np.shares_memory(lungs_hidden, images)


def test_audit_flags_a_model_that_reads_a_corner_marker(tmp_path):
    images, labels = _marked("corner")
    report = audit(_bundle(tmp_path, "mlp", images, labels, epochs=30), images, labels)
    assert report["chance"]["accuracy"] == pytest.approx(1 / 3)
    assert report["views"]["original"]["accuracy"] > 0.9
    assert report["views"]["lungs_hidden"]["accuracy"] > 0.9  # the marker is outside the lung field
    assert report["views"]["borders_hidden"]["accuracy"] < 0.6
    assert "without seeing the lungs" in report["verdict"]


def test_audit_clears_a_model_that_reads_the_lung_field(tmp_path):
    images, labels = _marked("middle")
    report = audit(_bundle(tmp_path, "mlp", images, labels, epochs=30), images, labels)
    assert report["views"]["original"]["accuracy"] > 0.9
    assert report["views"]["borders_hidden"]["accuracy"] > 0.9
    assert report["views"]["lungs_hidden"]["accuracy"] < 0.6
    assert "needs the lung field" in report["verdict"]
