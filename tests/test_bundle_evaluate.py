"""Bundle round trip and refusal of altered bundles; metrics against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import synthetic_image

from lungxray.bundle import BundleConfig, BundleError, BundleExtras, save_bundle
from lungxray.config import Preprocessing
from lungxray.metrics import bootstrap_ci, compute_metrics
from lungxray.models import create_model, get_spec
from lungxray.predictor import Predictor

HP = dict(get_spec("mlp").defaults)


def _bundle(tmp_path):
    torch.manual_seed(0)
    model = create_model("mlp", (1, 16, 16), 3, **HP).eval()
    config = {
        "classes": ["covid", "normal", "viral_pneumonia"],
        "model": {"name": "mlp", "hyperparameters": HP, "input_shape": [1, 16, 16]},
        "preprocessing": {"img_size": 16},
    }
    return model, save_bundle(tmp_path / "model", model, config, BundleExtras(metrics={"accuracy": 1.0}))


def test_the_bundle_config_writes_and_reads_itself(tmp_path):
    prep = Preprocessing(img_size=16, crop_borders=True, equalize="hist")
    written = BundleConfig(("covid", "normal"), {"name": "mlp", "members": 1, "hyperparameters": HP,
                           "input_shape": [1, 16, 16]}, prep, {"epochs": 3}, {"temperature": 1.5})  # fmt: skip
    saved = written.to_json()
    assert list(saved) == ["classes", "model", "preprocessing", "training", "calibration", "training_data"]
    assert saved["preprocessing"] == prep.to_json() and saved["classes"] == ["covid", "normal"]
    torch.manual_seed(0)
    folder = save_bundle(tmp_path / "model", create_model("mlp", (1, 16, 16), 2, **HP), saved)
    predictor = Predictor(folder)
    assert predictor.bundle_config_ == written and BundleConfig.from_json(saved) == written
    assert (predictor.preprocessing_, predictor.temperature_, predictor.classes_) == (prep, 1.5, ["covid", "normal"])


def test_reloaded_bundle_predicts_identically(tmp_path):
    model, folder = _bundle(tmp_path)
    images = np.stack([synthetic_image(c, i, 16) for c in range(3) for i in range(4)])
    with torch.no_grad():
        logits = model(torch.from_numpy(images).unsqueeze(1).float() / 255)  # the same float32 logits
        expected = torch.softmax(logits.double(), 1).numpy()  # probabilities in float64, as served
    got = Predictor(folder).predict_arrays(images)
    assert got.dtype == np.float64 and np.array_equal(got, expected)
    assert sorted(p.name for p in folder.iterdir()) == [
        "checksums.json",
        "config.json",
        "metrics.json",
        "model.safetensors",
    ]
    assert json.loads((folder / "config.json").read_text())["library_version"]


def test_altered_weights_are_refused(tmp_path):
    _, folder = _bundle(tmp_path)
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="does not match its checksum"):
        Predictor(folder)


def test_missing_or_edited_config_is_refused(tmp_path):
    _, folder = _bundle(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["classes"] = ["a", "b", "c"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="config.json does not match"):
        Predictor(folder)
    (folder / "config.json").unlink()
    with pytest.raises(BundleError, match="config.json is missing"):
        Predictor(folder)


def test_not_a_bundle_and_no_overwrite(tmp_path):
    with pytest.raises(BundleError, match="not a lungxray model bundle"):
        Predictor(tmp_path)
    model, folder = _bundle(tmp_path)
    with pytest.raises(FileExistsError, match="already holds a model") as info:
        save_bundle(folder, model, {})
    assert "--force" in info.value.hint


def test_predict_files_reports_bad_files(tmp_path):
    from PIL import Image

    _, folder = _bundle(tmp_path)
    good = tmp_path / "good.png"
    Image.fromarray(synthetic_image(0, 0, 40)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a broken")
    results = Predictor(folder).predict_files([good, bad])
    assert results[0]["class"] in ("covid", "normal", "viral_pneumonia")
    assert sum(results[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert "error" in results[1] and "class" not in results[1]


def test_metrics_match_a_hand_computed_case():
    y = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array(
        [[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.1, 0.2, 0.7]]
    )
    m = compute_metrics(y, probs, ["a", "b", "c"])
    assert m["n"] == 6 and m["accuracy"] == pytest.approx(5 / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert {k: v for k, v in m["per_class"]["b"].items() if k not in ("specificity", "auroc", "auroc_vs_chance")} == {
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": pytest.approx(0.8),
        "support": 2,
    }
    assert m["per_class"]["a"]["recall"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.8 + 1.0) / 3)
    expected_loss = -np.mean(np.log([0.8, 0.6, 0.2, 0.8, 0.6, 0.7]))
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_figures_sit_beside_what_always_answering_the_majority_scores():
    y = np.array([0, 0, 0, 0, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1]] * 4 + [[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]])  # b is called a
    m = compute_metrics(y, probs, ["a", "b", "c"], resamples=200)
    assert m["accuracy"] == pytest.approx(5 / 6) and m["balanced_accuracy"] == pytest.approx((1 + 0 + 1) / 3)
    assert m["baseline"] == {
        "majority_class": "a",
        "accuracy": pytest.approx(4 / 6),
        "balanced_accuracy": pytest.approx(1 / 3),
        "macro_f1": pytest.approx((2 * (4 / 6) / (1 + 4 / 6)) / 3),  # a's F1 when every image is called a
        "auroc": 0.5,
    }


def test_proportions_at_zero_and_at_all_get_exact_intervals_that_do_not_collapse():
    from lungxray.metrics import proportion_ci

    y = np.array([0] * 18 + [1] * 5)
    probs = np.array([[0.9, 0.1]] * 18 + [[0.8, 0.2]] * 5)  # every a right, every b wrong
    m = compute_metrics(y, probs, ["a", "b"], resamples=200)
    low, high = m["ci95"]["recall/a"]
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 18), abs=1e-9)  # 18 of 18: [0.815, 1]
    low, high = m["ci95"]["recall/b"]
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 5), abs=1e-9)  # 0 of 5: [0, 0.522]
    assert m["ci95"]["accuracy"] == proportion_ci(18, 23) and m["ci95"]["specificity/b"] == m["ci95"]["recall/a"]
    assert proportion_ci(0, 0) is None
    assert m["intervals"]["accuracy, recall/<class>, specificity/<class>"].startswith("Clopper-Pearson")


def test_an_auroc_is_called_better_than_chance_only_when_its_interval_clears_one_half():
    from lungxray.metrics import against_chance

    assert against_chance(0.62, [0.51, 0.73]) == "better than chance"
    assert against_chance(0.48, [0.40, 0.56]) == "no better than chance"
    assert against_chance(0.30, [0.20, 0.45]) == "worse than chance"
    assert against_chance(None, None) is None
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    noise = rng.random(80)
    m = compute_metrics(y, np.stack([1 - noise, noise], axis=1), ["a", "b"], resamples=500)
    assert m["per_class"]["a"]["auroc_vs_chance"] == "no better than chance"  # scores unrelated to labels
    separated = np.stack([1 - y * 0.8 - 0.1, y * 0.8 + 0.1], axis=1)
    assert compute_metrics(y, separated, ["a", "b"], resamples=500)["per_class"]["b"]["auroc_vs_chance"] == (
        "better than chance"
    )


def test_metrics_with_only_some_classes_present():
    y = np.array([0, 0, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.1, 0.7], [0.1, 0.8, 0.1]])
    m = compute_metrics(y, probs, ["covid", "normal", "viral_pneumonia"])
    assert m["per_class"]["viral_pneumonia"]["support"] == 0
    assert m["confusion_matrix"] == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1.0) / 2)  # over the classes present


def test_auroc_and_specificity_match_a_hand_computed_case():
    y = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array(
        [[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.1, 0.2, 0.7]]
    )
    m = compute_metrics(y, probs, ["a", "b", "c"], resamples=0)
    # class a: scores of positives .8 .6 .2, of negatives .1 .3 .1 -> 8 of 9 pairs ranked right
    assert m["per_class"]["a"]["auroc"] == pytest.approx(8 / 9)
    assert m["per_class"]["c"]["auroc"] == 1.0
    # class b: 1 false positive among 4 negatives
    assert m["per_class"]["b"]["specificity"] == pytest.approx(3 / 4)
    assert m["per_class"]["a"]["specificity"] == 1.0
    assert m["macro_auroc"] == pytest.approx(np.mean([m["per_class"][c]["auroc"] for c in "abc"]))
    assert "ci95" not in m


def test_bootstrap_ci_matches_the_binomial_case():
    # 80 of 100 right: resampled accuracy is Binomial(100, 0.8) / 100, whose 2.5% and 97.5%
    # quantiles are 0.72 and 0.88 (scipy.stats.binom.ppf).
    y = np.zeros(100, dtype=np.int64)
    probs = np.zeros((100, 2))
    probs[:80, 0], probs[80:, 1] = 1.0, 1.0
    ci = bootstrap_ci(y, probs, ["x", "y"], resamples=10_000, seed=0)
    assert ci["accuracy"] == pytest.approx([0.72, 0.88])
    assert ci["recall/x"] == pytest.approx([0.72, 0.88])
    assert ci["auroc/x"] is None  # one class only: AUROC undefined, an interval of None, not a crash
    assert bootstrap_ci(y, probs, ["x", "y"], resamples=500, seed=3) == bootstrap_ci(
        y, probs, ["x", "y"], resamples=500, seed=3
    )  # seeded


def test_vectorised_resample_metrics_equal_sklearn_on_the_data_itself():
    from lungxray.metrics import _resampled_metrics

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    probs = rng.dirichlet([1, 1, 1], 60)
    probs[np.arange(60), y] += rng.uniform(0, 1, 60)
    probs /= probs.sum(1, keepdims=True)
    m = compute_metrics(y, probs, ["a", "b", "c"], resamples=0)
    same = _resampled_metrics(y, probs, [0, 1, 2], np.arange(60)[None])  # the identity "resample"
    assert same["accuracy"][0] == pytest.approx(m["accuracy"])
    assert same["macro_f1"][0] == pytest.approx(m["macro_f1"])
    assert same["macro_auroc"][0] == pytest.approx(m["macro_auroc"])
    for i, c in enumerate("abc"):
        assert same[f"recall/{i}"][0] == pytest.approx(m["per_class"][c]["recall"])
        assert same[f"specificity/{i}"][0] == pytest.approx(m["per_class"][c]["specificity"])
        assert same[f"auroc/{i}"][0] == pytest.approx(m["per_class"][c]["auroc"])


def test_temperature_scaling_lowers_ece_on_an_over_confident_model():
    from lungxray.metrics import expected_calibration_error, fit_temperature, softmax

    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 1.5, (3000, 3))  # a calibrated model's logits ...
    y = np.array([rng.choice(3, p=p) for p in softmax(true_logits)])  # ... and labels drawn from them
    over = 4.0 * true_logits  # the same ranking, 4x too sure of itself
    before = expected_calibration_error(y, softmax(over))
    temperature = fit_temperature(over, y)
    after = expected_calibration_error(y, softmax(over, temperature))
    assert temperature == pytest.approx(4.0, rel=0.15)
    assert before > 0.15 and after < 0.05 and after < before / 3
    assert np.array_equal(softmax(over).argmax(1), softmax(over, temperature).argmax(1))  # accuracy untouched


def test_calibration_applies_a_temperature_that_helps_and_refuses_one_that_cannot():
    from lungxray.metrics import calibrate, softmax

    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 1.5, (400, 3))
    y = np.array([rng.choice(3, p=p) for p in softmax(true_logits)])
    over = calibrate(4.0 * true_logits, y)  # over-confident: scaling helps and is applied
    assert over["applied"] and over["temperature"] == pytest.approx(4.0, rel=0.3)
    assert over["val_loss_after"] < over["val_loss_before"]
    # a separable validation set with no error: the fit runs to sharpen without limit; T stays 1
    separable = np.eye(3)[np.arange(60) % 3] * 3.0  # (60, 3), every image right, top probability 0.91
    refused = calibrate(separable, np.arange(60) % 3)
    assert refused["fitted_temperature"] < 0.1  # towards the lower bound of the search, 0.05
    assert not refused["applied"] and refused["temperature"] == 1.0 and "bound" in refused["reason"]
    assert refused["val_loss_after"] == refused["val_loss_before"]
    # a calibrated model: the fitted T changes the log-loss by less than the margin, so it is not used
    calibrated = calibrate(true_logits, y)
    assert not calibrated["applied"] and "scored on the rest" in calibrated["reason"]


def test_ece_of_a_hand_computed_case():
    from lungxray.metrics import expected_calibration_error

    # two images at confidence 0.9 (one right), two at 0.6 (both right): |0.5-0.9|/2 + |1-0.6|/2 = 0.4
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 1, 0, 0])
    assert expected_calibration_error(y, probs) == pytest.approx(0.4)


def test_a_bundle_is_exactly_its_manifest(tmp_path):
    """Unlisted files (a planted model.onnx or metrics.json), names pointing outside, and a
    malformed manifest refuse the bundle, naming the file."""
    _, folder = _bundle(tmp_path)
    (folder / "model.onnx").write_bytes(b"a constant-logit graph")
    with pytest.raises(BundleError, match="model.onnx, which checksums.json does not list"):
        Predictor(folder)
    (folder / "model.onnx").unlink()
    Predictor(folder)  # clean again
    sums = json.loads((folder / "checksums.json").read_text())
    for bad in ({**sums, "../outside.json": "0" * 64}, {**sums, "/etc/hostname": "0" * 64}, list(sums)):
        (folder / "checksums.json").write_text(json.dumps(bad))
        with pytest.raises(BundleError, match="not a file of the bundle folder|not an object of file name"):
            Predictor(folder)
    (folder / "checksums.json").write_text(json.dumps(sums))
    (folder / "metrics.json").unlink()  # listed but missing
    with pytest.raises(BundleError, match="metrics.json is missing"):
        Predictor(folder)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"calibration": {"temperature": 0}}, "temperature must be a number in 0.05..20"),
        ({"calibration": {"temperature": -1}}, "temperature must be a number in 0.05..20"),
        ({"calibration": {"temperature": float("nan")}}, "temperature must be a number in 0.05..20"),
        ({"calibration": {"temperature": 1e-300}}, "temperature must be a number in 0.05..20, got 1e-300"),
        ({"calibration": {"temperature": 1e300}}, "temperature must be a number in 0.05..20, got 1e"),
        ({"ood": {"method": "input-mahalanobis-v1", "threshold": 5e-324}}, "ood.threshold must be a distance in"),
        ({"ood": {"method": "input-mahalanobis-v1", "threshold": 1e300}}, "ood.threshold must be a distance in"),
        ({"ood": {"method": "input-mahalanobis-v1", "threshold": float("inf")}}, "ood.threshold must be a distance"),
        ({"preprocessing": {"img_size": 40000}}, "img_size must be a whole number in 8..1024"),
        ({"model": {"name": "mlp", "hyperparameters": {**HP, "layer_1": 100000}, "input_shape": [1, 16, 16]}},
         "layer_1 = 100000 is outside 1..4096"),
        ({"model": {"name": "mlp", "hyperparameters": {**HP, "depth": 3}, "input_shape": [1, 16, 16]}},
         "depth is not a hyperparameter of mlp"),
        ({"classes": "covid"}, "classes must be a list"),
        ({"model": None}, "model must be an object"),
        ({"model": {"name": "nope", "hyperparameters": HP, "input_shape": [1, 16, 16]}}, "model.name must be one of"),
        ({"calibration": None}, "calibration must be an object"),
        ({"preprocessing": "x"}, "preprocessing must be an object"),
        ({"model": {"name": "mlp", "hyperparameters": {**HP, "layer_1": 8.5}, "input_shape": [1, 16, 16]}},
         "layer_1 = 8.5 is outside 1..4096 or not whole"),
        ({"preprocessing": {"img_size": 1024}, "model": {"name": "mlp", "members": 32, "input_shape": [1, 1024, 1024],
          "hyperparameters": {**HP, "layer_1": 4096}}}, "parameters, more than the 200,000,000"),
    ],
)  # fmt: skip
def test_bundle_values_are_validated_before_anything_is_built(tmp_path, change, message):
    """A config.json with its checksum recomputed is still checked: the checksum proves integrity,
    not that the values are sane."""
    from lungxray.bundle import write_checksums

    _, folder = _bundle(tmp_path)
    config = json.loads((folder / "config.json").read_text()) | change
    (folder / "config.json").write_text(json.dumps(config))
    write_checksums(folder)
    with pytest.raises(BundleError, match=message):
        Predictor(folder)


def test_a_failed_save_leaves_no_partial_bundle_and_the_rerun_works(tmp_path, monkeypatch):
    """A full disk while writing the weights: nothing half-written is left,
    the old bundle (if any) stays whole, and the next save succeeds."""
    import errno

    import lungxray.bundle as bundle_module

    model, folder = _bundle(tmp_path)
    before = sorted(p.name for p in folder.iterdir())

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bundle_module, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_bundle(folder, model, {}, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == before and Predictor(folder)  # the old one, whole
    with pytest.raises(OSError):
        save_bundle(tmp_path / "fresh", model, {})
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    monkeypatch.undo()
    _, again = _bundle(tmp_path / "second")
    assert Predictor(again).classes_ == ["covid", "normal", "viral_pneumonia"]


def test_an_empty_model_folder_left_by_a_crash_does_not_block_a_rerun(tmp_path):
    from lungxray.runfolder import refuse_to_replace

    (tmp_path / "model").mkdir()
    refuse_to_replace(tmp_path, "model", force=False, what="a model")  # nothing to lose: no error
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a model"):
        refuse_to_replace(tmp_path, "model", force=False, what="a model")


def test_a_failed_metrics_update_leaves_the_bundle_whole(tmp_path, monkeypatch):
    """A full disk while attach_metrics writes: the bundle loads as before."""
    import errno

    import lungxray.bundle as bundle_module
    from lungxray.bundle import attach_metrics

    _, folder = _bundle(tmp_path)
    real_write = bundle_module.write_text

    def full_disk(path, text):
        if path.name == "checksums.json":  # metrics.json already written: the worst moment
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, text)

    monkeypatch.setattr(bundle_module, "write_text", full_disk)
    with pytest.raises(OSError):
        attach_metrics(folder, {"accuracy": 0.5})
    monkeypatch.undo()
    assert json.loads((folder / "metrics.json").read_text()) == {"accuracy": 1.0}
    assert Predictor(folder).metrics_ == {"accuracy": 1.0}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_full_disk_while_safetensors_writes_is_one_bundle_error_naming_the_folder(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError (its write is in Rust, so the test
    raises what it raises): the user reads the bundle's folder, the reason and a hint."""
    from safetensors import SafetensorError

    import lungxray.bundle as bundle_module

    model, _ = _bundle(tmp_path)

    def full_disk(tensors, filename, metadata=None):
        raise SafetensorError(
            f'Error while serializing: I/O error: No space left on device (os error 28) at path "{filename}.tmpXy"'
        )

    monkeypatch.setattr(bundle_module, "save_file", full_disk)
    with pytest.raises(BundleError) as info:
        save_bundle(tmp_path / "fresh", model, {})
    assert str(info.value) == (
        f"cannot write the model bundle {tmp_path / 'fresh'}: I/O error: No space left on device (os error 28)"
    )
    assert "free space" in info.value.hint and "--out" in info.value.hint
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_a_listed_file_larger_than_memory_is_checked_in_chunks(tmp_path, monkeypatch):
    """Reading a listed file whole would raise MemoryError when it is larger than memory: the
    checksum is computed from chunks, so an oversized (appended-to) file reads as altered."""
    from pathlib import Path

    from lungxray.bundle import verify_bundle

    _, folder = _bundle(tmp_path)
    with open(folder / "model.safetensors", "ab") as f:
        f.truncate(f.tell() + 64 * 2**20)  # 64 MiB more, stored sparse

    def out_of_memory(self):
        raise MemoryError  # what reading a file far larger than memory whole does

    monkeypatch.setattr(Path, "read_bytes", out_of_memory)
    with pytest.raises(BundleError, match="model.safetensors does not match its checksum"):
        verify_bundle(folder)


