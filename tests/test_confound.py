"""The source-confound audit: a probe that tells the class from what is not the disease fires where
the classes come from different sources, stays quiet where they do not, and fires on the shared
dataset, whose COVID-19 films are adults' from one collection and whose others are children's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CLASSES, cli, synthetic_image
from PIL import Image

from lungxray.config import DataConfig, Preprocessing
from lungxray.confound import FEATURES, audit, features, probe
from lungxray.data import load_dataset


def _load(root, tmp_path):
    return load_dataset(root, DataConfig(Preprocessing(img_size=16), cache_dir=tmp_path / "cache"), progress=False)


def test_the_features_read_the_file_not_the_pixels_alone(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.fromarray(np.full((30, 60), 255, np.uint8)).save(a)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(b)
    x = features([a, b], np.stack([np.full((16, 16), 255, np.uint8), np.zeros((16, 16), np.uint8)]))
    row = dict(zip(FEATURES, x[0], strict=True))
    assert (row["width"], row["height"], row["aspect"], row["png"], row["jpeg"], row["white"]) == (60, 30, 2, 1, 0, 1)
    assert dict(zip(FEATURES, x[1], strict=True))["jpeg"] == 1 and x[1, FEATURES.index("black")] == 1


def test_the_probe_fires_where_each_class_comes_from_its_own_source(tmp_path):
    root = tmp_path / "data"
    for label, name in enumerate(CLASSES):  # one format and size per class: the source is the class
        (root / name).mkdir(parents=True)
        for i in range(15):
            image = Image.fromarray(synthetic_image(label, i)).resize((32 + 16 * label, 32))
            image.save(root / name / f"{i}.{('png', 'jpg', 'bmp')[label]}")
    result = audit(_load(root, tmp_path))
    assert result["fires"] and result["balanced_accuracy"] >= 0.9 and result["chance"] == 1 / 3
    assert "a model can learn the source instead of the disease" in result["warning"]


def test_the_probe_stays_quiet_where_the_sources_are_shared(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):  # one format and size; the class is only where the film lies
        (root / name).mkdir(parents=True)
        for i in range(15):
            film = rng.normal(110, 30, (32, 32)).clip(0, 255).astype(np.uint8)
            film[4:12, 4 + 8 * label : 12 + 8 * label] = 230  # the "finding": same size, another place
            Image.fromarray(film).save(root / name / f"{i}.png")
    result = audit(_load(root, tmp_path))
    assert result["balanced_accuracy"] < 1 / 3 + 0.25 and not result["fires"] and result["warning"] is None


def test_the_probe_is_seeded_and_grouped():
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 3)), np.repeat([0, 1], 20)
    groups = np.repeat(np.arange(20), 2)  # pairs of one class: a group never straddles folds
    first, again = probe(x, y, groups, seed=4), probe(x, y, groups, seed=4)
    assert first == again and first["folds"] == 5 and first["seed"] == 4
    assert np.array(first["confusion_matrix"]).sum() == 40


@pytest.mark.slow  # scans the 317 films twice
def test_scan_of_the_shared_dataset_prints_the_warning(shared_data, tmp_path, capsys):
    assert cli("scan", shared_data, "--quiet --img-size 32 --cache-dir", tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert "source-confound probe" in out and "against 0.33 for chance" in out
    assert "WARNING: the class can be told from properties that are not the disease" in out
    assert cli("scan", shared_data, "--json --img-size 32 --cache-dir", tmp_path / "cache") == 0
    confound = json.loads(capsys.readouterr().out)["confound"]
    assert confound["fires"] and confound["balanced_accuracy"] > 0.8 and confound["features"] == list(FEATURES)
