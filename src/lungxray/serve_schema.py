"""What the web service answers, as typed models for its OpenAPI schema (/docs, /redoc), and the
model's identity that every answer carries (``model_context``): its name, the lungxray version
that made it, when it was trained, on what data, and its measured figures in one line.

The routes are ``serve``'s; nothing here reads an upload or runs the model. Holds no training code.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from lungxray.predictor import Predictor
from lungxray.runfolder import MODEL


class ModelContext(BaseModel):
    """Which model answered, and how far its answers have been measured to hold."""

    name: str = Field(
        description="The model: its run's (or bundle folder's) name and its architecture, e.g. 'chest-2024 (cnn)'."
    )
    version: str = Field(description="The lungxray version that wrote the model's bundle.")
    trained: str | None = Field(
        description="The day its training ended (YYYY-MM-DD, UTC); None when the bundle did not record it."
    )
    data: str = Field(
        description="What it was trained on: the data sources as given at training "
        "(--data-sources), and the number of training and validation images."
    )
    measured: str | None = Field(
        description="One line: its figures on the internal test (or its held-out site) beside chance, then the "
        "worst of its sites and external sets (another hospital's films), or that it was never measured there; "
        "None when the bundle holds no measured figures."
    )
    card: str | None = Field(description="The model card's URL (GET /model/card); None when the bundle has none.")


class LowestRecall(BaseModel):
    class_: str = Field(alias="class", description="The class the model finds least often there.")
    recall: float = Field(description="The share of that class's images it answers correctly.")


class HeadlineRow(BaseModel):
    """One row of the figures against chance that the model card leads with."""

    label: str = Field(
        description="The images measured, e.g. 'test split (40 images)' or 'hospital-b (external, 120 images)'."
    )
    figures: str = Field(
        description="Balanced accuracy, macro-F1 and accuracy beside always answering the "
        "majority class; each class's recall; each one-vs-rest AUROC beside 0.5."
    )
    balanced_accuracy: float | None = Field(None, description="The balanced accuracy (None: not recorded).")
    lowest_recall: LowestRecall | None = Field(None, description="The class of lowest recall (None: not recorded).")


class ModelSpec(BaseModel):
    """The network, as config.json's "model" records it."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(description="The architecture in lungxray's model registry.")
    members: int = Field(1, description="Networks averaged (an ensemble when more than 1).")
    hyperparameters: dict[str, Any] = Field(description="The architecture's hyperparameters.")
    input_shape: list[int] = Field(description="The input it takes: [1, size, size] grayscale.")


MULTILABEL = ("task", "findings", "thresholds", "temperatures")  # absent from a single-label model's answers


class MultilabelFields(BaseModel):
    """An answer whose multi-label fields are left out of its JSON when None: a single-label model's
    answers keep the shape they have always had."""

    @model_serializer(mode="wrap")
    def _without_unused(self, handler: SerializerFunctionWrapHandler):  # unannotated: the schema keeps the fields
        data = handler(self)
        return {k: v for k, v in data.items() if not (k in MULTILABEL and v is None)}


class ModelInfo(MultilabelFields):
    """GET /model: the model, how it reads an image, what was measured, and its card."""

    classes: list[str] = Field(description="The classes it answers, in the order of its outputs.")
    model: ModelSpec
    preprocessing: dict[str, Any] = Field(
        description="How an upload is read for it, as in training: image size, "
        "border crop, equalisation, which DICOM files it takes."
    )
    backend: Literal["torch", "onnx"] = Field(description="What runs the model: PyTorch or ONNX Runtime.")
    temperature: float = Field(description="The temperature its probabilities are scaled by (1.0: none).")
    task: Literal["multilabel"] | None = Field(
        None, description="'multilabel': one independent probability per finding; absent for a single-label model."
    )
    thresholds: dict[str, float] | None = Field(
        None, description="A multi-label model's: the probability from which each finding is reported present."
    )
    temperatures: dict[str, float] | None = Field(
        None, description="A multi-label model's: the temperature each finding's logit is divided by (1.0: none)."
    )
    ood: dict[str, Any] | None = Field(
        description="The out-of-distribution score's method and threshold; None for a bundle without one."
    )
    headline: list[HeadlineRow] | None = Field(
        description="The figures against chance of the test split, its held-out or worst site and each "
        "external set; None when not run."
    )
    metrics: dict[str, Any] | None = Field(description="The test split's metrics.json; None when not evaluated.")
    model_card: str | None = Field(description="MODEL_CARD.md (Markdown); None for a bundle without one.")
    explanation: str = Field(description="How /explain maps where the model looked: 'Grad-CAM' or 'input gradient'.")
    model_context: ModelContext


