"""A multi-label model on the serving side: per-finding sigmoid probabilities and thresholds in the
Predictor, ONNX export, Grad-CAM and input-gradient maps per finding, `predict` and `explain` on the
command line, the web service and its upload page. The models are trained here, by hand, on tiny
films whose findings are bright vertical bands."""

from __future__ import annotations

import csv
import io
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHROMIUM, CHROMIUM_FLAGS, browser_or_skip, cli
from fastapi.testclient import TestClient
from helpers import figure_size
from PIL import Image

from lungxray.bundle import save_bundle
from lungxray.infer import to_tensor
from lungxray.models import create_model, get_spec
from lungxray.predictor import Predictor
from lungxray.serve import create_app

SIZE = 32
FINDINGS = ["cardiomegaly", "effusion", "nodule"]
THRESHOLDS = {"cardiomegaly": 0.3, "effusion": 0.6, "nodule": 0.45}
TEMPERATURES = {"cardiomegaly": 0.5, "effusion": 3.0, "nodule": 1.0}


def film(present: tuple[int, ...], index: int, strength: float = 110) -> np.ndarray:
    """A 'radiograph' showing finding k as a bright band over the k-th third of its columns."""
    rng = np.random.default_rng(100 + index)
    image = rng.normal(80, 20, (SIZE, SIZE))
    for k in present:
        image[:, k * SIZE // 3 : (k + 1) * SIZE // 3] += strength
    return np.clip(image, 0, 255).astype(np.uint8)


def _trained(name: str, hp: dict, steps: int, lr: float, per_subset: int) -> torch.nn.Module:
    """``name`` with one output per finding, fitted by Adam on binary cross-entropy to films of
    every subset of the findings, ``per_subset`` films each."""
    subsets = [s for r in range(len(FINDINGS) + 1) for s in itertools.combinations(range(len(FINDINGS)), r)]
    x = to_tensor(np.stack([film(s, 10 * j + i) for j, s in enumerate(subsets) for i in range(per_subset)]))
    y = torch.tensor([[float(k in s) for k in range(len(FINDINGS))] for s in subsets for _ in range(per_subset)])
    torch.manual_seed(0)
    model = create_model(name, (1, SIZE, SIZE), len(FINDINGS), **hp)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        optimiser.step()
    return model.eval()


def _save(folder: Path, model: torch.nn.Module, name: str, hp: dict, **multilabel) -> Path:
    """A multi-label bundle of ``model`` (config.json as multilabel.md describes it)."""
    config = {
        "classes": FINDINGS,
        "model": {"name": name, "hyperparameters": hp, "input_shape": [1, SIZE, SIZE]},
        "preprocessing": {"img_size": SIZE},
        "task": "multilabel",
        "thresholds": multilabel.get("thresholds", THRESHOLDS),
        "temperatures": multilabel.get("temperatures", TEMPERATURES),
    }
    return save_bundle(folder, model, config)


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory) -> tuple[Path, torch.nn.Module, dict[str, Path]]:
    """The MLP trained on the band films (about a second), its bundle, and film files: both bands of
    cardiomegaly and effusion, none, faint bands (probabilities in between), and each finding alone."""
    root = tmp_path_factory.mktemp("multilabel")
    hp = dict(get_spec("mlp").defaults)
    model = _trained("mlp", hp, steps=150, lr=1e-3, per_subset=6)
    folder = _save(root / "model", model, "mlp", hp)
    # training films (``_trained``'s indices), and one with faint bands it never saw
    films = {"two": film((0, 1), 40), "none": film((), 0), "faint": film((0, 1, 2), 902, strength=45)}
    films |= {f: film((k,), 10 * (k + 1)) for k, f in enumerate(FINDINGS)}
    paths = {}
    for key, pixels in films.items():
        paths[key] = root / "films" / f"{key}.png"
        paths[key].parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(paths[key])
    return folder, model, paths


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def _pixels(paths: dict[str, Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in paths.values()])


