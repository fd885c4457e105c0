"""The HTML report of a tiny run, opened in headless Chromium: every section, no broken image,
no console error, and a screenshot. Also the report of a cv folder and of an evaluation, and the
pieces users read closely: the figures' titles and bins, the probabilities, the gallery's width."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CHROMIUM, CHROMIUM_FLAGS, browser_or_skip, cli, write_tree

from lungxray.plots import coverage_figure, equal_count_bins, figure_png, reliability_figure
from lungxray.report import write_report
from lungxray.report_blocks import probability
from lungxray.report_sections import calibration, calibration_sets, gallery
from lungxray.saliency import ErrorGallery

RUN_SECTIONS = [
    "summary",
    "dataset",
    "search",
    "training",
    "metrics",
    "confusion",
    "roc",
    "calibration",
    "errors",
    "ood",
    "audit",
]


def _open(path: Path, screenshot: Path, width: int = 1200) -> dict:
    sync_playwright = browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": width, "height": 900})
        errors = []
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(path.resolve().as_uri())
        page.wait_for_load_state("load")
        found = page.evaluate("""() => ({
            sections: Array.from(document.querySelectorAll('section')).map(s => s.id),
            images: document.images.length,
            broken: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length,
            external: Array.from(document.querySelectorAll('[src],[href]'))
                .map(e => e.getAttribute('src') || e.getAttribute('href'))
                .filter(u => /^(https?:)?\\/\\//.test(u)).length,
            text: document.body.innerText,
            overflow: document.documentElement.scrollWidth - window.innerWidth,
            scroll_width: document.documentElement.scrollWidth,
            alts: Array.from(document.images).map(i => i.alt)})""")
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return {**found, "errors": errors}


@pytest.mark.browser
def test_run_report_in_chromium_has_every_section_and_no_broken_image(trained_run):
    tiny_run = trained_run[1]
    report = tiny_run / "report.html"
    assert report.is_file()  # written by `run` itself
    shot = tiny_run / "report.png"
    page = _open(report, shot)
    assert page["sections"] == RUN_SECTIONS
    assert page["images"] >= 7 and page["broken"] == 0
    assert page["external"] == 0  # self-contained: nothing fetched from the network
    assert page["errors"] == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert f"{metrics['accuracy']:.4f}" in page["text"]  # the test metrics, as written in metrics.json
    audit = json.loads((tiny_run / "audit.json").read_text())
    assert audit["verdict"] in page["text"]


@pytest.mark.browser
@pytest.mark.parametrize("width", [390, 1366])
def test_the_report_opens_with_a_summary_and_reads_on_a_phone(trained_run, width):
    """The summary comes first, every figure has alt text, and nothing scrolls sideways."""
    from lungxray import __version__

    page = _open(trained_run[1] / "report.html", trained_run[1] / f"report-{width}.png", width)
    assert page["sections"][0] == "summary" and page["overflow"] <= 0
    assert f"lungxray\t{__version__}" in page["text"] and "model\tcnn" in page["text"]
    assert "test the model on data from another hospital" in page["text"]
    assert page["alts"] and all(alt and alt != "plot" for alt in page["alts"])


@pytest.mark.browser
def test_report_command_rewrites_the_report_and_cv_gets_one(trained_run, tmp_path):
    tiny_run = trained_run[1]
    (tiny_run / "report.html").unlink()
    assert cli("report", tiny_run) == 0
    assert "Shortcut audit" in (tiny_run / "report.html").read_text()
    data = write_tree(tmp_path / "data", per_class=10)
    out = tmp_path / "cv"
    assert (
        cli(
            "cv",
            data,
            "--model mlp --folds 2 --epochs 2 --img-size 16 --cache-dir",
            tmp_path / "cache",
            "--out",
            out,
            "--quiet",
        )
        == 0
    )
    page = _open(out / "report.html", tmp_path / "cv.png")
    assert page["sections"] == ["summary", "dataset", "folds", "metrics", "confusion", "roc", "calibration"]
    assert page["broken"] == 0 and page["errors"] == []
    with pytest.raises(FileNotFoundError, match="no metrics.json or cv.json"):
        write_report(tmp_path / "data")


def test_the_coverage_plot_title_lies_inside_the_figure():
    curve = {"coverage": list(np.linspace(0.1, 1, 10)), "accuracy": list(np.linspace(1, 0.7, 10))}
    summary = {"coverage_curve": curve, "share_flagged": 0.05}
    fig = coverage_figure({"internal test": summary, "other hospital": summary})
    figure_png(fig)  # laid out and drawn as the report draws it
    title, inside = fig.axes[0].title.get_window_extent(), fig.bbox
    assert inside.x0 <= title.x0 < title.x1 <= inside.x1 and inside.y0 <= title.y0 < title.y1 <= inside.y1


def _scored(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (all class 0) and two-class probabilities whose top probability is ``confidence``,
    on the right class where ``correct``."""
    top = np.where(correct, 0, 1)
    probs = np.empty((len(confidence), 2))
    probs[np.arange(len(confidence)), top] = confidence
    probs[np.arange(len(confidence)), 1 - top] = 1 - confidence
    return np.zeros(len(confidence), dtype=int), probs


def test_reliability_bins_hold_equal_counts_of_images_and_never_a_handful():
    confidence = np.linspace(0.55, 0.99, 100)
    correct = (np.arange(100) >= 50) | (np.arange(100) % 2 == 0)  # half right below the middle, all above
    y, probs = _scored(confidence, correct)
    points = equal_count_bins(y, probs, bins=15, min_images=10)  # 100 images: 10 bins of 10
    assert [n for _, _, n in points] == [10] * 10
    assert [a for _, a, _ in points] == [0.5] * 5 + [1.0] * 5
    assert points[0][0] == pytest.approx(confidence[:10].mean()) and points[-1][0] == pytest.approx(
        confidence[-10:].mean()
    )
    # a confident model: 95 images at 0.99, five spread lower. Equal-width bins would draw five
    # points of one image each, accuracy 0 or 1; here every point stands for at least 10 images.
    confidence = np.r_[[0.52, 0.6, 0.7, 0.8, 0.9], np.full(95, 0.99)]
    y, probs = _scored(confidence, np.arange(100) % 3 != 0)
    points = equal_count_bins(y, probs, bins=15, min_images=10)
    assert len(points) == 10 and min(n for _, _, n in points) == 10
    assert points[0][0] == pytest.approx((0.52 + 0.6 + 0.7 + 0.8 + 0.9 + 5 * 0.99) / 10)
    assert [n for _, _, n in equal_count_bins(y[:25], probs[:25], min_images=10)] == [13, 12]  # two bins
    assert [n for _, _, n in equal_count_bins(y[:7], probs[:7], min_images=10)] == [7]  # fewer than 10: one
    assert [n for _, _, n in equal_count_bins(y, probs)] == [34, 33, 33]  # by default, 30 images at least


def test_the_reliability_diagram_draws_one_line_when_scaling_changed_nothing():
    rng = np.random.default_rng(0)
    y, probs = _scored(rng.uniform(0.5, 1, 60), rng.uniform(size=60) < 0.8)
    same = calibration_sets(probs, probs.copy(), 1.0)
    assert list(same) == ["before = after scaling (T = 1.00)"]
    sharper = probs**2 / (probs**2).sum(axis=1, keepdims=True)
    assert list(calibration_sets(sharper, probs, 0.5)) == ["before scaling", "after (T = 0.50)"]
    assert list(calibration_sets(probs, None, 1.0)) == ["as served"]  # cv: only the served ones
    fig = reliability_figure(y, same)
    lines = [line.get_label() for line in fig.axes[0].get_lines()]
    assert len(lines) == 2 and lines[0].startswith("before = after scaling") and lines[1] == "perfect calibration"
    assert fig.axes[0].get_title() == "reliability diagram: 2 bins of 30 images"
    page = calibration(y, probs, probs.copy(), 1.0)
    assert "one line shows both" in page and page.count("before = after scaling (T = 1.00)") == 2  # alt, ECE table


@pytest.mark.parametrize(
    ("p", "shown"),
    [(0.9993, ">0.999"), (1.0, ">0.999"), (0.999, "0.999"), (0.5, "0.500"), (0.12345, "0.123"),
     (0.001, "0.001"), (0.0004, "<0.001"), (0.0, "<0.001")],
)  # fmt: skip
def test_probabilities_are_never_rounded_to_certainty(p, shown):
    assert probability(p) == shown


def test_the_gallery_shows_a_near_certain_error_as_above_0_999():
    item = {"path": "/data/Covid/a.png", "label": "covid", "predicted": "normal", "confidence": 0.9993,
            "overlay": np.zeros((16, 16, 3), np.uint8)}  # fmt: skip
    page = gallery(ErrorGallery(1, True, [item]), None)
    assert "predicted normal (&gt;0.999)" in page and "1.00" not in page
    assert '<span class="name">Covid/a.png</span>' in page
    gone = gallery(ErrorGallery(3, False, []), "no model bundle at /m; pass --model BUNDLE")
    assert "3 error(s), not shown: no model bundle at /m; pass --model BUNDLE" in gone


def _one_error_folder(trained_run, tmp_path: Path, name: str) -> Path:
    """An evaluation folder of six of the run's films whose one error (a covid film called normal
    with probability 0.9993) is saved as ``name``: the run's metrics.json and a predictions.json."""
    data, run, _ = trained_run
    folder, films = tmp_path / "ev", tmp_path / "films"
    folder.mkdir()
    shutil.copy(run / "metrics.json", folder / "metrics.json")
    classes = ["covid", "normal", "viral_pneumonia"]
    images = []
    for k, sub in enumerate(["Covid", "Normal", "Viral Pneumonia"] * 2):
        source = sorted((data / sub).glob("*.png"))[k]
        target = films / sub / (name if k == 0 else source.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        p = [0.0003, 0.9993, 0.0004] if k == 0 else [0.98 if c == classes[k % 3] else 0.01 for c in classes]
        images.append({"path": str(target), "label": classes[k % 3], "probabilities": p, "uncalibrated": p})
    (folder / "predictions.json").write_text(json.dumps({"classes": classes, "temperature": 1.0, "images": images}))
    return folder


@pytest.mark.browser
def test_a_long_file_name_wraps_inside_its_gallery_card(trained_run, tmp_path):
    name = "x" * 196 + ".png"  # 200 characters, no space to wrap at
    folder = _one_error_folder(trained_run, tmp_path, name)
    write_report(folder, trained_run[1] / "model")
    page = _open(folder / "report.html", tmp_path / "long-name.png", width=1366)
    assert "errors" in page["sections"] and f"Covid/{name}" in page["text"]
    assert "predicted normal (>0.999)" in page["text"]
    assert page["scroll_width"] <= 1366 and page["broken"] == 0


@pytest.mark.slow
def test_the_report_of_an_evaluation_finds_its_model_or_says_where_it_went(trained_run, tmp_path, capsys):
    """evaluate records the model, data and seed; `report` on its folder finds the model alone, and
    when the model has moved, says so on the page and in one warning naming --model."""
    _, run, root = trained_run
    model, moved, ev = tmp_path / "model", tmp_path / "moved", tmp_path / "ev"
    shutil.copytree(run / "model", model)
    # films filed under another class's folder: errors for the gallery; four of each, so that the
    # figures differ from the run's test (three of each), which the report compares them with
    other = write_tree(
        tmp_path / "other", per_class=4, start=40, classes={0: "Normal", 1: "Covid", 2: "Viral Pneumonia"}
    )
    assert cli("evaluate", model, other, "--out", ev, "--cache-dir", root / "cache", "--quiet") == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["scored_by"] == {"model_dir": str(model.resolve()), "model": "cnn", "seed": 1}
    assert Path(metrics["data"]).name == "other" and metrics["n"] - np.trace(metrics["confusion_matrix"]) > 0
    header = f"<td>data</td><td>{html.escape(metrics['data'])}</td></tr><tr><td>seed</td><td>1</td>"

    (ev / "report.html").unlink()
    capsys.readouterr()
    assert cli("report", ev) == 0
    page = (ev / "report.html").read_text()
    assert "<td>model</td><td>cnn</td>" in page and header in page
    assert "Against the model&#x27;s own test</h2><p>The final model on data from elsewhere" in page
    assert "<h3>other</h3>" in page  # this data beside the model's test
    assert '<div class="gallery"><figure>' in page and "not shown" not in page
    assert "warning:" not in capsys.readouterr().err

    model.rename(moved)
    assert cli("report", ev) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    gone = f"the model that scored these images is no longer at {model.resolve()}; pass --model BUNDLE"
    assert len(warnings) == 1 and gone in warnings[0]
    page = (ev / "report.html").read_text()
    assert header in page and "<td>model</td><td>cnn</td>" in page
    assert f'Against the model&#x27;s own test</h2><p class="warning">Not compared: {gone}' in page
    assert "error(s), not shown: " + gone in page and '<div class="gallery">' not in page

    assert cli("report", ev, "--model", moved) == 0
    page = (ev / "report.html").read_text()
    assert "Not compared" not in page and '<div class="gallery"><figure>' in page
    assert "warning:" not in capsys.readouterr().err
