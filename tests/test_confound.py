"""The source-confound audit: a probe that tells the class from what is not the disease fires where
the classes come from different sources, stays quiet where they do not, and fires on the shared
dataset, whose COVID-19 films are adults' from one collection and whose others are children's.
cleanlab's Datalab checks in the same audit flag a planted odd film and a planted copy, tell a
drifting file order from a shuffled one, score each property against the class, and leave the
process's warning filters and numpy's global generator as they found them."""

from __future__ import annotations

import json
import shutil
import sys
import warnings

import numpy as np
import pytest
from conftest import CLASSES, cli, synthetic_image, write_tree
from PIL import Image

from lungxray.config import DataConfig, Preprocessing
from lungxray.confound import FEATURES, audit, features, import_datalab, probe, spurious_scores
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


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """48 films of one size, plus a wide, white one (Covid/odd.png) and a byte copy of
    Covid/img003.png (Covid/copy.png): (the tree, its scan, the scan's audit)."""
    tmp = tmp_path_factory.mktemp("planted")
    root = write_tree(tmp / "data", per_class=16)
    odd = np.random.default_rng(0).normal(245, 5, (30, 120)).clip(0, 255).astype(np.uint8)
    Image.fromarray(odd).save(root / "Covid" / "odd.png")
    shutil.copy(root / "Covid" / "img003.png", root / "Covid" / "copy.png")
    ds = _load(root, tmp)
    return root, ds, audit(ds)


@pytest.mark.slow  # scans, trains or scores whole folders: the full suite runs it
def test_datalab_flags_a_planted_odd_film_as_the_most_unusual(planted, tmp_path, capsys):
    root, _, result = planted
    outliers = result["datalab"]["outlier"]
    assert outliers["top"][0]["path"] == str(root / "Covid" / "odd.png") and 1 <= outliers["n"] <= 3
    assert cli("scan", root, "--quiet --img-size 16 --cache-dir", tmp_path / "cache") == 0
    assert "(cleanlab outliers), most unusual first: Covid/odd.png" in capsys.readouterr().out


@pytest.mark.slow  # scans, trains or scores whole folders: the full suite runs it
def test_datalab_flags_a_planted_copy_that_the_duplicate_search_grouped_too(planted):
    root, ds, result = planted
    near = result["datalab"]["near_duplicate"]
    assert {t["path"] for t in near["top"]} == {str(root / "Covid" / n) for n in ("copy.png", "img003.png")}
    assert (near["n"], near["pairs"], near["in_duplicate_groups"], near["new"]) == (2, 1, 1, [])
    notes = result["datalab"]["notes"]
    assert "unlike the rest" in notes[0] and not any("near-duplicate" in n for n in notes)  # no near-duplicate note
    assert audit(ds)["datalab"] == result["datalab"]  # seeded: the same findings again


def _drift_tree(root, order):
    """Two classes of 25 films whose grey level rises with ``order``: film ``k`` is named ``order[k]``."""
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for k, position in enumerate(order):
            film = np.random.default_rng([k, ord(name)]).normal(60 + 6 * k, 10, (32, 32))
            film = film.clip(0, 255).astype(np.uint8)
            Image.fromarray(film).save(root / name / f"{position:02d}.png")
    return root


@pytest.mark.slow  # scans, trains or scores whole folders: the full suite runs it
def test_datalab_calls_a_drifting_file_order_non_iid_and_a_shuffled_one_not(tmp_path):
    state = np.random.get_state()
    drifting = audit(_load(_drift_tree(tmp_path / "drift", range(25)), tmp_path))["datalab"]["non_iid"]
    shuffled_order = np.random.default_rng(0).permutation(25)
    shuffled = audit(_load(_drift_tree(tmp_path / "shuffled", shuffled_order), tmp_path))["datalab"]["non_iid"]
    assert max(drifting["within"].values()) < 0.001 and drifting["p_value"] < 0.001
    assert min(shuffled["within"].values()) > 0.5  # the whole set, one class after the other, is not shuffled
    assert np.array_equal(np.random.get_state()[1], state[1])  # the test reseeds numpy; put back


def test_the_spurious_correlation_score_is_zero_for_a_property_that_gives_the_class():
    """cleanlab's scorer is a private module: this pins what it computes, against the largest
    class's share (here 0.5, class 1's)."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [15, 30, 15])
    x = rng.normal(size=(60, len(FEATURES)))
    x[:, FEATURES.index("width")] = 500 + 300 * y
    x[:, FEATURES.index("bits")] = 8
    scores = spurious_scores(import_datalab()[1], x, y)
    assert (scores["threshold"], scores["majority"]) == (0.3, 0.5) and list(scores["scores"]) == list(FEATURES)
    assert scores["scores"]["width"] == 0.0 and scores["scores"]["bits"] is None
    noise = [s for f, s in scores["scores"].items() if f not in ("width", "bits")]
    assert min(noise) > 0.7 and max(noise) == 1.0


def test_importing_datalab_leaves_the_warning_filters_alone(monkeypatch):
    for name in [m for m in sys.modules if m == "cleanlab" or m.startswith("cleanlab.")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh: cleanlab silences warnings on first import
    filters = list(warnings.filters)
    import_datalab()
    assert warnings.filters == filters


@pytest.mark.slow  # scans, trains or scores whole folders: the full suite runs it
def test_the_audit_skips_datalab_with_a_note_without_its_extra(planted, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.startswith("cleanlab.datalab")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if Hugging Face datasets were not installed
    result = audit(_load(planted[0], tmp_path))
    assert (
        "install cleanlab's Datalab extra" in result["datalab"]["skipped"] and result["balanced_accuracy"] is not None
    )
    assert result["datalab"]["notes"] == [f"cleanlab's Datalab checks skipped ({result['datalab']['skipped']})"]