def test_probabilities_are_each_findings_sigmoid_of_its_logit_over_its_temperature(mlp_bundle):
    folder, model, paths = mlp_bundle
    images = _pixels(paths)
    with torch.no_grad():
        logits = model(to_tensor(images)).double().numpy()  # (N, F), before saving
    predictor = Predictor(folder)
    temperatures = np.array([TEMPERATURES[f] for f in FINDINGS])
    assert predictor.task_ == "multilabel" and predictor.thresholds_ == THRESHOLDS
    probs = predictor.predict_arrays(images)
    assert probs.shape == (len(images), len(FINDINGS))
    np.testing.assert_allclose(probs, _sigmoid(logits / temperatures), rtol=0, atol=1e-7)
    np.testing.assert_allclose(predictor.predict_arrays(images, calibrated=False), _sigmoid(logits), atol=1e-7)
    np.testing.assert_allclose(predictor.predict_logits(images), logits, atol=1e-6)
    assert not np.allclose(probs.sum(axis=1), 1.0)  # independent findings, not a softmax
    two = list(paths).index("two")  # cardiomegaly and effusion both show
    assert probs[two, 0] > 0.9 and probs[two, 1] > 0.6 and probs[two, 2] < 0.1


def test_an_ensembles_probabilities_are_its_members_mean_sigmoid_then_each_findings_temperature(tmp_path):
    hp = dict(get_spec("mlp").defaults)
    torch.manual_seed(1)
    model = create_model("mlp", (1, SIZE, SIZE), len(FINDINGS), members=2, task="multilabel", **hp).eval()
    config = {"classes": FINDINGS, "model": {"name": "mlp", "members": 2, "hyperparameters": hp,
              "input_shape": [1, SIZE, SIZE]}, "preprocessing": {"img_size": SIZE}, "task": "multilabel",
              "thresholds": THRESHOLDS, "temperatures": TEMPERATURES}  # fmt: skip
    predictor = Predictor(save_bundle(tmp_path / "ensemble", model, config))
    images = np.stack([film((k,), 50 + k) for k in range(len(FINDINGS))])
    with torch.no_grad():
        mean = np.mean([_sigmoid(m(to_tensor(images)).double().numpy()) for m in model.members], axis=0)  # (N, F)
    temperatures = np.array([TEMPERATURES[f] for f in FINDINGS])
    expected = _sigmoid(np.log(mean / (1 - mean)) / temperatures)
    np.testing.assert_allclose(predictor.predict_arrays(images), expected, atol=1e-6)
    np.testing.assert_allclose(predictor.predict_arrays(images, calibrated=False), mean, atol=1e-6)


def test_findings_are_those_at_or_above_their_threshold_most_probable_first(mlp_bundle, tmp_path):
    folder, model, paths = mlp_bundle
    predictor = Predictor(folder)
    images = _pixels(paths)
    probs = predictor.predict_arrays(images)
    answers = predictor.predict(images)
    for p, answer in zip(probs, answers, strict=True):
        assert list(answer) == ["task", "probabilities", "findings", "class", "ood_score", "in_distribution"]
        ranked = [FINDINGS[i] for i in np.argsort(-p)]
        assert answer["task"] == "multilabel" and answer["class"] == ranked[0]
        assert answer["probabilities"] == dict(zip(FINDINGS, p.tolist(), strict=True))
        assert answer["findings"] == [f for f in ranked if answer["probabilities"][f] >= THRESHOLDS[f]]
    assert answers[list(paths).index("two")]["findings"] == ["cardiomegaly", "effusion"]
    assert answers[list(paths).index("none")]["findings"] == []
    # files: the same answers, each with its path; a file that cannot be read answers its error
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    files = predictor.predict_files([*paths.values(), broken])
    assert [r["path"] for r in files] == [str(p) for p in [*paths.values(), broken]] and "error" in files[-1]
    assert [{k: v for k, v in r.items() if k != "path"} for r in files[:-1]] == answers
    [alone] = predictor.predict(paths["two"])  # a batch of one: float32 sums in another order
    assert alone["path"] == files[0]["path"] and alone["findings"] == files[0]["findings"]
    assert alone["probabilities"] == pytest.approx(files[0]["probabilities"], abs=1e-6)
    # each finding's own threshold decides: a probability exactly at it is present, one a hair below is not
    hp, faint = dict(get_spec("mlp").defaults), probs[2]  # the faint bands: every finding between 0.6 and 0.999
    assert (faint > 0.6).all() and (faint < 0.999).all() and answers[2]["findings"] == ["cardiomegaly", "nodule",
                                                                                       "effusion"]  # fmt: skip
    at = dict(zip(FINDINGS, faint.tolist(), strict=True))
    above = dict(zip(FINDINGS, np.nextafter(faint, 1).tolist(), strict=True)) | {"cardiomegaly": 0.5}
    assert Predictor(_save(tmp_path / "at", model, "mlp", hp, thresholds=at)).predict(images)[2]["findings"] == [
        "cardiomegaly", "nodule", "effusion"]  # fmt: skip
    assert Predictor(_save(tmp_path / "above", model, "mlp", hp, thresholds=above)).predict(images)[2][
        "findings"] == ["cardiomegaly"]  # fmt: skip


