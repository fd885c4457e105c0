"""The model card: written into the bundle by run (and train), with the run's own figures, listed
in the checksums, served by /model."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import cli
from fastapi.testclient import TestClient

from lungxray.bundle import CARD
from lungxray.predictor import Predictor
from lungxray.serve import create_app

SECTIONS = ["## Model details", "## Intended use", "## Out-of-scope use", "## Training data", "## Evaluation",
            "## Results elsewhere", "## Shortcut audit", "## Limitations", "## How to cite"]  # fmt: skip


def test_run_writes_a_model_card_with_its_own_figures(trained_run):
    _, run, _ = trained_run
    card = (run / "model" / CARD).read_text()
    positions = [card.index(section) for section in SECTIONS]
    assert positions == sorted(positions)  # every section, in order
    assert card.startswith("---\nlibrary_name: lungxray\n")  # Hugging Face metadata block
    metrics = json.loads((run / "metrics.json").read_text())
    scan = json.loads((run / "scan.json").read_text())
    low, high = metrics["ci95"]["accuracy"]
    assert f"accuracy {metrics['accuracy']:.3f} (95% CI {low:.3f}-{high:.3f})" in card
    assert f"On the {metrics['n']} held-out test images" in card
    assert f"{scan['n_images']} usable images" in card
    for c, n in scan["counts"].items():
        assert f"{c} {n}" in card
    audit = json.loads((run / "audit.json").read_text())
    assert audit["verdict"] in card
    assert "Never measured on data from another hospital." in card  # the fixture ran without --external
    assert "Sources: not given (`--data-sources`)" in card
    assert json.loads((run / "model" / "checksums.json").read_text())[CARD]  # covered by the manifest
    predictor = Predictor(run / "model")
    assert predictor.card_ == card
    with TestClient(create_app(run / "model")) as client:
        assert client.get("/model").json()["model_card"] == card


def test_train_alone_writes_a_card_that_says_the_test_is_still_to_do(trained_run, tmp_path):
    data, run, root = trained_run
    out = tmp_path / "trained"
    assert (
        cli(
            "train",
            data,
            "--out",
            out,
            "--img-size 16 --cache-dir",
            root / "cache",
            "--params",
            run / "best_params.json",
            "--epochs 2 --quiet",
            "--data-sources",
            Path("Hospital A archive, 2019-2020, CC BY 4.0"),
        )
        == 0
    )  # fmt: skip (a Path: one argument)
    card = (out / "model" / CARD).read_text()
    assert "Not evaluated on held-out images yet" in card and "## Evaluation" in card
    assert "- Out-of-distribution flag: input-mahalanobis" in card  # the bundle's flag, named already
    assert "held-out test images" not in card
    assert "- Sources: Hospital A archive, 2019-2020, CC BY 4.0" in card
