"""Multi-label learning: the masked binary cross-entropy and its gradient, fit and tune on several
findings per film with unknown entries, the ensemble's mean sigmoid, per-finding calibration and
thresholds, and a multi-label bundle's config.json written, read and refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import settings
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from lungxray.bundle import BundleConfig, BundleError, save_bundle, verify_bundle, write_checksums
from lungxray.config import Preprocessing, TuneConfig, resolve_tune
from lungxray.infer import predict_logits
from lungxray.losses import masked_bce, positive_weights
from lungxray.models import Ensemble, create_model, get_spec
from lungxray.multilabel_calibration import calibrate_multilabel
from lungxray.train import FitData, StepOptions, evaluate_loss, fit, train_one_epoch

FINDINGS = ("effusion", "cardiomegaly", "nodule")
NAN = float("nan")


def films(n: int, size: int = 16, seed: int = 0, unknown: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, 1, size, size), y (n, 3) float with NaN): each finding present with probability 0.4,
    each visible as its own change (a bright left third, a bright top band, a dark centre square)
    on a noisy film; a share ``unknown`` of the targets is NaN (the film still shows the finding)."""
    rng = np.random.default_rng(seed)
    truth = (rng.random((n, 3)) < 0.4).astype(np.float32)
    x = 0.35 + 0.08 * rng.standard_normal((n, size, size))
    third, quarter = size // 3, size // 4
    x[truth[:, 0] == 1, :, :third] += 0.2
    x[truth[:, 1] == 1, :quarter, :] += 0.2
    x[truth[:, 2] == 1, size // 2 - quarter // 2 : size // 2 + quarter // 2, third : 2 * third] -= 0.2
    y = truth.copy()
    y[rng.random((n, 3)) < unknown] = np.nan
    return torch.from_numpy(np.clip(x, 0, 1).astype(np.float32)).unsqueeze(1), torch.from_numpy(y)


def aurocs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Each finding's validation AUROC over its known entries."""
    probs = torch.sigmoid(predict_logits(model, x)).numpy()
    y = y.numpy()
    return [roc_auc_score(y[~np.isnan(y[:, f]), f], probs[~np.isnan(y[:, f]), f]) for f in range(y.shape[1])]


def test_the_masked_loss_is_the_mean_over_known_entries_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    y = torch.tensor([[1.0, NAN, 0.0], [NAN, 1.0, NAN]])
    # known: (2, 1), (0.5, 0), (3, 1): -log sigmoid(2), -log(1 - sigmoid(0.5)), -log sigmoid(3)
    by_hand = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(0.5)) + math.log1p(math.exp(-3.0))) / 3
    assert masked_bce(logits, y).item() == pytest.approx(by_hand, rel=1e-6)
    # positive weight w multiplies a positive entry's term; smoothing s makes a target y(1 - s) + s/2
    weighted = (2.0 * math.log1p(math.exp(-2.0)) + math.log1p(math.exp(0.5)) + 4.0 * math.log1p(math.exp(-3.0))) / 3
    assert masked_bce(logits, y, pos_weight=torch.tensor([2.0, 4.0, 1.0])).item() == pytest.approx(weighted, rel=1e-6)
    s = 0.2

    def term(z: float, t: float) -> float:
        return -(t * math.log(expit(z)) + (1 - t) * math.log(1 - expit(z)))

    smoothed = (term(2.0, 1 - s / 2) + term(0.5, s / 2) + term(3.0, 1 - s / 2)) / 3
    assert masked_bce(logits, y, smoothing=s).item() == pytest.approx(smoothed, rel=1e-6)
    # negatives / positives among known entries (a count of 0 counts as 1): 2 / 1, 1 / 2, 1 / 1
    yw = torch.tensor([[1.0, 1.0, NAN], [0.0, 1.0, NAN], [0.0, NAN, NAN]])
    assert positive_weights(yw).tolist() == [2.0, 0.5, 1.0]