def test_onnx_export_outputs_each_findings_probability_and_carries_task_and_thresholds(mlp_bundle, tmp_path):
    import onnx
    import onnxruntime

    from lungxray.onnx_export import export_onnx

    folder = shutil.copytree(mlp_bundle[0], tmp_path / "model")
    images = _pixels(mlp_bundle[2])
    path, gap = export_onnx(folder, images)
    assert gap < 1e-4
    graph = onnx.load(str(path))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["lungxray.task"] == "multilabel" and json.loads(meta["lungxray.classes"]) == FINDINGS
    assert json.loads(meta["lungxray.thresholds"]) == THRESHOLDS
    assert json.loads(meta["lungxray.temperatures"]) == TEMPERATURES
    assert [o.name for o in graph.graph.output] == ["logits", "probabilities"]
    # ONNX Runtime alone, with no lungxray code: the graph's probabilities are the calibrated ones
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [graph_probs] = session.run(["probabilities"], {"image": to_tensor(images).numpy()})
    eager = Predictor(folder, backend="torch")
    assert np.abs(graph_probs - eager.predict_arrays(images)).max() < 1e-4
    onnx_predictor = Predictor(folder)
    assert onnx_predictor.backend_ == "onnx"
    for a, b in zip(onnx_predictor.predict(images), eager.predict(images), strict=True):
        assert a["findings"] == b["findings"] and a["class"] == b["class"]
        assert max(abs(a["probabilities"][f] - b["probabilities"][f]) for f in FINDINGS) < 1e-4


def _explain_and_check(folder: Path, paths: dict[str, Path], out: Path, capsys) -> list[dict]:
    """`lungxray explain` on the films: one figure per (film, explained finding), named for both,
    listed in explain.json and printed; the maps of two findings of one film differ."""
    chosen = [paths[k] for k in ("two", "none")]
    assert cli("explain", folder, *chosen, "--out", out) == 0
    printed = capsys.readouterr().out.splitlines()
    results = json.loads((out / "explain.json").read_text())
    expected = [["cardiomegaly", "effusion"], [results[1]["class"]]]  # the present ones, else the most probable
    assert results[1]["findings"] == [] and [list(r["overlays"]) for r in results] == expected
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == sorted(f"{k:03d}_{p.stem}_{f}_overlay.png" for k, p in enumerate(chosen) for f in expected[k])
    figures = {}
    for r in results:
        for finding, overlay in r["overlays"].items():
            with Image.open(overlay) as figure:
                assert figure.size == figure_size(SIZE, SIZE)
                figures[r["path"], finding] = np.asarray(figure.convert("RGB"))
    two = str(chosen[0])
    assert not np.array_equal(figures[two, "cardiomegaly"], figures[two, "effusion"])
    assert printed[0].startswith(f"{two}: cardiomegaly ") and " -> " in printed[0]
    assert printed[0].endswith(f"{results[0]['overlays']['cardiomegaly']}, {results[0]['overlays']['effusion']}")
    return results


def test_explain_writes_one_input_gradient_overlay_per_present_finding(mlp_bundle, tmp_path, capsys):
    folder, _, paths = mlp_bundle
    _explain_and_check(folder, paths, tmp_path / "explained", capsys)


