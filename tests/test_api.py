"""The README's Python examples are the files under examples/: each runs as it is, from a folder laid
out as the repository root is (the shared dataset at ../shared/data/covid19-image-dataset beside
it), and the README shows each file verbatim. The API's options are the settings' field names."""

from __future__ import annotations

import ast
import json
import re
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cli

import lungxray
from lungxray.errors import ConfigError, LungxrayError, MissingInputError, OutputExistsError, UnusableImage

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"


def _checkout(tmp_path: Path) -> tuple[Path, Path]:
    """(a folder standing for the repository root, where the examples' shared dataset is read from:
    ../shared/data/covid19-image-dataset beside it). What an example writes lands in tmp_path."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    return repo, tmp_path / "shared" / "data" / "covid19-image-dataset"


def _run_example(name: str, repo: Path, monkeypatch, capsys) -> str:
    """Run examples/``name`` as a script with ``repo`` as the working folder: what it printed."""
    monkeypatch.chdir(repo)
    capsys.readouterr()  # what the test printed before
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def _readme_blocks() -> dict[str, str]:
    """Each Python block of the README -> the examples/ file the paragraph above it names."""
    text = README.read_text()
    shown = {}
    for block in re.finditer(r"```python\n(.*?)```", text, re.S):
        paragraph = text[: block.start()].rstrip().rsplit("\n\n", 1)[-1]
        names = set(re.findall(r"examples/\w+\.py", paragraph))
        line = text.count("\n", 0, block.start()) + 1
        assert len(names) == 1, f"README.md:{line}: the paragraph above this block names {names or 'no examples/ file'}"
        shown[names.pop()] = block.group(1)
    return shown


def test_the_readme_shows_every_example_file_as_it_is():
    shown = _readme_blocks()
    assert sorted(shown) == sorted(f"examples/{p.name}" for p in EXAMPLES.glob("*.py"))
    for name, code in shown.items():
        assert code == (ROOT / name).read_text(), f"README.md's copy of {name} differs from the file: copy it over"


@pytest.mark.slow
def test_the_python_api_example_runs(shared_data, tmp_path, capsys, monkeypatch):
    repo, dataset = _checkout(tmp_path)
    dataset.symlink_to(shared_data)
    printed = _run_example("python_api.py", repo, monkeypatch, capsys).splitlines()
    assert len(printed) == 5 and printed[1].endswith("}")  # best params, accuracy and CI; 3 predictions; cv
    assert (repo / "runs" / "api" / "model" / "checksums.json").is_file()
    assert (repo / "runs" / "api-cv" / "cv.json").is_file()


def test_options_are_field_names_and_a_typo_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown option\\(s\\) trails") as info:
        lungxray.run(tmp_path, tmp_path / "out", trails=4)
    assert "trials" in info.value.hint
    from lungxray.job import Job

    job = Job.from_options(tmp_path, tmp_path / "out", trials=3, seed=5, rotation=9.0, img_size=64, epochs=2)
    assert job.search.trials == 3 and job.split.seed == job.train.seed == 5
    assert job.train.augment.rotation == 9.0 and job.preprocessing.img_size == 64


def test_the_onnx_example_runs_with_onnxruntime_alone(trained_run, tmp_path, capsys, monkeypatch):
    """The exported graph carries classes, preprocessing and temperature; the example classifies an
    image with ONNX Runtime, NumPy and Pillow only, as the bundle's own Predictor does."""
    data, out, _ = trained_run  # trained with the default preprocessing: the plain resize the example repeats
    repo, dataset = _checkout(tmp_path)
    bundle = repo / "runs" / "demo" / "model"
    shutil.copytree(out / "model", bundle)
    assert cli("export", bundle, "--onnx") == 0
    image = sorted((data / "Normal").glob("*.png"))[0]
    # the example's file name, with a PNG's bytes: Pillow reads by content, and the pixels are exact
    (dataset / "test" / "Normal").mkdir(parents=True)
    shutil.copyfile(image, dataset / "test" / "Normal" / "0101.jpeg")
    printed = ast.literal_eval(_run_example("onnx_runtime.py", repo, monkeypatch, capsys).strip())
    predictor = lungxray.load(bundle, backend="torch")
    assert list(printed) == predictor.classes_ and abs(sum(printed.values()) - 1) < 0.01
    expected = predictor.predict([image])[0]["probabilities"]
    assert max(abs(printed[c] - expected[c]) for c in printed) < 0.05  # the same pixels, rounding apart
    assert json.loads(json.dumps(printed))  # plain floats