def test_unknown_targets_get_no_gradient_and_an_all_unknown_batch_contributes_nothing():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], requires_grad=True)
    y = torch.tensor([[1.0, NAN, 0.0], [NAN, 1.0, NAN]])
    masked_bce(logits, y).backward()
    grad = logits.grad
    assert torch.isfinite(grad).all()
    assert grad[0, 1] == 0 and grad[1, 0] == 0 and grad[1, 2] == 0
    # a known entry's gradient is (sigmoid(z) - y) / known entries
    assert grad[0, 0].item() == pytest.approx((expit(2.0) - 1) / 3, rel=1e-5)
    assert grad[0, 2].item() == pytest.approx(expit(0.5) / 3, rel=1e-5)
    nothing = torch.zeros(2, 3, requires_grad=True)
    loss = masked_bce(nothing, torch.full((2, 3), NAN))
    loss.backward()
    assert loss.item() == 0 and torch.equal(nothing.grad, torch.zeros(2, 3))


def test_an_epoch_weighs_each_step_by_its_known_entries():
    """At learning rate 0 the epoch's loss and accuracy are those of the whole set, counted over its
    known entries, though some one-film steps know nothing (they add nothing)."""
    torch.manual_seed(0)
    x, y = films(12, size=8, seed=3, unknown=0.3)
    y[[2, 7]] = NAN  # two films with no known finding: two empty steps at batch size 1
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    options = StepOptions(loss=masked_bce)
    for batch in (1, 5):
        loss, accuracy = train_one_epoch(model, opt, x, y, batch, torch.Generator().manual_seed(0), options)
        logits = model(x).detach()
        assert loss == pytest.approx(masked_bce(logits, y).item(), rel=1e-6)
        known = ~torch.isnan(y)
        right = ((torch.sigmoid(logits) >= 0.5).float() == y)[known].float().mean().item()
        assert accuracy == pytest.approx(right) and evaluate_loss(model, x, y) == pytest.approx((loss, right))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_a_multilabel_fit_learns_every_finding_and_keeps_the_best_epoch(model):
    size = 16 if model == "mlp" else 32
    train, val = films(80, size, seed=1), films(60, size, seed=2)
    hp = dict(get_spec(model).defaults)
    if model == "cnn":
        hp.update(width=8, batch_size=16)
    extra = {"epochs": 15} if model == "mlp" else {"epochs": 8, "augment": False}
    result = fit(model, hp, FitData(train, val, 3), settings(model, hp, patience=0, **extra))
    assert min(aurocs(result.model, *val)) > 0.8
    losses = [h.val_loss for h in result.history]
    assert result.best_epoch == int(np.argmin(losses)) + 1
    # the kept model scores what validation saw: the masked BCE and the share decided right
    loss, accuracy = evaluate_loss(result.model, *val)
    assert loss == pytest.approx(result.best.val_loss, rel=1e-5) and accuracy == result.best.val_accuracy
    assert result.best.val_accuracy > 0.8


def test_class_weighted_smoothed_site_balanced_multilabel_fits_run_and_repeat():
    train, val = films(24, seed=4), films(12, seed=5)
    sites = torch.arange(24) % 2
    hp = dict(get_spec("mlp").defaults)
    cfg = settings("mlp", hp, epochs=2, class_weighted=True, label_smoothing=0.1, site_balanced=True)
    a = fit("mlp", hp, FitData(train, val, 3, sites), cfg)
    b = fit("mlp", hp, FitData(train, val, 3, sites), cfg)
    assert [h.train_loss for h in a.history] == [h.train_loss for h in b.history]
    assert all(math.isfinite(h.train_loss) and math.isfinite(h.val_loss) for h in a.history)
    plain = fit("mlp", hp, FitData(train, val, 3), settings("mlp", hp, epochs=2))
    assert [h.train_loss for h in plain.history] != [h.train_loss for h in a.history]


def test_targets_that_do_not_fit_the_findings_are_refused():
    train, val = films(12), films(6)
    hp = dict(get_spec("mlp").defaults)
    cfg = settings("mlp", hp, epochs=1)
    with pytest.raises(ValueError, match=r"expected float \(N, 4\)"):
        fit("mlp", hp, FitData(train, val, 4), cfg)
    with pytest.raises(ValueError, match="validation targets are all unknown"):
        fit("mlp", hp, FitData(train, (val[0], torch.full_like(val[1], NAN)), 3), cfg)
    with pytest.raises(ValueError, match="must be 0.0, 1.0 or NaN"):
        fit("mlp", hp, FitData((train[0], train[1] * 2), val, 3), cfg)