@pytest.mark.slow
def test_explain_writes_one_grad_cam_overlay_per_present_finding(mlp_bundle, tmp_path, capsys):
    """The CNN, trained a few steps (5-15 s): Grad-CAM of each present finding's logit."""
    from lungxray.saliency import saliency

    hp = {**get_spec("cnn").defaults, "width": 8}
    model = _trained("cnn", hp, steps=30, lr=1e-2, per_subset=3)
    folder = _save(tmp_path / "cnn", model, "cnn", hp, thresholds=dict.fromkeys(FINDINGS, 0.5))
    predictor = Predictor(folder)
    paths = mlp_bundle[2]
    answers = predictor.predict([paths["two"], paths["none"]])
    if answers[0]["findings"] != ["cardiomegaly", "effusion"] or answers[1]["findings"]:
        pytest.fail(f"the CNN did not learn the bands: {answers}")
    _explain_and_check(folder, paths, tmp_path / "explained", capsys)
    image = _pixels({"two": paths["two"]})
    maps = saliency(predictor, np.repeat(image, 2, axis=0), [0, 1])  # (2, H, W): cardiomegaly's, effusion's
    assert maps.shape == (2, SIZE, SIZE) and not np.array_equal(maps[0], maps[1])
    assert np.array_equal(saliency(predictor, image), maps[:1])  # by default: the most probable finding


def test_predict_prints_findings_against_thresholds_and_json_and_csv_give_the_same_answers(mlp_bundle, capsys):
    from lungxray.report_blocks import probability

    folder, _, paths = mlp_bundle
    answers = Predictor(folder).predict_files([paths["two"], paths["none"]])
    assert cli("predict", folder, paths["two"], paths["none"]) == 0
    lines = capsys.readouterr().out.splitlines()
    two, none = ({f: probability(p) for f, p in a["probabilities"].items()} for a in answers)
    assert lines[0] == (
        f"{paths['two']}: cardiomegaly {two['cardiomegaly']} (>= 0.300), effusion {two['effusion']} (>= 0.600); "
        f"below threshold: nodule {two['nodule']} (< 0.450)"
    )
    ranked = sorted(FINDINGS, key=lambda f: -answers[1]["probabilities"][f])
    assert lines[1] == f"{paths['none']}: no finding at or above its threshold; below threshold: " + ", ".join(
        f"{f} {none[f]} (< {THRESHOLDS[f]:.3f})" for f in ranked
    )
    assert cli("predict", folder, paths["two"], paths["none"], "--json") == 0
    assert json.loads(capsys.readouterr().out) == answers
    assert cli("predict", folder, paths["two"], paths["none"], "--csv -") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["findings"] for r in rows] == ["cardiomegaly|effusion", ""]
    assert [r["class"] for r in rows] == [a["class"] for a in answers]
    assert float(rows[0]["p_effusion"]) == pytest.approx(answers[0]["probabilities"]["effusion"])


def _single_label_bundle(folder: Path) -> Path:
    hp = dict(get_spec("mlp").defaults)
    return save_bundle(folder, create_model("mlp", (1, 16, 16), 2, **hp), {"classes": ["a", "b"],
                       "model": {"name": "mlp", "hyperparameters": hp, "input_shape": [1, 16, 16]},
                       "preprocessing": {"img_size": 16}})  # fmt: skip