def test_the_package_offers_each_cli_job_and_leaks_no_names():
    assert (
        {"run", "cross_validate", "load", "evaluate", "explain", "audit"} <= set(lungxray.__all__) <= set(dir(lungxray))
    )
    assert "annotations" not in dir(lungxray)


@pytest.mark.parametrize(
    ("function", "call", "typo", "meant"),
    [
        ("run", lambda p, **k: lungxray.run(p, p / "out", **k), "epocs", "epochs"),
        ("cross_validate", lambda p, **k: lungxray.cross_validate(p, p / "out", **k), "fold", "folds"),
        ("evaluate", lambda p, **k: lungxray.evaluate(p, p, p / "out", **k), "include_sen", "include_seen"),
        ("audit", lambda p, **k: lungxray.audit(p, p, **k), "outt", "out"),
        ("explain", lambda p, **k: lungxray.explain(p, p, p / "out", **k), "cache_dri", None),
        ("load", lambda p, **k: lungxray.load(p, **k), "backnd", "backend"),
    ],
)
def test_a_misspelt_keyword_is_answered_with_the_closest_name(tmp_path, function, call, typo, meant):
    """Refused before any work, as the CLI refuses a mistyped flag; explain takes no options at all."""
    with pytest.raises(ConfigError, match=f"unknown option\\(s\\) {typo}") as info:
        call(tmp_path, **{typo: 1})
    if meant:
        assert f"{typo}: did you mean {meant}?" in info.value.hint
    else:
        assert "known: images, model, out" in info.value.hint


def _probabilities(predictor, answers: list[dict]) -> np.ndarray:
    return np.array([[r["probabilities"][c] for c in predictor.classes_] for r in answers])


def test_predict_takes_paths_bytes_pillow_images_and_arrays_alike(trained_run):
    """The same film as a path, its bytes, a Pillow image, a (H, W) array, a row of a (N, H, W)
    batch or an item of a list gets the same answer: every form is preprocessed as a file is."""
    from PIL import Image

    data, out, _ = trained_run
    predictor = lungxray.load(out)
    films = sorted((data / "Normal").glob("*.png"))[:3]
    on_files = predictor.predict(films)
    assert [r["path"] for r in on_files] == [str(f) for f in films]
    expected = _probabilities(predictor, on_files)
    pixels = [np.asarray(Image.open(f)) for f in films]  # (32, 32) uint8 each; the model takes 16 px
    with Image.open(films[0]) as picture:
        answers = {
            "path": predictor.predict(films[0]),
            "bytes": predictor.predict(films[0].read_bytes()),
            "pillow": predictor.predict(picture),
            "2-D array": predictor.predict(pixels[0]),
            "uint16 array": predictor.predict(pixels[0].astype(np.uint16) * 257),  # 16-bit: stretched back
        }
    for form, answer in answers.items():
        assert len(answer) == 1, form
        assert _probabilities(predictor, answer) == pytest.approx(expected[:1], abs=1e-6), form
        assert answer[0]["class"] == on_files[0]["class"], form
    batch = predictor.predict(np.stack(pixels))  # (N, H, W): axis 0 the images
    assert len(batch) == 3 and _probabilities(predictor, batch) == pytest.approx(expected, abs=1e-6)
    mixed = predictor.predict([films[0].read_bytes(), pixels[1], Image.fromarray(pixels[2])])
    assert _probabilities(predictor, mixed) == pytest.approx(expected, abs=1e-6)
    assert [r["ood_score"] for r in batch] == pytest.approx([r["ood_score"] for r in on_files], abs=1e-6)


