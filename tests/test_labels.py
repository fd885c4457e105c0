"""Confident learning finds planted label errors; `lungxray labels` writes the CSV and the page."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CHROMIUM, CHROMIUM_FLAGS, browser_or_skip, cli, synthetic_image
from PIL import Image

from lungxray.labels import find_label_issues, write_label_issues


def _noisy_probs(n_per_class: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and believable out-of-fold probabilities: mostly right, some unsure, none wrong yet."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    logits = rng.normal(0, 1, (len(labels), 3))
    logits[np.arange(len(labels)), labels] += rng.uniform(0.5, 3.0, len(labels))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs


def test_a_planted_mislabel_ranks_first():
    labels, probs = _noisy_probs()
    planted = 7  # labelled 0, but the model is sure it is class 2
    probs[planted] = [0.02, 0.03, 0.95]
    found = find_label_issues(labels, probs)
    assert found.index[0] == planted and found.suggested[0] == 2
    assert found.margin[0] == pytest.approx(0.02 - 0.95)
    assert np.all(np.diff(found.margin) >= 0)  # most doubtful first
    joint = found.confident_joint  # the images it counts sit mostly on the diagonal
    assert joint[0, 2] >= 1 and joint.trace() > 0.8 * joint.sum()
    for c in range(3):  # the threshold of a class is its images' mean probability of it
        assert found.thresholds[c] == pytest.approx(probs[labels == c, c].mean())


def test_a_clean_confident_set_has_no_issues():
    labels = np.repeat(np.arange(3), 10)
    probs = np.full((30, 3), 0.05)
    probs[np.arange(30), labels] = 0.9
    assert len(find_label_issues(labels, probs).index) == 0


def _cv_folder(tmp_path: Path, planted_name: str = "2.png") -> Path:
    """tmp_path/cv with a cv.json of twelve films in tmp_path/data, the covid film saved as
    ``planted_name`` confidently called viral pneumonia."""
    labels, probs = _noisy_probs(n_per_class=4)
    probs[5] = [0.05, 0.9, 0.05]  # labelled 1 already -> fine; plant on index 2 (label 0)
    probs[2] = [0.01, 0.01, 0.98]
    classes = ["covid", "normal", "viral_pneumonia"]
    images = []
    for k, (label, p) in enumerate(zip(labels, probs, strict=True)):
        path = tmp_path / "data" / classes[label] / (planted_name if k == 2 else f"{k}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_image(int(label), k)).save(path)
        images.append({"path": str(path), "label": classes[label], "fold": 1,
                       "probabilities": dict(zip(classes, map(float, p), strict=True))})  # fmt: skip
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / "cv.json").write_text(json.dumps({"out_of_fold": images}))
    return tmp_path / "cv"


def test_labels_command_writes_the_csv_and_a_self_contained_page(tmp_path, capsys):
    _cv_folder(tmp_path)
    assert cli("labels", tmp_path / "cv", "--top 1") == 0
    assert "nothing is relabelled" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "cv" / "label_issues.csv").read_text().splitlines()))
    assert rows[0]["path"] == "covid/2.png"  # relative to the dataset folder, as --exclude reads it
    assert (rows[0]["given"], rows[0]["suggested"], rows[0]["rank"], rows[0]["flagged"]) == (
        "covid",
        "viral_pneumonia",
        "1",
        "True",
    )
    assert len(rows) == 12 and [int(r["rank"]) for r in rows] == list(range(1, 13))  # every image, ranked
    assert float(rows[0]["score"]) == pytest.approx(0.97)
    confirmed = tmp_path / "confirmed.csv"  # the rows a person confirmed, as they come
    confirmed.write_text("\n".join((tmp_path / "cv" / "label_issues.csv").read_text().splitlines()[:2]) + "\n")
    capsys.readouterr()
    assert (
        cli("scan", tmp_path / "data", "--json --img-size 16 --cache-dir", tmp_path / "cache", "--exclude", confirmed)
        == 0
    )
    scan = json.loads(capsys.readouterr().out)
    assert scan["n_images"] == 11 and scan["excluded"] == [str(tmp_path / "data" / "covid" / "2.png")]
    page = (tmp_path / "cv" / "label_issues.html").read_text()
    assert page.count("<figure>") == 1 and "data:image/png;base64," in page and "http" not in page
    assert "given <strong>covid</strong> (0.010), suggested <strong>viral_pneumonia</strong> (0.980)" in page


LONG_NAME = "scan_" + "0123456789" * 19 + ".png"  # 200 characters, no space to wrap at


def test_the_label_page_wraps_text_between_words_and_only_paths_anywhere(tmp_path):
    _, page, _ = write_label_issues([_cv_folder(tmp_path, LONG_NAME)], tmp_path / "cv", top=3)
    text = page.read_text()
    assert "break-all" not in text and "word-break" not in text  # no rule breaks ordinary words
    assert ".path{overflow-wrap:anywhere}" in text and f'<span class="path">covid/{LONG_NAME}</span>' in text


@pytest.mark.browser
@pytest.mark.parametrize("width", [390, 1366])
def test_the_label_page_in_chromium_splits_no_word_and_fits_the_window(tmp_path, width):
    """Every word of the cards' text sits on one line; the 200-character path wraps inside its card."""
    _, page, _ = write_label_issues([_cv_folder(tmp_path, LONG_NAME)], tmp_path / "cv", top=3)
    sync_playwright = browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        tab = browser.new_page(viewport={"width": width, "height": 900})
        tab.goto(page.resolve().as_uri())
        found = tab.evaluate("""() => {
            const split = [];  // words outside a path whose letters lie on two lines
            for (const caption of document.querySelectorAll('figcaption')) {
                const walk = document.createTreeWalker(caption, NodeFilter.SHOW_TEXT);
                for (let node = walk.nextNode(); node; node = walk.nextNode()) {
                    if (node.parentElement.closest('.path')) continue;
                    for (const m of node.textContent.matchAll(/\\S+/g)) {
                        const range = document.createRange();
                        range.setStart(node, m.index);
                        range.setEnd(node, m.index + m[0].length);
                        const tops = new Set(Array.from(range.getClientRects()).map(r => Math.round(r.top)));
                        if (tops.size > 1) split.push(m[0]);
                    }
                }
            }
            const path = document.querySelector('figcaption .path');
            return {split, cards: document.querySelectorAll('figcaption').length,
                    path_lines: new Set(Array.from(path.getClientRects()).map(r => Math.round(r.top))).size,
                    scroll_width: document.documentElement.scrollWidth};
        }""")
        browser.close()
    assert found["cards"] == 3 and found["split"] == []
    assert found["path_lines"] > 1 and found["scroll_width"] <= width  # the long path wraps, inside the window