def test_members_average_each_findings_sigmoid():
    train, val = films(24, seed=6), films(12, seed=7)
    hp = dict(get_spec("mlp").defaults)
    result = fit("mlp", hp, FitData(train, val, 3), settings("mlp", hp, epochs=2, members=2))
    assert isinstance(result.model, Ensemble) and len(result.model.members) == 2
    x = val[0]
    with torch.no_grad():
        mean = torch.stack([torch.sigmoid(m(x)) for m in result.model.members]).mean(0)
        assert torch.allclose(torch.sigmoid(result.model(x)), mean, atol=1e-6)
        # not the softmax's mean: a film's findings need not add up to one
        assert not torch.allclose(torch.sigmoid(result.model(x)).sum(1), torch.ones(len(x)), atol=1e-2)
    rebuilt = create_model("mlp", (1, 16, 16), 3, members=2, task="multilabel", **hp)
    rebuilt.load_state_dict(result.model.state_dict())
    assert torch.equal(predict_logits(rebuilt, x), predict_logits(result.model, x))


def test_a_search_over_a_multilabel_set_records_the_masked_loss(tmp_path):
    from lungxray.tune import tune

    train, val = films(24, seed=8), films(12, seed=9)
    cfg = resolve_tune(TuneConfig(trials=2, jobs=1), get_spec("mlp").recipe)
    result = tune("mlp", FitData(train, val, 3), cfg, settings("mlp", epochs=2), f"sqlite:///{tmp_path / 's.db'}",
                  progress=False)  # fmt: skip
    trials = result.study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        assert t.value == t.user_attrs["val_loss"] and 0 < t.value < 2  # BCE of 3 findings, not NaN
        assert 0 <= t.user_attrs["val_accuracy"] <= 1
        assert sorted(t.intermediate_values) == [1, 2]


def test_calibration_scales_each_finding_only_where_it_helps_and_picks_thresholds_inside_0_1():
    rng = np.random.default_rng(0)
    n = 2000
    z = 1.5 * rng.standard_normal(n)
    y = np.full((n, 4), np.nan)
    logits = np.zeros((n, 4))
    y[:, 0] = rng.random(n) < expit(z)  # over-confident: logits three times the true log-odds
    logits[:, 0] = 3 * z
    z1 = 1.5 * rng.standard_normal(n)
    y[:, 1] = rng.random(n) < expit(z1)  # calibrated already
    logits[:, 1] = z1
    few = np.array([0.1, 0.2, 0.3, 0.4, 0.45, 0.6, 0.7, 0.8, 0.9, 0.95])  # 10 known, separable at 0.6
    y[:10, 2], logits[:10, 2] = few >= 0.6, np.log(few / (1 - few))
    y[:30, 3] = np.arange(30) % 2  # certain: a probability float64 rounds to 1 for every positive
    logits[:30, 3] = np.where(y[:30, 3] == 1, 800.0, -800.0)
    findings = ["over", "calibrated", "few", "sure"]
    result = calibrate_multilabel(logits, y, findings)
    t = result["temperatures"]
    assert 2.6 < t["over"] < 3.4 and result["per_finding"]["over"]["applied"]
    assert t["calibrated"] == 1.0 and "not a gain" in result["per_finding"]["calibrated"]["reason"]
    assert t["few"] == 1.0 and result["per_finding"]["few"]["reason"] == "fewer than 20 known validation entries"
    assert t["sure"] == 1.0 and "search bound" in result["per_finding"]["sure"]["reason"]
    thresholds = result["thresholds"]
    assert thresholds["few"] == pytest.approx(0.6)
    assert thresholds["sure"] == 1 - 1e-6  # Youden's point sits at p = 1.0, moved inside (0, 1)
    assert all(0 < v < 1 for v in thresholds.values())
    # a threshold applies to the calibrated probability: half the films are over it either way
    p_over = expit(logits[:, 0] / t["over"])
    assert 0.3 < np.mean(p_over >= thresholds["over"]) < 0.7
    assert result["method"] == "temperature scaling per finding" and result["threshold_rule"] == "youden"
    with pytest.raises(ValueError, match=r"must both be \(N, 4\)"):
        calibrate_multilabel(logits[:, :3], y, findings)


