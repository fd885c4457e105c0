"""Where a model looks, and whether it needs the lungs at all.

``saliency`` gives one map per image: Grad-CAM for the CNNs (MONAI's ``GradCAM`` on the model's
last convolutional stage) and the input gradient for the MLP (MONAI's ``VanillaGrad``), for the
predicted class or a given one; a multi-label model is explained per finding (``explained``).
``overlay`` blends a map onto its image. ``audit`` scores a model on the same images three ways:
as they are, with the central lung field hidden, and with the borders hidden; a model that stays
well above chance without the lungs is reading the image source (markers, text, exposure), not
the disease. ``error_gallery`` gives the report's gallery its pictures: the most confident errors
with their saliency overlays. Holds no training code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lungxray.bundle import is_bundle
from lungxray.errors import UnusableImage
from lungxray.infer import predict_logits, to_tensor
from lungxray.models import Ensemble, get_spec
from lungxray.predictor import Predictor
from lungxray.runfolder import EXPLAIN, write_json, writer_lock

# The central box that holds the lung field on a PA chest film, as shares of the image side:
# rows 15%..90%, columns 15%..85%. Markers, text and collimation edges sit outside it.
LUNG_FIELD = (0.15, 0.90, 0.15, 0.85)


def saliency(predictor: Predictor, images: np.ndarray, targets: list[int] | None = None) -> np.ndarray:
    """(N, H, W) uint8 preprocessed images -> (N, H, W) maps in [0, 1], image i's for the class (or
    finding) at index ``targets[i]``; None: each image's predicted class (a multi-label model's
    most probable finding)."""
    from monai.visualize import GradCAM, VanillaGrad

    model = explainer_model(predictor)
    x = to_tensor(images)  # (N, 1, H, W)
    if targets is None and predictor.task_ == "multilabel":  # per-finding temperatures can reorder the logits
        targets = [int(i) for i in predictor.predict_arrays(images).argmax(axis=1)] if len(images) else []
    layer = get_spec(predictor.config_["model"]["name"]).cam_layer
    if layer is not None:
        # One GradCAM per member of the explaining copy: each one hooks its layer for good, so a
        # new one per call would stack hooks on a model that serves many requests.
        members = list(model.members) if isinstance(model, Ensemble) else [model]
        if getattr(predictor, "gradcam_", None) is None:
            predictor.gradcam_ = [GradCAM(nn_module=m, target_layers=layer) for m in members]
        if targets is None:
            with torch.no_grad():
                targets = predict_logits(model, x).argmax(dim=1).tolist()  # (N,) the (ensemble's) answer
        # One image per call: MONAI scores logits[:, class_idx] summed over the batch, which for
        # a batch with several predicted classes would mix the classes in every image's map.
        maps = [
            torch.stack([cam(x[i : i + 1], class_idx=int(targets[i]))[0, 0] for cam in predictor.gradcam_]).mean(0)
            for i in range(len(x))
        ]  # N x (H, W), each member's map 0..1, averaged
        return (
            torch.stack(maps).detach().numpy().astype(np.float32)
            if maps
            else np.zeros((0, *images.shape[1:]), np.float32)
        )
    vanilla = VanillaGrad(model)  # one image per call; index None: MONAI's argmax of the logits
    index = [None] * len(x) if targets is None else [int(t) for t in targets]
    grads = torch.cat([vanilla(x[i : i + 1], index=index[i]) for i in range(len(x))]).abs()[:, 0]  # (N, H, W)
    peak = grads.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return (grads / peak).detach().numpy().astype(np.float32)


def explainer_model(predictor: Predictor) -> torch.nn.Module:
    """The predictor's own copy of its model for explanations, made once.

    Grad-CAM keeps forward and backward hooks on the model it explains, and they store each
    forward's activations: on the model that also serves predictions, a prediction running beside
    an explanation would overwrite them, and the overlay would show another image's map.
    Predictions never touch this copy.
    """
    import copy

    if getattr(predictor, "explainer_", None) is None:
        predictor.explainer_ = copy.deepcopy(predictor.model_).eval()
    return predictor.explainer_


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(H, W) uint8 image + (H, W) map in [0, 1] -> (H, W, 3) uint8 RGB, the map in 'jet' colours."""
    import matplotlib

    colours = matplotlib.colormaps["jet"](np.clip(heat, 0, 1))[..., :3]  # (H, W, 3) in [0, 1]
    gray = np.repeat(image[..., None] / 255.0, 3, axis=2)
    return np.rint(255 * ((1 - alpha) * gray + alpha * colours)).astype(np.uint8)


