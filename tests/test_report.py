"""The HTML report of a tiny run, opened in headless Chromium: every section, no broken image,
no console error, and a screenshot. Also the report of a cv folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CHROMIUM, CHROMIUM_FLAGS, browser_or_skip, cli, write_tree

from lungxray.report import write_report

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