def test_temperature_range_is_the_one_lungxray_fits_in():
    from lungxray.bundle import TEMPERATURE_RANGE
    from lungxray.metrics import TEMPERATURE_BOUNDS

    assert TEMPERATURE_RANGE == TEMPERATURE_BOUNDS


def _bundle_with_ood(tmp_path):
    """``_bundle``'s model saved with an out-of-distribution score fitted on synthetic films, and the films."""
    from lungxray.ood import fit_ood

    model, _ = _bundle(tmp_path / "plain")
    images = np.stack([synthetic_image(c, i, 16) for c in range(3) for i in range(8)])
    config = {
        "classes": ["covid", "normal", "viral_pneumonia"],
        "model": {"name": "mlp", "hyperparameters": HP, "input_shape": [1, 16, 16]},
        "preprocessing": {"img_size": 16},
    }
    return save_bundle(tmp_path / "model", model, config, BundleExtras(ood=fit_ood(images[::2], images[1::2]))), images


def test_an_ood_precision_of_zero_is_refused(tmp_path):
    """A precision matrix of zeros (checksum recomputed) would score every image 0 and flag none:
    the bundle is refused, saying so."""
    from safetensors.numpy import load_file, save_file

    from lungxray.bundle import write_checksums

    folder, _ = _bundle_with_ood(tmp_path)
    assert Predictor(folder).ood_ is not None
    tensors = load_file(str(folder / "ood.safetensors"))
    for name, broken in (("precision", 0.0), ("location", np.nan)):
        save_file({**tensors, name: np.full_like(tensors[name], broken)}, str(folder / "ood.safetensors"))
        write_checksums(folder)
        with pytest.raises(BundleError, match="ood.safetensors cannot score images: (its precision|it holds)"):
            Predictor(folder)