class Prediction(MultilabelFields):
    """POST /predict: one image's class probabilities and out-of-distribution score; for a
    multi-label model, each finding's probability and the findings present."""

    task: Literal["multilabel"] | None = Field(
        None, description="'multilabel': the model answers findings; absent for a single-label model."
    )
    class_: str = Field(
        alias="class", description="The class of highest probability (a multi-label model's most probable finding)."
    )
    probabilities: dict[str, float] = Field(
        description="Each class's calibrated probability; they sum to 1. A multi-label model's: each finding's "
        "own probability (they need not sum to 1)."
    )
    findings: list[str] | None = Field(
        None,
        description="A multi-label model's findings at or above their threshold (GET /model), most probable "
        "first; empty when none is; absent for a single-label model.",
    )
    ood_score: float | None = Field(
        description="How far the image lies from the training films (above 1: flagged); "
        "None for a bundle without the score."
    )
    in_distribution: bool | None = Field(
        description="False: unlike the training films, so the class is no answer "
        "to rely on; None for a bundle without the score."
    )
    model: str = Field(description="The architecture's name (model_context.name names the model).")
    model_context: ModelContext


class Health(BaseModel):
    status: Literal["ok"] = Field(description="'ok' once the model is loaded and the service answers.")


class Problem(BaseModel):
    """An upload refused."""

    detail: str = Field(description="What was wrong, naming the file, and what to do.")


def model_context(predictor: Predictor, card_url: str | None) -> dict:
    """``ModelContext``'s fields for the loaded model; ``card_url``: where GET /model/card answers."""
    config, folder = predictor.config_, predictor.folder
    model = config["model"]
    members = model.get("members", 1)
    arch = model["name"] + (f", ensemble of {members}" if members > 1 else "")
    run = folder.parent.name if folder.name == MODEL else folder.name  # a run folder holds the bundle in model/
    created = config.get("created")
    return {
        "name": f"{run} ({arch})",
        "version": str(config.get("library_version", "not recorded")),
        "trained": created[:10] if isinstance(created, str) and re.match(r"\d{4}-\d{2}-\d{2}", created) else None,
        "data": _data(config),
        "measured": measured_line(predictor.headline_),
        "card": card_url if predictor.card_ is not None else None,
    }


def multilabel_info(predictor: Predictor) -> dict:
    """GET /model's fields of a multi-label model (task, thresholds, temperatures); none for a single-label one."""
    if predictor.temperatures_ is None:
        return {}
    temperatures = dict(zip(predictor.classes_, predictor.temperatures_.tolist(), strict=True))
    return {"task": predictor.task_, "thresholds": predictor.thresholds_, "temperatures": temperatures}


def _data(config: dict) -> str:
    """The training data in words: its sources as given, and how many images trained and validated it."""
    sources = (config.get("training_data") or {}).get("sources")
    sizes = (config.get("training") or {}).get("split_sizes") or {}
    counted = (
        f"{sizes['train']} training and {sizes['val']} validation images" if {"train", "val"} <= set(sizes) else ""
    )
    if sources:
        return f"{sources}" + (f" ({counted})" if counted else "")
    return (f"{counted}; " if counted else "") + "data sources not recorded"


def measured_line(rows: list[dict] | None) -> str | None:
    """``card.headline``'s rows in one line: the first (the internal test or held-out site), then the
    worst of the others by balanced accuracy (sites, external sets), or that there are none. A row
    written before the rows carried numbers gives its first figure, and the first such row counts
    as the worst."""
    if not rows:
        return None
    internal, elsewhere = rows[0], rows[1:]
    if not elsewhere and internal["label"].startswith("held-out site"):  # its test is a site it never saw
        return _row_in_brief(internal)
    if not elsewhere:
        return f"{_row_in_brief(internal)}; never measured on another site's or hospital's films"
    worst = min(elsewhere, key=lambda row: _number(row.get("balanced_accuracy"), math.inf))
    return f"{_row_in_brief(internal)}; worst elsewhere, {_row_in_brief(worst)}"


def _row_in_brief(row: dict) -> str:
    """'label: balanced accuracy 0.83 (...; always answering covid: 0.33), lowest recall normal 0.71'."""
    lowest = row.get("lowest_recall")
    recall = f", lowest recall {lowest['class']} {lowest['recall']:.2f}" if isinstance(lowest, dict) else ""
    first = re.match(r"[^(;]*(\([^)]*\))?", row["figures"]).group(0)  # its interval holds a "; " too
    return f"{row['label']}: {first}{recall}"


def _number(value, otherwise: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else otherwise
