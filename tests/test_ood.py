"""The out-of-distribution score, the preprocessing options through the bundle, scanner
augmentation, and external validation (`run --external`, the report's Other hospitals section)."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, cli, synthetic_image, write_tree
from PIL import Image

from lungxray.augment import BatchAugment
from lungxray.bundle import CHECKSUMS, CONFIG, OOD, write_checksums
from lungxray.config import AugmentConfig, DataConfig, Preprocessing, SplitConfig, TrainConfig
from lungxray.decode import crop_borders, decode, equalize
from lungxray.evaluation import evaluate_split
from lungxray.job import Job
from lungxray.metrics import compute_metrics
from lungxray.ood import fit_ood
from lungxray.pipeline import prepare, train_stage
from lungxray.predictor import Predictor
from lungxray.report_external import against_chance, gap_in_words


def _films(n: int, start: int, size: int = 32) -> np.ndarray:
    """Training-like images of all three classes, ``n`` per class."""
    return np.stack([synthetic_image(c, i, size) for c in range(3) for i in range(start, start + n)])


def test_ood_score_is_higher_on_foreign_images_than_on_held_out_training_like_images():
    train, val, held_out = _films(40, 0), _films(20, 100), _films(30, 500)
    score = fit_ood(train, val)
    assert score.info["threshold_from"].startswith("out-of-sample") and score.info["n_fit"] == 120
    assert score.info["n_threshold"] == 180  # training and validation images, cross-fitted
    rng = np.random.default_rng(0)
    foreign = {
        "inverted": 255 - held_out,
        "rotated 90": np.rot90(held_out, axes=(1, 2)).copy(),
        "flat": np.full_like(held_out, 128),
        "noise": rng.integers(0, 256, held_out.shape, dtype=np.uint8),
    }
    mine = score.score(held_out)
    # About 5% by design; on these toy images the distances concentrate near the threshold, so a
    # held-out sample of 90 may land anywhere in 5-12%: the bound leaves room for that.
    assert (mine > 1).mean() <= 0.15
    for kind, images in foreign.items():
        theirs = score.score(images)
        assert np.median(theirs) > np.percentile(mine, 95), kind
        assert (theirs > 1).mean() >= 0.8, kind  # the real films' figures: BENCHMARKS.md
    # deterministic: the same fit gives the same numbers
    assert np.array_equal(fit_ood(train, val).score(held_out), mine)


def test_a_tiny_training_set_uses_the_same_dimensions_in_every_fit():
    train, val = _films(3, 0), _films(2, 100)  # 9 + 6 images: fewer than 20 components allow
    score = fit_ood(train, val)
    assert score.info["components"] == len(score.components) <= 8
    assert score.info["n_threshold"] == 15 and np.isfinite(score.threshold) and score.threshold > 0
    assert (score.score(_films(3, 300)) > 1).mean() < 1  # not every new training-like image flagged


def test_crop_borders_removes_uniform_frames_per_side_and_never_crops_a_flat_image_away():
    film = np.random.default_rng(0).integers(40, 220, (60, 80)).astype(np.uint8)
    framed = np.zeros((100, 120), dtype=np.uint8)
    framed[:20] = 255  # a white band on top
    framed[20:80, 30:110] = film  # black on the left (30), the bottom (20) and the right (10)
    assert np.array_equal(crop_borders(framed), film)
    flat = np.full((50, 40), 7, dtype=np.uint8)
    assert crop_borders(flat).shape == flat.shape  # nothing varies: nothing to crop towards
    assert crop_borders(film).shape == film.shape


def test_equalize_spreads_grey_levels_and_leaves_flat_images_alone():
    low_contrast = (np.random.default_rng(0).integers(0, 20, (64, 64)) + 100).astype(np.uint8)
    for method in ("hist", "clahe"):
        out = equalize(low_contrast, method)
        assert out.dtype == np.uint8 and out.shape == low_contrast.shape
        assert out.std() > 3 * low_contrast.std(), method
    assert np.array_equal(equalize(low_contrast, "none"), low_contrast)
    flat = np.full((16, 16), 90, dtype=np.uint8)
    assert np.array_equal(equalize(flat, "clahe"), flat)


def _framed_tree(root: Path, per_class: int = 10) -> Path:
    """Class folders of synthetic films inside uneven black and white frames."""
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            canvas = np.zeros((48, 44), dtype=np.uint8)
            canvas[: 4 + i % 3] = 255
            canvas[8:40, 6:38] = synthetic_image(label, i)
            Image.fromarray(canvas).save(root / name / f"img{i:03d}.png")
    return root


PLAIN = {"crop_borders": False, "equalize": "none"}


@pytest.mark.parametrize(
    "options",
    [  # both options at once in the fast tier; each alone, and the defaults, in the slow one
        pytest.param({"equalize": "hist"}, marks=pytest.mark.slow),
        pytest.param({"equalize": "clahe"}, marks=pytest.mark.slow),
        pytest.param({"crop_borders": True}, marks=pytest.mark.slow),
        {"crop_borders": True, "equalize": "clahe"},
        pytest.param({}, marks=pytest.mark.slow),
    ],  # fmt: skip
    ids=["hist", "clahe", "crop", "crop+clahe", "defaults"],
)
def test_each_preprocessing_option_round_trips_through_the_bundle(tmp_path, options):
    data = _framed_tree(tmp_path / "data")
    data_cfg = DataConfig(Preprocessing(img_size=16, **options), cache_dir=tmp_path / "cache")
    job = Job(data, tmp_path / "run", "mlp", data_cfg, SplitConfig(val_fraction=0.2, test_fraction=0.2),
              train=TrainConfig(epochs=2), progress=False)  # fmt: skip
    ds, split = prepare(job, write=False)
    if options:  # the option changed what the model sees
        plain_cfg = DataConfig(Preprocessing(img_size=16, **PLAIN), cache_dir=tmp_path / "cache")
        plain = Job(data, None, "mlp", plain_cfg, progress=False)
        assert not np.array_equal(prepare(plain, write=False)[0].images, ds.images)
    hp = {"layer_1": 16, "layer_2": 16, "layer_3": 16, "learning_rate": 1e-3}
    _, folder = train_stage(job, ds, split, hp)
    predictor = Predictor(folder)
    config = json.loads((folder / CONFIG).read_text())
    assert config["preprocessing"]["equalize"] == data_cfg.preprocessing.equalize == options.get("equalize", "none")
    assert (
        config["preprocessing"]["crop_borders"]
        == data_cfg.preprocessing.crop_borders
        == options.get("crop_borders", False)
    )
    # load -> decode gives the array the model was trained on, file by file
    for sample, pixels in zip(ds.samples, ds.images, strict=True):
        assert np.array_equal(predictor.decode(sample.path.read_bytes()), pixels), sample.path
    # predict on the files = predict on the training-time arrays; the stored score = the one fitted now
    files = predictor.predict_files([s.path for s in ds.samples])
    probs = np.array([[r["probabilities"][c] for c in predictor.classes_] for r in files])
    np.testing.assert_allclose(probs, predictor.predict_arrays(ds.images), atol=1e-7)
    fitted = fit_ood(ds.images[split.train], ds.images[split.val])
    scores = np.array([r["ood_score"] for r in files])
    np.testing.assert_allclose(scores, fitted.score(ds.images), rtol=1e-12)
    assert [r["in_distribution"] for r in files] == [bool(s <= 1) for s in scores]


def test_an_older_bundle_without_the_score_loads_predicts_and_evaluates_with_null_fields(trained_run, tmp_path):
    data, run, root = trained_run
    old = tmp_path / "old"
    shutil.copytree(run / "model", old)
    config = json.loads((old / CONFIG).read_text())
    assert "ood" in config and (old / OOD).is_file()  # a bundle made now has it
    del config["ood"]
    (old / CONFIG).write_text(json.dumps(config))
    (old / OOD).unlink()
    (old / CHECKSUMS).unlink()
    write_checksums(old)
    predictor = Predictor(old)
    assert predictor.ood_ is None and predictor.ood_scores(np.zeros((2, 16, 16), np.uint8)) is None
    result = predictor.predict_files([next((data / "Covid").iterdir())])[0]
    assert result["ood_score"] is None and result["in_distribution"] is None and result["class"] in predictor.classes_
    job = Job(data, None, "mlp", DataConfig(Preprocessing(img_size=16), cache_dir=root / "cache"), progress=False)
    ds = prepare(job, write=False)[0]
    metrics = evaluate_split(predictor, ds, np.arange(6), tmp_path / "eval")
    assert metrics["ood"] is None and not (tmp_path / "eval" / "coverage.png").exists()
    images = json.loads((tmp_path / "eval" / "predictions.json").read_text())["images"]
    assert all(i["ood_score"] is None and i["in_distribution"] is None for i in images)
    # a config naming a score whose tensors are missing is refused
    config["ood"] = json.loads((run / "model" / CONFIG).read_text())["ood"]
    (old / CONFIG).write_text(json.dumps(config))
    write_checksums(old)
    with pytest.raises(Exception, match="ood.safetensors"):
        Predictor(old)


def test_evaluation_reports_the_flagged_share_and_metrics_on_accepted_images(trained_run):
    _, run, _ = trained_run
    metrics = json.loads((run / "metrics.json").read_text())
    ood = metrics["ood"]
    images = json.loads((run / "predictions.json").read_text())["images"]
    flags = [not i["in_distribution"] for i in images]
    assert ood["n_flagged"] == sum(flags) and ood["share_flagged"] == pytest.approx(sum(flags) / len(flags))
    assert all((i["ood_score"] > 1) == f for i, f in zip(images, flags, strict=True))
    assert ood["accepted"]["n"] == metrics["n"] - ood["n_flagged"]
    curve = ood["coverage_curve"]
    assert curve["coverage"][-1] == 1.0 and curve["accuracy"][-1] == pytest.approx(metrics["accuracy"], abs=1e-4)
    assert curve["score"] == sorted(curve["score"])
    assert (run / "coverage.png").stat().st_size > 5_000
    assert 'id="ood"' in (run / "report.html").read_text()


def test_scanner_augmentation_changes_texture_not_geometry_and_follows_its_seed():
    x = torch.from_numpy(_films(2, 0)).unsqueeze(1).float() / 255  # (6, 1, 32, 32)
    make = lambda seed, **kw: BatchAugment(AugmentConfig(**kw), torch.Generator().manual_seed(seed))  # noqa: E731
    out = make(0, enabled=False, scanner=True)(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, make(0, enabled=False, scanner=True)(x))
    assert not torch.equal(out, make(1, enabled=False, scanner=True)(x))
    assert 0.005 < (out - x).abs().mean() < 0.2  # changed, but still the same picture
    correlation = np.corrcoef(out.flatten().numpy(), x.flatten().numpy())[0, 1]
    assert correlation > 0.9  # no warp: every pixel stays where it was
    levels = [len(torch.unique(image)) for image in out]
    assert max(levels) <= 256 and min(levels) >= 2
    # without --scanner-augment the scanner step never runs: off means the input comes back
    assert torch.equal(make(0, enabled=False, scanner=False)(x), x)


def test_gap_in_words_names_recall_and_the_class_each_one_is_mistaken_for():
    internal = {"per_class": {"covid": {"recall": 0.93}, "normal": {"recall": 1.0}, "viral_pneumonia": {"recall": 0.8}}}
    external = {
        "classes": ["covid", "normal", "viral_pneumonia"],
        "confusion_matrix": [[262, 6, 1], [28, 8, 0], [0, 0, 0]],
        "per_class": {"covid": {"recall": 262 / 269}, "normal": {"recall": 8 / 36}, "viral_pneumonia": {"recall": 0}},
    }
    words = gap_in_words(internal, external, "elsewhere")
    assert "covid: 262 of 269 elsewhere images recognised (recall 0.97, against 0.93 on the internal test)" in words
    assert "6 of them called normal" in words
    assert "normal: 8 of 36 elsewhere images recognised (recall 0.22, against 1.00 on the internal test)" in words
    assert "28 of them called covid" in words
    assert "viral_pneumonia" not in words  # no external image of that class: nothing to say


@pytest.mark.slow  # a whole run; the fast tier checks the comparison through `evaluate` below
def test_external_figures_lead_with_what_a_model_that_knows_nothing_scores():
    y = np.array([0] * 30 + [1] * 6)
    probs = np.tile([[0.9, 0.1]], (36, 1))  # every image called a: accuracy 0.83 says nothing
    probs[30:32] = [0.4, 0.6]
    metrics = compute_metrics(y, probs, ["covid", "normal"], resamples=300)
    parts = against_chance(metrics)
    assert parts[0].startswith("balanced accuracy 0.67 (") and parts[0].endswith("always answering covid: 0.50)")
    assert parts[2].startswith("accuracy 0.89 (") and parts[2].endswith("always answering covid: 0.83)")
    assert parts[3].startswith("recall covid 1.00 (0.88-1.00), normal 0.33 (0.04-0.78)")  # exact, never 1.00-1.00
    assert parts[4].startswith("one-vs-rest AUROC (chance: 0.50) covid ")


@pytest.mark.slow  # a whole run with two external sets
def test_run_with_external_folders_evaluates_each_and_reports_other_hospitals(tmp_path, capsys):
    data = write_tree(tmp_path / "data", per_class=12)
    elsewhere = tmp_path / "elsewhere"
    for label, name in ((0, "covid"), (1, "normal")):  # other spellings, and only two of the classes
        (elsewhere / name).mkdir(parents=True)
        for i in range(6):
            image = synthetic_image(label, 300 + i)
            Image.fromarray(np.clip(image.astype(int) + 40, 0, 255).astype(np.uint8)).save(
                elsewhere / name / f"{i}.png"
            )
    out = tmp_path / "run"
    (tmp_path / "exclude.txt").write_text("Covid/img000.png\n")  # names DATA's files: not applied to the others
    exclude = ("--exclude", tmp_path / "exclude.txt")
    args = ("run", data, "--out", out, "--external", elsewhere, "--external", elsewhere, *exclude)
    flags = "--trials 1 --epochs 2 --quiet --model mlp --seed 3 --img-size 16 --cache-dir"
    code = cli(*args, flags, tmp_path / "cache")
    assert code == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("external elsewhere ")]
    assert len(printed) == 1 and printed[0].startswith("external elsewhere (12 images): balanced accuracy ")
    assert "always answering" in printed[0] and "one-vs-rest AUROC (chance: 0.50)" in printed[0]
    run = json.loads((out / "run.json").read_text())
    assert set(run["external"]) == {"elsewhere", "elsewhere-2"}
    first = run["external"]["elsewhere"]
    assert first["n"] == 12 and set(first["recall"]) == {"covid", "normal"}
    metrics = json.loads((out / "external" / "elsewhere" / "metrics.json").read_text())
    assert metrics["n"] == 12 and metrics["per_class"]["viral_pneumonia"]["support"] == 0
    assert metrics["accuracy"] == first["accuracy"] and metrics["ood"]["share_flagged"] == first["share_flagged"]
    predictions = json.loads((out / "external" / "elsewhere" / "predictions.json").read_text())["images"]
    assert len(predictions) == 12 and all("ood_score" in p for p in predictions)
    report = (out / "report.html").read_text()
    assert 'id="external"' in report and "Other hospitals" in report
    assert re.search(r"<td>seed</td>\s*<td>3</td>", report)  # written before run.json, the seed is known
    assert gap_in_words(json.loads((out / "metrics.json").read_text()), metrics, "elsewhere") in report.replace(
        "&#x27;", "'"
    )
    chance = "; ".join(against_chance(metrics))
    assert html.escape(chance) in report  # the top table and the section lead with it
    assert chance in (out / "model" / "MODEL_CARD.md").read_text()


def test_decode_repeats_the_options_for_any_file(tmp_path):
    canvas = np.zeros((40, 40), dtype=np.uint8)
    canvas[10:30, 5:35] = synthetic_image(1, 0)[:20, :30]
    path = tmp_path / "x.png"
    Image.fromarray(canvas).save(path)
    plain, cropped = (
        decode(path.read_bytes(), Preprocessing(img_size=16)),
        decode(path.read_bytes(), Preprocessing(img_size=16, crop_borders=True)),
    )
    assert not np.array_equal(plain, cropped)
    assert (plain[0] == 0).all() and not (cropped[0] == 0).all()  # the black band at the top is gone


def test_evaluate_on_other_data_sets_it_against_the_models_own_test(trained_run, tmp_path):
    _, run, root = trained_run
    other = write_tree(tmp_path / "other", per_class=5, start=500, classes={0: "Covid", 2: "Viral Pneumonia"})
    out = tmp_path / "eval"
    assert cli("evaluate", run / "model", other, "--out", out, "--cache-dir", root / "cache", "--quiet") == 0
    report = (out / "report.html").read_text().replace("&#x27;", "'")
    assert "Against the model's own test" in report and "images scored" in report
    own = json.loads((run / "model" / "metrics.json").read_text())
    theirs = json.loads((out / "metrics.json").read_text())
    assert gap_in_words(own, theirs, "other") in report


def test_an_external_folder_missing_or_with_a_class_the_model_lacks_fails_before_the_search(tmp_path):
    data = write_tree(tmp_path / "data", per_class=8)
    odd = tmp_path / "odd" / "tuberculosis"
    odd.mkdir(parents=True)
    Image.fromarray(synthetic_image(0, 1)).save(odd / "a.png")
    out = tmp_path / "run"
    flags = "--img-size 16 --trials 1 --epochs 1 --quiet --cache-dir"
    assert cli("run", data, "--out", out, "--external", odd.parent, flags, tmp_path / "cache") == 2
    assert not (out / "trials.json").exists() and not (out / "model").exists()
    # a folder that is not there fails at once, before any work
    assert cli("run", data, "--out", tmp_path / "other", "--external", tmp_path / "nowhere") == 2
    assert not (tmp_path / "other").exists()