def test_predict_on_arrays_gives_the_ood_fields_as_on_files(tmp_path):
    """predict(array) answers as predict(files) does, out-of-distribution score included (but the path)."""
    from PIL import Image

    folder, images = _bundle_with_ood(tmp_path)
    predictor = Predictor(folder)
    paths = []
    for k, image in enumerate(images[:4]):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(image).save(paths[-1])
    on_files = predictor.predict(paths)
    on_arrays = predictor.predict(images[:4])
    assert [{k: v for k, v in r.items() if k != "path"} for r in on_files] == on_arrays
    assert all(isinstance(r["ood_score"], float) and isinstance(r["in_distribution"], bool) for r in on_arrays)


def _files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.slow  # scans, trains or scores whole folders: the full suite runs it
def test_evaluate_and_explain_refuse_an_out_in_a_bundle_or_in_data_naming_both(tmp_path, capsys):
    """Written into a bundle, files make it refuse to load; written into DATA, plots and overlays
    become images on its next scan. Both refused before anything is written, in one line each."""
    from conftest import cli, write_tree

    _, bundle = _bundle(tmp_path)
    data = write_tree(tmp_path / "data", per_class=3)
    image = data / "Covid" / "img000.png"
    before, data_before = _files(bundle), _files(data)
    refusals = [
        (["evaluate", bundle, data, "--out", bundle, "--force"], f"--out {bundle} is the model bundle", bundle),
        (["evaluate", bundle, data, "--out", bundle / "eval"], f"lies inside the model bundle {bundle.resolve()}",
         bundle),
        (["explain", bundle, image, "--out", bundle], f"--out {bundle} is the model bundle", bundle),
        (["explain", bundle, image, "--out", bundle / "x"], "lies inside the model bundle", bundle),
        (["evaluate", bundle, data, "--out", data / "eval"], f"lies inside the dataset folder {data}", data),
        (["explain", bundle, data, "--out", data / "Covid"], f"lies inside the dataset folder {data}", data),
        (["run", data, "--out", data / "run"], f"lies inside the dataset folder {data}", data),
        (["cv", data, "--out", data], f"--out {data} lies inside the dataset folder {data}", data),
    ]  # fmt: skip
    for args, says, named in refusals:
        assert cli(*args) == 2, args
        err = capsys.readouterr().err
        assert says in err and f"hint: choose an --out outside {named}" in err, (args, err)
    assert _files(bundle) == before and Predictor(bundle)  # untouched, and still loads
    assert _files(data) == data_before


@pytest.mark.slow  # scans, trains or scores whole folders: the full suite runs it
def test_explain_waits_its_turn_for_a_run_folder_another_process_writes(tmp_path, capsys):
    from conftest import cli, write_tree

    from lungxray.runfolder import writer_lock

    _, bundle = _bundle(tmp_path)
    image = write_tree(tmp_path / "data", per_class=1) / "Covid" / "img000.png"
    with writer_lock(tmp_path / "run"):  # another writer (run, evaluate) holds it
        assert cli("explain", bundle, image, "--out", tmp_path / "run") == 2
    assert "is being written by another lungxray process" in capsys.readouterr().err
    assert not (tmp_path / "run" / "explain.json").exists()
    assert cli("explain", bundle, image, "--out", tmp_path / "run") == 0  # free again


def test_the_run_folder_knows_the_bundles_manifest_name():
    """runfolder cannot import bundle (a layer above it): the name it recognises a bundle by is bundle's."""
    from lungxray.bundle import CHECKSUMS
    from lungxray.runfolder import BUNDLE_MARK

    assert BUNDLE_MARK == CHECKSUMS
