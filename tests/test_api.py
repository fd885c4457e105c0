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

import pytest
from conftest import cli

import lungxray
from lungxray.errors import ConfigError

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