def test_predict_raises_naming_a_missing_or_unusable_file(trained_run, tmp_path):
    """predict raises a LungxrayError naming the file; predict_files still answers each with its error."""
    predictor = lungxray.load(trained_run[1])
    missing = tmp_path / "nowhere.png"
    with pytest.raises(MissingInputError, match="nowhere.png: no such file"):
        predictor.predict(missing)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(UnusableImage, match="broken.png: not an image"):
        predictor.predict([str(broken)])
    with pytest.raises(UnusableImage, match="shape \\(2, 3, 4, 5\\)"):
        predictor.predict(np.zeros((2, 3, 4, 5), dtype=np.uint8))
    with pytest.raises(UnusableImage, match="shape \\(64, 48, 3\\)"):  # a colour array, not 64 images
        predictor.predict(np.zeros((64, 48, 3), dtype=np.uint8))
    assert issubclass(MissingInputError, LungxrayError) and issubclass(UnusableImage, LungxrayError)
    assert set(predictor.predict_files([missing, broken])[1]) == {"path", "error"}


@pytest.mark.slow  # scans, trains or scores whole folders: the full suite runs it
def test_evaluate_explain_and_audit_write_what_the_cli_writes(trained_run, tmp_path):
    data, out, root = trained_run
    bundle = out / "model"
    splits = json.loads((out / "splits.json").read_text())
    given = {"splits": out / "splits.json", "cache_dir": root / "cache", "progress": False}
    flags = ("--splits", out / "splits.json", "--cache-dir", root / "cache", "--quiet")
    metrics = lungxray.evaluate(str(bundle), data, tmp_path / "api", **given)
    assert cli("evaluate", bundle, data, "--out", tmp_path / "cli", *flags) == 0
    on_disk, by_cli = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("api", "cli"))
    assert metrics["n"] == on_disk["n"] == by_cli["n"] == len(splits["test"])
    assert metrics["classes"] == on_disk["classes"] == by_cli["classes"] == ["covid", "normal", "viral_pneumonia"]
    assert on_disk["confusion_matrix"] == by_cli["confusion_matrix"] and on_disk["loss"] == pytest.approx(
        by_cli["loss"]
    )
    assert (tmp_path / "api" / "audit.json").is_file() and (tmp_path / "api" / "report.html").is_file()
    with pytest.raises(OutputExistsError):  # the CLI's default: no --force
        lungxray.evaluate(bundle, data, tmp_path / "api", **given)

    report = lungxray.audit(bundle, [data], tmp_path / "audit-api", **given)
    assert cli("audit", bundle, data, "--out", tmp_path / "audit-cli", *flags) == 0
    by_cli = json.loads((tmp_path / "audit-cli" / "audit.json").read_text())
    assert report == json.loads((tmp_path / "audit-api" / "audit.json").read_text()) == by_cli

    films = sorted((data / "Covid").glob("*.png"))[:2]
    results = lungxray.explain(lungxray.load(bundle), films, tmp_path / "why-api")
    assert cli("explain", bundle, *films, "--out", tmp_path / "why-cli") == 0
    by_cli = json.loads((tmp_path / "why-cli" / "explain.json").read_text())
    assert json.loads((tmp_path / "why-api" / "explain.json").read_text()) == results
    assert [(r["path"], r["class"]) for r in results] == [(r["path"], r["class"]) for r in by_cli]
    assert [r["probabilities"] for r in results] == [pytest.approx(r["probabilities"]) for r in by_cli]
    assert all(Path(r["overlay"]).is_file() and Path(r["overlay"]).parent == tmp_path / "why-api" for r in results)