PANEL = 512  # long side of each half of an explanation figure, in pixels


def side_by_side(picture: np.ndarray, heat: np.ndarray, caption: str) -> np.ndarray:
    """(H, W) uint8 picture at its own aspect ratio + (h, w) map in [0, 1] of the model's square
    input -> (H', W', 3) uint8: the picture and the picture with the map, each ``PANEL`` px on its
    long side, a 'jet' colour scale from low to high, and a caption line on top.

    Composed with Pillow rather than a matplotlib figure: the size is exact (the tests and the
    page rely on it) and the service draws these from several threads at once."""
    from PIL import Image, ImageDraw, ImageFont

    gray, blended = panels(picture, heat)
    size = (gray.shape[1], gray.shape[0])  # (width, height)
    gap, bar, label_width = 12, 16, 40
    font = ImageFont.load_default(size=14)
    width = 2 * size[0] + 2 * gap + bar + 6 + label_width
    lines = _wrap(caption, font, width - size[0] - gap)  # over the right panel and the scale
    top = 8 + 18 * len(lines)
    canvas = Image.new("RGB", (width, size[1] + top), "white")
    canvas.paste(Image.fromarray(gray).convert("RGB"), (0, top))
    canvas.paste(Image.fromarray(blended), (size[0] + gap, top))
    import matplotlib

    ramp = matplotlib.colormaps["jet"](np.linspace(1, 0, size[1]))[:, :3]  # (H, 3): high at the top
    column = np.rint(255 * np.repeat(ramp[:, None, :], bar, axis=1)).astype(np.uint8)  # (H, bar, 3)
    x_bar = 2 * size[0] + 2 * gap
    canvas.paste(Image.fromarray(column), (x_bar, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((0, 4), "as read", fill="black", font=font)
    for k, line in enumerate(lines):
        draw.text((size[0] + gap, 4 + 18 * k), line, fill="black", font=font)
    draw.text((x_bar + bar + 4, top), "high", fill="black", font=font)
    draw.text((x_bar + bar + 4, top + size[1] - 16), "low", fill="black", font=font)
    return np.asarray(canvas)


def panels(picture: np.ndarray, heat: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W) uint8 picture at its own aspect ratio + (h, w) map in [0, 1] of the model's square
    input, or None -> the picture ``PANEL`` px on its long side, (H', W') uint8, and the same with
    the map over it (``overlay``), (H', W', 3) uint8 (None without a map): ``side_by_side``'s
    halves, which the upload page lays out itself."""
    from PIL import Image

    h, w = picture.shape
    scale = PANEL / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # (width, height)
    gray = np.asarray(Image.fromarray(picture).resize(size, Image.Resampling.BILINEAR))
    if heat is None:
        return gray, None
    # The model saw the picture squashed into a square: its map stretches back the same way.
    stretched = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))
    return gray, overlay(gray, stretched)


def _wrap(text: str, font, width: float) -> list[str]:
    """``text`` in lines of at most ``width`` pixels in ``font`` (a word longer than that stands alone)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


def explain_files(predictor: Predictor, paths: list[Path], out: Path, roots: tuple[Path, ...] = ()) -> list[dict]:
    """Probabilities and an explanation PNG (``side_by_side``) per image file, written to ``out``
    (a multi-label model's: one per explained finding, ``explained``, in "overlays": {finding:
    path}); bad files get an error. ``out`` is held with the run folder's writer lock, as the other
    writers do; a bundle, or a folder inside ``roots`` (the folders the images were found in), is
    refused."""
    with writer_lock(out, roots):
        return _explain_into(predictor, paths, Path(out))


def _explain_into(predictor: Predictor, paths: list[Path], out: Path) -> list[dict]:
    from PIL import Image

    from lungxray.decode import read_image_file

    out.mkdir(parents=True, exist_ok=True)
    results, images = predictor.decode_files(paths)
    if len(images) and predictor.task_ == "multilabel":
        _explain_findings(predictor, [r for r in results if "error" not in r], images, out)
    elif len(images):
        good = [r for r in results if "error" not in r]
        probs, maps = predictor.predict_arrays(images), saliency(predictor, images)
        scores = predictor.ood_scores(images)
        for k, (r, image, p, heat) in enumerate(zip(good, images, probs, maps, strict=True)):
            target = out / f"{k:03d}_{Path(r['path']).stem}_overlay.png"
            answer = predictor.describe(p, None if scores is None else scores[k])
            try:
                picture = predictor.display(read_image_file(Path(r["path"])), Path(r["path"]).name)
            except (OSError, UnusableImage):  # changed since it was read a moment ago: the model's input
                picture = image
            Image.fromarray(side_by_side(picture, heat, caption(predictor, answer))).save(target)
            r.update({**answer, "overlay": str(target)})
    write_json(out, EXPLAIN, results)
    return results


def _explain_findings(predictor: Predictor, good: list[dict], images: np.ndarray, out: Path) -> None:
    """``_explain_into`` for a multi-label model: each image's answer, and a figure per explained
    finding, ``{k}_{stem}_{finding}_overlay.png``, listed in its "overlays"."""
    from PIL import Image

    from lungxray.decode import read_image_file

    probs, scores = predictor.predict_arrays(images), predictor.ood_scores(images)
    answers = [predictor.describe(p, None if scores is None else scores[k]) for k, p in enumerate(probs)]
    pairs = [(k, f) for k, answer in enumerate(answers) for f in explained(answer)]  # (image, finding)
    maps = saliency(predictor, images[[k for k, _ in pairs]], [predictor.classes_.index(f) for _, f in pairs])
    for (k, finding), heat in zip(pairs, maps, strict=True):
        r, stem = good[k], Path(good[k]["path"]).stem
        target = out / f"{k:03d}_{stem}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', finding)}_overlay.png"
        try:
            picture = predictor.display(read_image_file(Path(r["path"])), Path(r["path"]).name)
        except (OSError, UnusableImage):  # changed since it was read a moment ago: the model's input
            picture = images[k]
        Image.fromarray(side_by_side(picture, heat, caption(predictor, answers[k], finding))).save(target)
        r.setdefault("overlays", {})[finding] = str(target)
    for r, answer in zip(good, answers, strict=True):
        r.update({**answer, "overlays": r.pop("overlays")})


def explained(answer: dict) -> list[str]:
    """The findings a multi-label answer's explanations show: each one present, most probable
    first, or the most probable when none reaches its threshold."""
    return answer["findings"] or [answer["class"]]


def caption(predictor: Predictor, answer: dict, finding: str | None = None) -> str:
    """What the map shows, in a few words: the method and the class it explains (``finding``: the
    class or finding explained, when not the answer's class)."""
    flagged = " (out of distribution: no reliable answer)" if answer.get("in_distribution") is False else ""
    shown = finding or answer["class"]
    if answer.get("task") == "multilabel":
        shown += " (present)" if shown in answer["findings"] else " (below its threshold)"
    return f"where the model looked ({method(predictor)}) for: {shown}{flagged}"


def method(predictor: Predictor) -> str:
    """How ``saliency`` maps this predictor's model: "Grad-CAM" or "input gradient"."""
    return "Grad-CAM" if get_spec(predictor.config_["model"]["name"]).cam_layer is not None else "input gradient"


GALLERY_SIZE = 8  # errors shown in the report's gallery


@dataclass(frozen=True)
class ErrorGallery:
    """What the report's gallery of errors shows: how many of the scored images are wrong, whether
    ``model_dir`` held a bundle to explain them with, and the most confident errors whose images
    could still be read, most confident first. Each item: the image's ``path`` and true ``label``,
    the ``predicted`` class, its probability (``confidence``) and the ``overlay``, (H, W, 3) uint8
    (``overlay`` of the image as the model read it and its saliency map)."""

    n_errors: int
    bundle: bool
    items: list[dict]


def error_gallery(
    model_dir: Path, predictions: dict, y: np.ndarray, probs: np.ndarray, size: int = GALLERY_SIZE
) -> ErrorGallery:
    """The ``size`` most confident errors among the images of ``predictions`` (predictions.json;
    ``y`` their labels, ``probs`` their probabilities), explained by the bundle in ``model_dir``.
    An image moved or deleted since it was scored is left out, not an error."""
    wrong = np.flatnonzero(probs.argmax(axis=1) != y)
    n_errors, bundle = len(wrong), is_bundle(model_dir)
    if n_errors == 0 or not bundle:
        return ErrorGallery(n_errors, bundle, [])
    wrong = wrong[np.argsort(-probs[wrong].max(axis=1))][:size]
    predictor = Predictor(model_dir)
    from lungxray.decode import read_image_file

    arrays, kept = [], []
    for i in wrong:
        try:
            path = Path(predictions["images"][i]["path"])
            arrays.append(predictor.decode(read_image_file(path), name=path.name))
        except (OSError, UnusableImage):
            continue
        kept.append(i)
    if not kept:
        return ErrorGallery(n_errors, bundle, [])
    images = np.stack(arrays)
    maps = saliency(predictor, images)
    items = [
        {
            "path": predictions["images"][i]["path"],
            "label": predictions["images"][i]["label"],
            "predicted": predictions["classes"][int(probs[i].argmax())],
            "confidence": float(probs[i].max()),
            "overlay": overlay(image, heat),
        }
        for i, image, heat in zip(kept, images, maps, strict=True)
    ]
    return ErrorGallery(n_errors, bundle, items)


def lung_box(size: int) -> np.ndarray:
    """(size, size) bool: True inside the central lung-field box."""
    top, bottom, left, right = (round(f * size) for f in LUNG_FIELD)
    box = np.zeros((size, size), dtype=bool)
    box[top:bottom, left:right] = True
    return box


def hide(images: np.ndarray, region: str) -> np.ndarray:
    """Copy of (N, H, W) uint8 ``images`` with ``region`` ('lungs' or 'borders') filled with each
    image's mean grey: a flat fill, so no edge or texture is left there to read."""
    box = lung_box(images.shape[1])
    hidden = box if region == "lungs" else ~box
    out = images.copy()
    fill = np.rint(images.reshape(len(images), -1).mean(axis=1)).astype(np.uint8)  # (N,)
    out[:, hidden] = fill[:, None]
    return out


def audit(predictor: Predictor, images: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy and macro-F1 on the images as they are, with the lungs hidden, and with the borders
    hidden, next to chance; ``verdict`` says in words what they mean."""
    from lungxray.metrics import compute_metrics

    views = {}
    for name, batch in (
        ("original", images),
        ("lungs_hidden", hide(images, "lungs")),
        ("borders_hidden", hide(images, "borders")),
    ):
        m = compute_metrics(y, predictor.predict_arrays(batch), predictor.classes_)
        views[name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "accuracy_ci95": m["ci95"]["accuracy"]}
    chance = chance_level(y, len(predictor.classes_))
    return {
        "n": int(len(y)),
        "lung_field_box": dict(zip(("top", "bottom", "left", "right"), LUNG_FIELD, strict=True)),
        "chance": chance,
        "views": views,
        "verdict": verdict(views, chance),
    }


def chance_level(y: np.ndarray, n_classes: int) -> dict:
    """Accuracy of always answering the commonest class; macro-F1 of guessing uniformly at random."""
    prior = np.bincount(y, minlength=n_classes) / len(y)
    present = prior > 0
    guess = 1 / n_classes
    f1 = 2 * prior[present] * guess / (prior[present] + guess)  # per class: precision = prior, recall = 1/C
    return {"accuracy": float(prior.max()), "macro_f1": float(f1.mean())}


def _low(view: dict) -> float:
    return view["accuracy_ci95"][0] if view["accuracy_ci95"] else view["accuracy"]


def verdict(views: dict, chance: dict) -> str:
    if _low(views["original"]) <= chance["accuracy"]:
        return (
            f"The model is not clearly above chance ({chance['accuracy']:.2f}) even on the images as they are "
            f"(accuracy {views['original']['accuracy']:.2f}), so hiding parts of them shows nothing."
        )
    hidden = views["lungs_hidden"]
    if _low(hidden) > chance["accuracy"] + 0.10:
        return (
            f"With the lungs hidden the model still scores accuracy {hidden['accuracy']:.2f} against a chance "
            f"level of {chance['accuracy']:.2f}: the model can tell the classes apart without seeing the "
            "lungs, so it is likely learning the image source (markers, text, exposure, patient age) "
            "rather than the disease. Test it on data from another hospital before trusting it."
        )
    return (
        f"With the lungs hidden the model falls to accuracy {hidden['accuracy']:.2f}, near the chance level "
        f"of {chance['accuracy']:.2f}: it needs the lung field, and the borders alone do not give the class away."
    )