HP = dict(get_spec("mlp").defaults)
MODEL = {"name": "mlp", "members": 1, "hyperparameters": HP, "input_shape": [1, 16, 16]}


def _multilabel_bundle(tmp_path, members: int = 1):
    written = BundleConfig(
        FINDINGS,
        {**MODEL, "members": members},
        Preprocessing(img_size=16),
        calibration={"method": "temperature scaling per finding"},
        task="multilabel",
        thresholds={"effusion": 0.3, "cardiomegaly": 0.5, "nodule": 0.25},
        temperatures={"effusion": 1.5, "cardiomegaly": 1.0, "nodule": 0.8},
    )
    torch.manual_seed(0)
    model = create_model("mlp", (1, 16, 16), 3, members=members, task="multilabel", **HP)
    return written, save_bundle(tmp_path / "model", model, written.to_json())


def test_a_multilabel_bundle_config_round_trips_and_a_single_label_one_names_no_task(tmp_path):
    written, folder = _multilabel_bundle(tmp_path)
    config = verify_bundle(folder)
    assert config["task"] == "multilabel" and config["classes"] == list(FINDINGS)
    assert config["thresholds"] == {"effusion": 0.3, "cardiomegaly": 0.5, "nodule": 0.25}
    assert config["temperatures"] == {"effusion": 1.5, "cardiomegaly": 1.0, "nodule": 0.8}
    assert BundleConfig.from_json(config) == written
    single = BundleConfig(("covid", "normal"), MODEL, Preprocessing(img_size=16)).to_json()
    assert list(single) == ["classes", "model", "preprocessing", "training", "calibration", "training_data"]
    assert BundleConfig.from_json(single).task == "single"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"thresholds": {"effusion": 1.0, "cardiomegaly": 0.5, "nodule": 0.2}},
         r"thresholds\['effusion'\] must be a number strictly between 0 and 1, got 1.0"),
        ({"thresholds": {"effusion": 0.3, "cardiomegaly": 0, "nodule": 0.2}}, r"thresholds\['cardiomegaly'\]"),
        ({"thresholds": {"effusion": 0.3, "cardiomegaly": "0.5", "nodule": 0.2}}, r"thresholds\['cardiomegaly'\]"),
        ({"thresholds": {"effusion": 0.3, "cardiomegaly": 0.5}}, "thresholds must give every finding of classes"),
        ({"thresholds": None}, "thresholds must give every finding of classes"),
        ({"temperatures": {"effusion": NAN, "cardiomegaly": 1.0, "nodule": 1.0}},
         r"temperatures\['effusion'\] must be a number in 0.05..20, got nan"),
        ({"temperatures": {"effusion": 1.0, "cardiomegaly": -1.0, "nodule": 1.0}}, r"temperatures\['cardiomegaly'\]"),
        ({"temperatures": {"effusion": 1.0, "cardiomegaly": 1.0, "nodule": float("inf")}}, r"temperatures\['nodule'\]"),
        ({"temperatures": {"effusion": 1.0, "cardiomegaly": 1.0, "nodule": 1.0, "mass": 1.0}},
         r"temperatures must give every finding of classes \(effusion, cardiomegaly, nodule\) and no other"),
        ({"task": "multiclass"}, 'task must be "multilabel", or absent'),
        ({"task": "single"}, 'thresholds belongs to a multilabel model, and this one names no task "multilabel"'),
    ],
)  # fmt: skip
def test_a_multilabel_bundle_with_bad_thresholds_temperatures_or_findings_is_refused(tmp_path, change, message):
    _, folder = _multilabel_bundle(tmp_path)
    config = json.loads((folder / "config.json").read_text()) | change
    (folder / "config.json").write_text(json.dumps(config))
    write_checksums(folder)
    with pytest.raises(BundleError, match=message):
        verify_bundle(folder)
