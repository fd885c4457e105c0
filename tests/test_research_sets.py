"""Research sets as they ship, end to end: small CSV sets in ChestX-ray14's and CheXpert's layouts
(made-up films, the real column names and value conventions: findings joined by '|' and "No
Finding", 1.0 / 0.0 / -1.0 / blank cells, several films per patient, lateral views to leave out)
through scan, run, cv, evaluate, predict, export and serve, as a user types them."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from conftest import cli, write_csv
from PIL import Image

from lungxray.cli import main

FINDINGS = ("Effusion", "Cardiomegaly", "Nodule")  # each a bright mark at its own place in the film


def film(present: tuple[bool, ...], index: int, size: int = 32) -> np.ndarray:
    """A 'radiograph' carrying each present finding as a bright block at that finding's place."""
    rng = np.random.default_rng(index)
    img = rng.normal(80, 20, (size, size))
    for k, on in enumerate(present):
        if on:
            img[k * size // 3 : (k + 1) * size // 3, size // 4 : 3 * size // 4] += 110
    img[index % size, :] += 25  # no two films alike
    return np.clip(img, 0, 255).astype(np.uint8)


def _present(i: int) -> tuple[bool, ...]:
    """Film ``i``'s findings: every combination of the three comes up, none the most often."""
    return tuple(bool((i >> k) & 1) for k in range(3)) if i % 4 else (False, False, False)


def write_chestxray14(root, n: int = 72, start: int = 0):
    """Data_Entry_2017.csv and images/, as ChestX-ray14 ships them; every 9th film a lateral (LL)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        name = f"{i:08d}_000.png"
        present = _present(i)
        Image.fromarray(film(present, i)).save(root / "images" / name)
        labels = "|".join(f for f, on in zip(FINDINGS, present, strict=True) if on) or "No Finding"
        view = "LL" if i % 9 == 8 else "PA"
        rows.append({"Image Index": name, "Finding Labels": labels, "Follow-up #": "0", "Patient ID": str(i // 3),
                     "Patient Age": "50", "Patient Gender": "F", "View Position": view})  # fmt: skip
    manifest = root / "Data_Entry_2017.csv"
    return write_csv(manifest, rows)


CHEXPERT_COLUMNS = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                    "Fracture", "Support Devices")  # fmt: skip


def write_chexpert(root, n: int = 60):
    """CheXpert-v1.0/train.csv with patientNNNNN/studyN/viewN_frontal.jpg paths; Cardiomegaly,
    Pleural Effusion and Lung Lesion drawn on the films (1.0), every 5th of them uncertain (-1.0),
    the other columns blank (not mentioned); every 7th film a lateral."""
    base = root / "CheXpert-v1.0"
    rows = []
    for i in range(n):
        present = _present(i)
        view = "lateral" if i % 7 == 6 else "frontal"
        path = f"CheXpert-v1.0/train/patient{i // 2:05d}/study1/view{i % 2 + 1}_{view}.jpg"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(film(present, i)).save(root / path, quality=95)
        row = {"Path": path, "Sex": "Male", "Age": "60", "Frontal/Lateral": view.capitalize(), "AP/PA": "PA",
               "No Finding": "" if any(present) else "1.0"} | dict.fromkeys(CHEXPERT_COLUMNS, "")  # fmt: skip
        for column, on in zip(("Pleural Effusion", "Cardiomegaly", "Lung Lesion"), present, strict=True):
            row[column] = ("-1.0" if i % 5 == 0 else "1.0") if on else "0.0"
        rows.append(row)
    manifest = base / "train.csv"
    return write_csv(manifest, rows)


@pytest.fixture(scope="module")
def chestxray14_run(tmp_path_factory):
    """A multi-label MLP run on a ChestX-ray14-layout set (laterals left out by --where)."""
    root = tmp_path_factory.mktemp("cxr14")
    manifest = write_chestxray14(root / "set")
    out, cache = root / "run", root / "cache"
    code = main(["run", str(manifest), "--out", str(out), "--layout", "chestxray14", "--where", "View Position=PA,AP",
                 "--model", "mlp", "--img-size", "16", "--trials", "2", "--epochs", "40", "--seed", "0", "--quiet",
                 "--cache-dir", str(cache)])  # fmt: skip
    return {"root": root, "manifest": manifest, "out": out, "cache": cache, "code": code}


@pytest.mark.slow
def test_a_chestxray14_set_trains_a_multilabel_model_scored_per_finding(chestxray14_run):
    run, out = chestxray14_run, chestxray14_run["out"]
    assert run["code"] == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["task"] == "multilabel" and config["classes"] == ["cardiomegaly", "effusion", "nodule"]
    assert set(config["thresholds"]) == set(config["temperatures"]) == set(config["classes"])
    assert all(0 < t < 1 for t in config["thresholds"].values())
    splits = json.loads((out / "splits.json").read_text())
    used = splits["train"] + splits["val"] + splits["test"]
    assert len(used) == 72 - 8 and not any(p.endswith(("008_000.png", "017_000.png")) for p in used)  # LL left out
    # patients (3 films each) never straddle parts
    patient = {p: int(p.rsplit("/", 1)[1][:8]) // 3 for p in used}
    parts = [{patient[p] for p in splits[k]} for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["n"] == len(splits["test"])
    assert set(metrics["per_finding"]) == {"cardiomegaly", "effusion", "nodule"}
    assert metrics["macro_auroc"] > 0.8  # each finding is a bright block: easy to see
    assert metrics["prevalence"]["per split"]["test"]["effusion"]["known"] == len(splits["test"])
    predictions = json.loads((out / "predictions.json").read_text())["images"]
    first = predictions[0]
    name = first["path"].rsplit("/", 1)[1]
    truth = _present(int(name[:8]))
    assert first["targets"] == {"effusion": int(truth[0]), "cardiomegaly": int(truth[1]), "nodule": int(truth[2])}
    assert set(first["findings"]) <= set(first["probabilities"])
    summary = json.loads((out / "run.json").read_text())
    assert summary["task"] == "multilabel" and summary["test_macro_auroc"] == metrics["macro_auroc"]
    page = (out / "report.html").read_text()
    assert "<td>micro AUROC</td>" in page and all(f"<td>{f}</td>" in page for f in ("effusion", "cardiomegaly"))
    scan = json.loads((out / "scan.json").read_text())
    assert scan["confound"]["skipped"].startswith("multi-label data") and scan["confound"]["warning"] is None


@pytest.mark.slow
def test_the_multilabel_model_predicts_exports_serves_and_is_evaluated_elsewhere(chestxray14_run, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from lungxray.predictor import Predictor
    from lungxray.serve import create_app

    assert chestxray14_run["code"] == 0
    out, cache = chestxray14_run["out"], chestxray14_run["cache"]
    model = out / "model"
    other = write_chestxray14(tmp_path / "other", n=27, start=300)
    films = sorted((tmp_path / "other" / "images").glob("*.png"))[:4]
    capsys.readouterr()
    assert cli("predict", model, *films, "--json") == 0
    answers = json.loads(capsys.readouterr().out)
    assert [a["task"] for a in answers] == ["multilabel"] * 4
    predictor = Predictor(model)
    for a in answers:
        expected = [f for f, p in a["probabilities"].items() if p >= predictor.thresholds_[f]]
        assert sorted(a["findings"]) == sorted(expected)
    assert cli("export", model, "--onnx") == 0
    onnx = Predictor(model, backend="onnx").predict_files(films)
    for a, b in zip(answers, onnx, strict=True):
        assert b["probabilities"] == pytest.approx(a["probabilities"], abs=1e-4)
    with TestClient(create_app(model)) as client:
        body = client.post("/predict", files={"file": (films[0].name, films[0].read_bytes(), "image/png")}).json()
    assert body["task"] == "multilabel" and body["probabilities"] == pytest.approx(
        answers[0]["probabilities"], abs=1e-6
    )
    # another hospital's set, read the same way: scored per finding, none of its films seen
    ev = tmp_path / "ev"
    code = main(["evaluate", str(model), str(other), "--layout", "chestxray14", "--where", "View Position=PA,AP",
                 "--out", str(ev), "--quiet", "--cache-dir", str(cache)])  # fmt: skip
    assert code == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["n"] == 27 - 3  # three laterals left out
    assert metrics["per_finding"]["effusion"]["n_known"] == 24
    printed = capsys.readouterr().out
    assert "macro AUROC" in printed and "effusion (" in printed
    # read with one label per film, the data does not fit the model: said, not mis-scored
    code = cli("evaluate", model, other, "--out", tmp_path / "ev2", "--quiet --cache-dir", cache)
    assert code == 2


@pytest.mark.slow
def test_a_chexpert_set_with_uncertain_labels_cross_validates_with_patients_whole(tmp_path, capsys):
    manifest = write_chexpert(tmp_path)
    out = tmp_path / "cv"
    code = cli("cv", manifest, "--layout chexpert --where Frontal/Lateral=Frontal --uncertain positive --model mlp "
               "--img-size 16 --folds 3 --epochs 30 --cache-dir", tmp_path / "cache", "--out", out)  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = json.loads((out / "cv.json").read_text())
    assert report["task"] == "multilabel" and report["pooled"]["task"] == "multilabel"
    # the layout's ten columns blank on every film teach nothing: left out, and said so; "No Finding" = 1
    # rows are negative for the findings they leave blank, so the three drawn ones have both sides
    assert report["pooled"]["findings"] == ["cardiomegaly", "lung_lesion", "pleural_effusion"]
    [left_out] = [line for line in printed.err.splitlines() if "left out, too few known films" in line]
    assert "edema (0 positive, " in left_out and "cardiomegaly" not in left_out
    oof = report["out_of_fold"]
    assert len(oof) == 60 - 8  # the laterals left out
    # --uncertain positive: a -1.0 cell is a positive target
    row = next(o for o in oof if o["path"].endswith("patient00005/study1/view1_frontal.jpg"))  # film 10: i % 5 == 0
    assert _present(10) == (False, True, False) and row["targets"]["cardiomegaly"] == 1
    folds = json.loads((out / "folds.json").read_text())
    for fold in folds:  # a patient's two films are in one fold's test, never split across
        tested = {p.split("/")[-3] for p in fold["test"]}
        trained = {p.split("/")[-3] for p in fold["train"] + fold["val"]}
        assert not tested & trained
    assert report["summary"]["macro_auroc"]["mean"] > 0.7
    assert all(not math.isnan(f["thresholds"]["cardiomegaly"]) for f in report["per_fold"])
    # pooled, each film was decided at its own fold's threshold: the counts add up over the folds
    pooled = report["pooled"]["per_finding"]["cardiomegaly"]
    per_fold = [f["metrics"]["per_finding"]["cardiomegaly"]["counts"] for f in report["per_fold"]]
    assert pooled["threshold"] is None and pooled["counts"] == {k: sum(c[k] for c in per_fold) for k in per_fold[0]}


def write_covid_metadata(root, n: int = 48):
    """metadata.csv and images/, as the public COVID-19 collection ships them: 'finding' holding
    several comma-separated findings (here COVID-19, ARDS and Pneumothorax, drawn on the films), a
    view and a modality column to filter on (every 8th film a lateral, every 12th a CT slice)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = ("COVID-19", "ARDS", "Pneumothorax")
    rows = []
    for i in range(n):
        present = _present(i)
        name = f"case{i:03d}.png"
        Image.fromarray(film(present, 500 + i)).save(root / "images" / name)
        finding = ", ".join(f for f, on in zip(names, present, strict=True) if on) or "No Finding"
        view, modality = ("L" if i % 8 == 7 else "PA"), ("CT" if i % 12 == 11 else "X-ray")
        rows.append({"patientid": str(i // 2), "offset": "0", "sex": "M", "age": "55", "finding": finding,
                     "view": view, "modality": modality, "folder": "images", "filename": name})  # fmt: skip
    manifest = root / "metadata.csv"
    return write_csv(manifest, rows)


@pytest.mark.slow
def test_a_covid_metadata_set_runs_predicts_and_exports(tmp_path, capsys):
    from lungxray.predictor import Predictor

    manifest = write_covid_metadata(tmp_path / "covid")
    out = tmp_path / "run"
    code = main(["run", str(manifest), "--layout", "covid-metadata", "--where", "view=PA,AP", "--where",
                 "modality=X-ray", "--map", "ARDS=ards", "--model", "mlp", "--img-size", "16", "--trials", "1",
                 "--epochs", "30", "--out", str(out), "--quiet", "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    predictor = Predictor(out / "model")
    assert predictor.task_ == "multilabel" and predictor.classes_ == ["ards", "covid_19", "pneumothorax"]
    splits = json.loads((out / "splits.json").read_text())
    kept = splits["train"] + splits["val"] + splits["test"]
    assert len(kept) == 48 - 8  # 6 laterals and 4 CT slices left out (films 23 and 47 are both)
    films = sorted((tmp_path / "covid" / "images").glob("*.png"))[:3]
    capsys.readouterr()  # what run printed
    assert cli("predict", out / "model", *films, "--csv -") == 0
    table = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [r["path"] for r in table] == [str(f) for f in films]
    assert all(set(r["findings"].split("|")) - {""} <= set(predictor.classes_) for r in table)
    assert cli("export", out / "model", "--onnx") == 0 and (out / "model" / "model.onnx").is_file()


@pytest.mark.slow  # DenseNet-121 at 32 px: seconds
@pytest.mark.parametrize("name", ["cnn", "resnet18", "densenet121"])
def test_every_network_of_the_registry_takes_several_findings(name):
    """One sigmoid per finding from each network, and a training step on targets with unknowns that
    moves the weights and leaves the loss finite."""
    import torch

    from lungxray.losses import masked_bce
    from lungxray.models import create_model, get_spec

    torch.manual_seed(0)
    model = create_model(name, (1, 32, 32), 3, task="multilabel", **get_spec(name).defaults)
    x = torch.rand(4, 1, 32, 32)
    y = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 1.0], [float("nan")] * 3, [1.0, 1.0, 0.0]])
    logits = model(x)
    assert logits.shape == (4, 3)
    loss = masked_bce(logits, y)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.slow
@pytest.mark.processes
def test_two_worker_processes_tune_a_multilabel_study(tmp_path, capsys):
    manifest = write_chestxray14(tmp_path / "set", n=54)
    out = tmp_path / "run"
    code = main(["tune", str(manifest), "--layout", "chestxray14", "--model", "mlp", "--img-size", "16", "--trials",
                 "3", "--epochs", "5", "--parallel", "2", "--out", str(out), "--quiet",
                 "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    trials = json.loads((out / "trials.json").read_text())
    finished = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3 and all(math.isfinite(t["value"]) for t in finished)
    assert json.loads((out / "best_params.json").read_text())["objective"] == "val_loss"