def test_the_service_answers_findings_and_explains_the_finding_asked_for(mlp_bundle, tmp_path):
    folder, _, paths = mlp_bundle
    expected = Predictor(folder).predict_files([paths["two"]])[0]
    upload = {"file": ("two.png", paths["two"].read_bytes(), "image/png")}
    with TestClient(create_app(folder)) as client:
        info = client.get("/model").json()
        body = client.post("/predict", files=upload).json()
        pictures = {
            finding: client.post(f"/explain?panel=overlay&finding={finding}", files=upload)
            for finding in ("cardiomegaly", "effusion")
        }
        default = client.post("/explain?panel=overlay", files=upload)
        figure = client.post("/explain?finding=effusion", files=upload)
        unknown = client.post("/explain?finding=pneumothorax", files=upload)
        schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert info["task"] == "multilabel" and info["classes"] == FINDINGS
    assert info["thresholds"] == THRESHOLDS and info["temperatures"] == TEMPERATURES
    assert list(body) == ["task", "class", "probabilities", "findings", "ood_score", "in_distribution", "model",
                          "model_context"]  # fmt: skip
    assert body["findings"] == expected["findings"] == ["cardiomegaly", "effusion"]
    assert body["class"] == "cardiomegaly" and body["model"] == "mlp"
    assert body["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-9)
    assert all(r.status_code == 200 and r.headers["content-type"] == "image/png" for r in pictures.values())
    assert pictures["cardiomegaly"].content != pictures["effusion"].content  # each finding its own map
    assert default.content == pictures["cardiomegaly"].content  # by default: the most probable finding
    with Image.open(io.BytesIO(figure.content)) as image:
        assert figure.status_code == 200 and image.size == figure_size(SIZE, SIZE)
    assert unknown.status_code == 422
    assert unknown.json()["detail"] == (
        "'pneumothorax' is not a finding of this model; it answers cardiomegaly, effusion, nodule"
    )
    # typed in the OpenAPI schema
    assert schemas["Prediction"]["properties"]["findings"]["anyOf"][0] == {"items": {"type": "string"}, "type": "array"}
    assert {"task", "thresholds", "temperatures"} <= set(schemas["ModelInfo"]["properties"])
    # a single-label model's answers keep their shape: no multi-label field appears
    with TestClient(create_app(_single_label_bundle(tmp_path / "single"))) as client:
        single = client.post("/predict", files=upload).json()
        single_info = client.get("/model").json()
    assert list(single) == ["class", "probabilities", "ood_score", "in_distribution", "model", "model_context"]
    assert not {"task", "thresholds", "temperatures"} & set(single_info)


@pytest.mark.browser
@pytest.mark.processes
def test_the_page_lists_every_finding_with_its_probability_and_threshold_at_390_px(mlp_bundle, tmp_path):
    """At a phone's 390 px: every finding, most probable first, with its probability, its threshold
    and whether it is present, in words; the heading names the findings present; nothing runs off
    the side."""
    from test_serve import _running_server, _stop, _wait

    sync_playwright = browser_or_skip()
    folder, _, paths = mlp_bundle
    expected = Predictor(folder).predict_files([paths["two"]])[0]
    server, thread, url = _running_server(folder, "auto")
    errors = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 390, "height": 900})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url + "/")
            page.set_input_files("#file", str(paths["two"]))
            _wait(page, "document.getElementById('overlay').naturalWidth")
            state = page.evaluate(FINDINGS_STATE)
            page.screenshot(path=str(tmp_path / "multilabel-390.png"), full_page=True)
            browser.close()
    finally:
        _stop(server, thread)
    assert errors == []
    assert state["heading"] == "Present: cardiomegaly, effusion"
    ranked = sorted(FINDINGS, key=lambda f: -expected["probabilities"][f])
    assert [row["name"] for row in state["rows"]] == ranked
    for row in state["rows"]:
        present = row["name"] in expected["findings"]
        assert row["verdict"] == ("present" if present else "below threshold"), row
        assert row["present"] == present and row["p"].endswith("%") and row["visible"], row
        assert row["cutoff"] == f"threshold {100 * THRESHOLDS[row['name']]:.1f}%", row
        assert 0 < row["right"] <= state["window"], row
    assert state["scroll"] <= state["window"], state  # nothing runs off the side
    assert state["status"].startswith("two.png: cardiomegaly (") and state["looked"].endswith("for: cardiomegaly")
    assert (tmp_path / "multilabel-390.png").stat().st_size > 10_000


FINDINGS_STATE = """() => {
  const rows = [...document.querySelectorAll("#bars .finding")].map(row => {
    const box = row.getBoundingClientRect();
    return {
      name: row.querySelector(".name").textContent, verdict: row.querySelector(".verdict").textContent,
      p: row.querySelector(".p").textContent, cutoff: row.querySelector(".cutoff").textContent,
      present: row.classList.contains("present"), visible: box.height > 0, right: Math.round(box.right),
    };
  });
  return {
    heading: document.getElementById("class").textContent, rows,
    status: document.getElementById("status").textContent, looked: document.getElementById("looked").textContent,
    scroll: document.documentElement.scrollWidth, window: window.innerWidth,
  };
}"""
