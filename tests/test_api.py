"""The README's Python example runs as written (on the shared dataset), and the API's options are
the settings' field names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import cli

import lungxray
from lungxray.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_the_readme_python_example_runs(shared_data, tmp_path, capsys, monkeypatch):
    code = re.search(r"## Python API.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace("../shared/data/covid19-image-dataset", str(shared_data))
    monkeypatch.chdir(tmp_path)  # runs/api and runs/api-cv land here
    capsys.readouterr()  # what `train` printed
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5 and printed[1].endswith("}")  # best params, accuracy and CI; 3 predictions; cv
    assert (tmp_path / "runs" / "api" / "model" / "checksums.json").is_file()
    assert (tmp_path / "runs" / "api-cv" / "cv.json").is_file()


def test_options_are_field_names_and_a_typo_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown option\\(s\\) trails") as info:
        lungxray.run(tmp_path, tmp_path / "out", trails=4)
    assert "trials" in info.value.hint
    configs = lungxray._configs({"trials": 3, "seed": 5, "rotation": 9.0, "img_size": 64, "epochs": 2})
    assert configs["tune"].trials == 3 and configs["split"].seed == configs["train"].seed == 5
    assert configs["train"].augment.rotation == 9.0 and configs["data"].img_size == 64


def test_the_readme_onnx_example_runs_with_onnxruntime_alone(trained_run, tmp_path, capsys):
    """The exported graph carries classes, preprocessing and temperature; the README's snippet
    classifies an image with ONNX Runtime, NumPy and Pillow only."""
    import json
    import shutil

    from lungxray.bundle import Predictor, export_onnx

    data, out, root = trained_run
    # the example repeats the tutorial's plain resize: a model trained with that preprocessing
    run = tmp_path / "plain"
    flags = "--img-size 16 --params defaults --epochs 2 --quiet --cache-dir"
    assert cli("train", data, "--out", run, "--model mlp", flags, root / "cache") == 0
    bundle = tmp_path / "model"
    shutil.copytree(run / "model", bundle)
    export_onnx(bundle)
    image = sorted((data / "Normal").glob("*.png"))[0]
    code = re.search(r"### ONNX Runtime alone.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace("runs/demo/model/model.onnx", str(bundle / "model.onnx"))
    code = code.replace("../shared/data/covid19-image-dataset/test/Normal/0101.jpeg", str(image))
    capsys.readouterr()  # what `train` printed
    exec(compile(code, "README.md", "exec"), {})
    printed = ast.literal_eval(capsys.readouterr().out.strip())  # the dict the example prints
    predictor = Predictor(bundle, backend="torch")
    assert list(printed) == predictor.classes_ and abs(sum(printed.values()) - 1) < 0.01
    expected = predictor.predict([image])[0]["probabilities"]
    assert max(abs(printed[c] - expected[c]) for c in printed) < 0.05  # PNG: the same pixels, rounding apart
    assert json.loads(json.dumps(printed))  # plain floats