@pytest.mark.parametrize(
    ("cv", "says"),
    [
        ({"folds": []}, "it has no out_of_fold list of scored images"),
        ([1, 2], "it has no out_of_fold list of scored images"),
        ({"out_of_fold": [{"path": "a.png", "probabilities": {"covid": 1.0}}]}, "out_of_fold[0] has no label"),
        ({"out_of_fold": [{"path": "a.png", "label": "covid", "probabilities": [1.0]}]},
         "out_of_fold[0].probabilities is not an object of class: probability"),
        (
            {"out_of_fold": [{"path": "a.png", "label": "covid", "probabilities": {"covid": 0.9, "normal": 0.1}},
                             {"path": "b.png", "label": "covid", "probabilities": {"covid": 1.0}}]},
            "out_of_fold[1] has label 'covid' and classes ['covid'], out_of_fold[0] the classes ['covid', 'normal']",
        ),
    ],
)  # fmt: skip
def test_labels_on_a_cv_json_of_the_wrong_shape_says_what_is_missing(tmp_path, capsys, cv, says):
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / "cv.json").write_text(json.dumps(cv))
    assert cli("labels", tmp_path / "cv") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'cv' / 'cv.json'} is not a cv.json that `labels` can read: {says}" in err
    assert "hint: pass folders written by `lungxray cv --out`" in err and "Traceback" not in err
