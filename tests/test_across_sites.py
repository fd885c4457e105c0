"""Training across sites: site-balanced draws, each site's grey levels equalised together, and the
class offsets fitted on a whole site the model did not train on (``--val-by site``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, cli, settings, synthetic_image, toy, write_tree
from PIL import Image
from skimage import exposure

from lungxray.bundle import validate_config
from lungxray.config import DataConfig, Preprocessing, SplitConfig
from lungxray.data import Dataset, Sample, load_dataset
from lungxray.decode import equalize_together, normalise_sites
from lungxray.errors import BundleError, ConfigError, DataError
from lungxray.metrics import fit_class_bias
from lungxray.splits import make_split, site_folds
from lungxray.train import FitData, fit, site_balanced_weights


def test_site_balanced_weights_draw_every_site_and_each_of_its_classes_equally():
    # site 0: 90 of class 0 and 10 of class 1; site 1: 5 of class 2 only
    y = torch.tensor([0] * 90 + [1] * 10 + [2] * 5)
    sites = torch.tensor([0] * 100 + [1] * 5)
    w = site_balanced_weights(y, sites)
    assert torch.isclose(w[sites == 0].sum(), torch.tensor(0.5, dtype=torch.float64))
    assert torch.isclose(w[sites == 1].sum(), torch.tensor(0.5, dtype=torch.float64))
    assert torch.isclose(w[y == 0].sum(), w[y == 1].sum())  # within site 0, both classes 0.25
    assert torch.allclose(w[y == 0], w[0]) and w[0] < w[95]  # alike within a (site, class), rarer ones weigh more
    draws = torch.multinomial(w, 20_000, replacement=True, generator=torch.Generator().manual_seed(0))
    share = torch.bincount(sites[draws], minlength=2).double() / 20_000
    assert torch.allclose(share, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=0.02)


@pytest.mark.slow  # scans, trains or scores whole folders: the full suite runs it
def test_site_balanced_training_draws_by_the_weights_and_needs_sites():
    x, y = toy(6)
    sites = torch.tensor([0, 1] * 9)
    cfg = settings("mlp", epochs=2, site_balanced=True)
    hp = {"layer_1": 16, "layer_2": 16, "layer_3": 16, "learning_rate": 1e-3}
    a = fit("mlp", hp, FitData((x, y), (x, y), 3, sites), cfg)
    b = fit("mlp", hp, FitData((x, y), (x, y), 3, sites), cfg)
    plain = fit("mlp", hp, FitData((x, y), (x, y), 3, sites), settings("mlp", epochs=2))
    assert a.history_dict() == b.history_dict()  # seeded draws: the same run twice
    assert a.history_dict()["train_loss"] != plain.history_dict()["train_loss"]  # another order of images
    with pytest.raises(ConfigError, match="--site-balanced needs every training image's site"):
        fit("mlp", hp, FitData((x, y), (x, y), 3), cfg)


def test_equalising_a_stack_together_is_scikit_images_equalisation_of_the_whole_stack():
    rng = np.random.default_rng(0)
    stack = np.clip(rng.normal(80, 20, (5, 16, 16)), 0, 255).astype(np.uint8)
    expected = np.rint(exposure.equalize_hist(stack, nbins=256) * 255).astype(np.uint8)
    assert np.abs(equalize_together(stack).astype(int) - expected.astype(int)).max() <= 1
    flat = np.full((2, 4, 4), 7, np.uint8)
    assert np.array_equal(equalize_together(flat), flat)


def test_each_site_is_mapped_from_its_own_grey_levels_and_a_siteless_image_alone():
    rng = np.random.default_rng(1)
    dark = np.clip(rng.normal(40, 10, (6, 16, 16)), 0, 255).astype(np.uint8)
    bright = np.clip(rng.normal(200, 10, (6, 16, 16)), 0, 255).astype(np.uint8)
    images = np.concatenate([dark, bright])
    out = normalise_sites(images, ["dark"] * 6 + ["bright"] * 5 + [None])
    assert abs(images[:6].mean() - images[6:11].mean()) > 150
    assert abs(out[:6].mean() - out[6:11].mean()) < 5  # the sites' exposure no longer tells them apart
    assert np.array_equal(out[:6], equalize_together(dark))
    assert np.array_equal(out[11], equalize_together(bright[5][None])[0])
    # order within a site is kept: the brighter of two films stays the brighter
    assert (out[0].mean() > out[1].mean()) == (dark[0].mean() > dark[1].mean())


def _shifted_tree(root: Path, shift: int, per_class: int, start: int) -> Path:
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            pixels = np.clip(synthetic_image(label, i).astype(int) + shift, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i:03d}.png")
    return root


def test_load_dataset_maps_each_site_after_finding_duplicates(tmp_path):
    a = _shifted_tree(tmp_path / "dark", -60, 4, 0)
    b = _shifted_tree(tmp_path / "bright", 60, 4, 20)
    cfg = DataConfig(Preprocessing(img_size=16, site_normalise=True), cache_dir=tmp_path / "cache")
    plain_cfg = DataConfig(Preprocessing(img_size=16), cache_dir=tmp_path / "cache")
    ds, plain = load_dataset([a, b], cfg, progress=False), load_dataset([a, b], plain_cfg, progress=False)
    sites = np.array([s.site for s in ds.samples])
    assert abs(plain.images[sites == "dark"].mean() - plain.images[sites == "bright"].mean()) > 80
    assert abs(ds.images[sites == "dark"].mean() - ds.images[sites == "bright"].mean()) < 10
    assert np.array_equal(ds.images[sites == "dark"], equalize_together(plain.images[sites == "dark"]))
    assert ds.groups.tolist() == plain.groups.tolist()


def test_class_offsets_undo_a_shift_of_the_logits_toward_one_class():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 200)
    logits = np.zeros((400, 3))
    logits[np.arange(400), y] = rng.normal(1.0, 1.0, 400)  # the true class a little ahead ...
    logits[:, 0] += 2.0  # ... and class 0 pushed up by a prior the held-out site does not share
    bias = fit_class_bias(logits, y)
    assert bias[2] == 0.0 and abs(bias[0] + bias[1]) < 1e-9  # the absent class stays put; the others sum to 0
    assert 1.6 < bias[1] - bias[0] < 2.4
    # what the model gives the absent class does not move the others, nor does the classes' order
    louder = logits.copy()
    louder[:, 2] += rng.normal(1.0, 0.5, 400)
    assert np.allclose(fit_class_bias(louder, y), bias, atol=1e-4)
    swapped = fit_class_bias(logits[:, [1, 0, 2]], 1 - y)
    assert np.allclose([swapped[1], swapped[0], swapped[2]], bias, atol=1e-4)
    recall = lambda z: [np.mean(z[y == k].argmax(1) == k) for k in (0, 1)]  # noqa: E731
    assert min(recall(logits)) < 0.2 and min(recall(logits + bias)) > 0.7
    assert fit_class_bias(logits[:200], y[:200]) is None  # one class: nothing to fit


def _fake(sites: list[str], labels: list[int]) -> Dataset:
    classes = ["a", "b", "c"]
    samples = [Sample(Path(f"/x/{i}.png"), classes[y], None, str(i), str(i), "0", group=i, site=s)
               for i, (s, y) in enumerate(zip(sites, labels, strict=True))]  # fmt: skip
    return Dataset(Path("/x"), "manifest", classes, samples, np.zeros((len(samples), 2, 2), np.uint8))


def test_validating_on_a_site_takes_one_whole_site_that_leaves_every_class_in_training():
    # t: the test; v1 and v2 have two classes each, and taking either leaves a, b and c in training;
    # only_c is the sole source of c, and one class only: never the val site
    sites = ["t"] * 6 + ["v1"] * 6 + ["v2"] * 6 + ["only_c"] * 6
    labels = [0, 1] * 3 + [0, 1] * 3 + [0, 1] * 3 + [2] * 6
    ds = _fake(sites, labels)
    chosen = set()
    for seed in range(8):
        split = make_split(ds, SplitConfig(test_site="t", val_by="site", seed=seed))
        val_sites = {sites[i] for i in split.val}
        assert len(val_sites) == 1 and val_sites == {split.val_site} and split.val_site in {"v1", "v2"}
        assert split.val_site not in {sites[i] for i in split.train} and len(split.val) == 6
        assert {labels[i] for i in split.train} == {0, 1, 2}
        chosen.add(split.val_site)
    assert chosen == {"v1", "v2"}  # the seed draws which
    folds = site_folds(_fake(sites[6:] + ["v3"] * 4, labels[6:] + [0, 2, 0, 2]), 0, val_by="site")
    assert all(f.val_site not in (None, f.site) for f in folds if f.site != "only_c")
    with pytest.raises(ConfigError, match="--val-by site validates on a site other than the test's"):
        make_split(ds, SplitConfig(val_by="site"))
    with pytest.raises(DataError, match="--val-by site found no site to validate on"):
        make_split(_fake(["t"] * 4 + ["u"] * 4, [0, 1] * 4), SplitConfig(test_site="t", val_by="site"))


def test_a_bundle_with_class_offsets_of_the_wrong_length_is_refused(trained_run):
    _, run, _ = trained_run
    config = json.loads((run / "model" / "config.json").read_text())
    validate_config(config, run / "model")  # as trained: valid
    config["calibration"]["class_bias"] = [0.0]
    with pytest.raises(BundleError, match="calibration.class_bias must list one finite number per class"):
        validate_config(config, run / "model")
    config["calibration"]["class_bias"] = [0.0, 1.5, float("nan")]
    with pytest.raises(BundleError, match="calibration.class_bias must list one finite number per class"):
        validate_config(config, run / "model")
    config["calibration"]["class_bias"] = [0.0, 1.5, -0.5]
    validate_config(config, run / "model")
    config["preprocessing"]["site_normalise"] = "yes"
    with pytest.raises(BundleError, match="site_normalise true or false"):
        validate_config(config, run / "model")


@pytest.mark.slow  # trains models end to end
def test_run_with_every_option_stores_them_and_predicts_with_the_offsets(tmp_path):
    roots = [write_tree(tmp_path / name, per_class=5, start=20 * k) for k, name in enumerate(("n", "s", "e"))]
    out = tmp_path / "run"
    code = cli("run", *roots, "--test-site n --val-by site --site-balanced --site-normalise --model mlp",
               "--img-size 16 --trials 1 --epochs 2 --final-epochs 3 --quiet --out", out,
               "--cache-dir", tmp_path / "cache")  # fmt: skip
    assert code == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["training"]["site_balanced"] is True and config["preprocessing"]["site_normalise"] is True
    bias = config["calibration"]["class_bias"]
    assert config["calibration"]["class_bias_fitted_on"] in {"s", "e"} and len(bias) == 3 and any(bias)
    splits = json.loads((out / "splits.json").read_text())
    assert splits["val_site"] == config["calibration"]["class_bias_fitted_on"]
    import lungxray

    predictor = lungxray.load(out / "model")
    image = np.array(Image.open(roots[0] / CLASSES[0] / "img000.png").convert("L").resize((16, 16), Image.BILINEAR))
    logits = predictor.predict_logits(image[None])
    expected = torch.softmax(torch.from_numpy(logits).double() + torch.tensor(bias), 1).numpy()
    assert np.allclose(predictor.predict_arrays(image[None], calibrated=False), expected)
    decoded = predictor.decode((roots[0] / CLASSES[0] / "img000.png").read_bytes(), "img000.png")
    assert np.array_equal(decoded, equalize_together(decoded_plain(roots[0] / CLASSES[0] / "img000.png"))[0])
    # evaluate scores a set with the same offsets, each of its sites' grey levels mapped together
    other = write_tree(tmp_path / "w", per_class=3, start=90)
    assert (
        cli("evaluate", out / "model", other, "--quiet --out", tmp_path / "eval", "--cache-dir", tmp_path / "cache")
        == 0
    )
    scored = json.loads((tmp_path / "eval" / "predictions.json").read_text())["images"]
    ds = load_dataset(other, DataConfig(Preprocessing(img_size=16, site_normalise=True), cache_dir=tmp_path / "cache"))
    row = next(i for i, s in enumerate(ds.samples) if str(s.path) == scored[0]["path"])
    assert np.allclose(
        list(scored[0]["uncalibrated"].values()), predictor.predict_arrays(ds.images[row][None], calibrated=False)[0]
    )


def decoded_plain(path: Path) -> np.ndarray:
    from lungxray.decode import decode

    return decode(path.read_bytes(), Preprocessing(img_size=16), path.name)[None]
