"""lungxray compare: the settings and headline figures of a run, a cv and an evaluate folder side by
side, as markdown (printed) and as CSV, read back against the files those commands wrote; a folder
that holds no run is named with why."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import cli, write_tree


def _json(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A run (with an external set), a cv and an evaluation of the run's model on the external set:
    tiny MLPs on 16 px synthetic films."""
    root = tmp_path_factory.mktemp("compare")
    data, ext = write_tree(root / "data", per_class=10), write_tree(root / "ext", per_class=4, start=50)
    small = "--model mlp --img-size 16 --quiet --cache-dir"
    run, cv, ev = root / "run", root / "cv", root / "ev"
    assert cli("run", data, "--out", run, small, root / "cache", "--trials 2 --epochs 3 --seed 1 --external", ext) == 0
    assert cli("cv", data, "--out", cv, small, root / "cache", "--epochs 2 --folds 3 --seed 2") == 0
    assert cli("evaluate", run / "model", ext, "--out", ev, "--quiet --cache-dir", root / "cache") == 0
    return {"run": run, "cv": cv, "ev": ev, "data": data}


def _table(printed: str) -> dict[str, list[str]]:
    """The markdown table's rows: first cell (bold marks taken off) -> the other cells; "bold" -> the
    first cells that were bold."""
    rows = {"bold": []}
    for line in printed.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            name, *cells = [c.strip() for c in line.strip("|").split(" | ")]
            if name.startswith("**"):
                name = name.strip("*")
                rows["bold"].append(name)
            rows[name] = cells
    return rows


@pytest.mark.slow
def test_compare_prints_each_folders_settings_and_figures(folders, capsys):
    run, cv, ev = folders["run"], folders["cv"], folders["ev"]
    capsys.readouterr()
    assert cli("compare", run, cv, ev) == 0
    printed = capsys.readouterr().out
    rows = _table(printed)
    assert rows["folder"] == [str(run), str(cv), str(ev)]
    assert rows["kind"] == ["run", "cv", "evaluate"]
    # settings: the run's from run.json, the cv's from cv.json, the evaluation's from the run's bundle
    assert rows["model"] == ["mlp", "mlp", "mlp"]
    assert rows["img_size"] == ["16", "16", "16"]
    assert rows["seed"] == ["1", "2", "1"]
    assert {"data", "seed"} <= set(rows["bold"])  # they differ
    assert not {"model", "img_size", "site_balanced", "trials"} & set(rows["bold"])  # alike, or held by one folder
    assert rows["trials"] == ["2", "", ""]
    assert rows["epochs"] == ["3", "2", ""]
    assert rows["final_epochs"] == ["3", "", "3"]
    assert rows["folds"] == ["", "3", ""]
    assert rows["site_balanced"] == rows["site_normalise"] == ["false", "false", "false"]
    assert rows["val_by"] == ["group", "group", ""]  # cv.json records it too (cv --by site --val-by site)
    assert rows["bundle"] == ["", "", str((run / "model").resolve())]
    best = _json(run, "best_params.json")["params"]
    fold_lr = [f["params"]["learning_rate"] for f in _json(cv, "cv.json")["per_fold"]]
    assert len(set(fold_lr)) == 1  # fixed parameters: the model's defaults in every fold
    assert rows["hp.learning_rate"] == [json.dumps(best["learning_rate"]), json.dumps(fold_lr[0]),
                                            json.dumps(best["learning_rate"])]  # fmt: skip
    # figures: metrics.json's, cv's pooled ones and their mean +- sd over folds, the external set's
    m, c, e = _json(run, "metrics.json"), _json(cv, "cv.json"), _json(ev, "metrics.json")
    pooled = c["pooled"]
    assert rows["macro-F1"] == [f"{m['macro_f1']:.4f}", f"{pooled['macro_f1']:.4f}", f"{e['macro_f1']:.4f}"]
    assert rows["accuracy (majority class)"] == [
        f"{x['accuracy']:.4f} ({x['baseline']['accuracy']:.4f})" for x in (m, pooled, e)
    ]
    assert rows["macro AUROC"] == [f"{x['macro_auroc']:.4f}" for x in (m, pooled, e)]
    assert rows["images scored"] == [str(m["n"]), str(pooled["n"]), str(e["n"])]
    s = c["summary"]["macro_f1"]
    assert rows["macro-F1 over folds, mean ± sd"] == ["", f"{s['mean']:.4f} ± {s['std']:.4f}", ""]
    external = _json(run / "external" / "ext", "metrics.json")
    assert rows["external ext: macro-F1"] == [f"{external['macro_f1']:.4f}", "", ""]
    assert "**bold**: a setting that differs" in printed


@pytest.mark.slow
def test_compare_writes_csv_a_row_per_folder(folders, tmp_path, capsys):
    run, cv, ev = folders["run"], folders["cv"], folders["ev"]
    target = tmp_path / "runs.csv"
    assert cli("compare", run, cv, ev, "--csv", target) == 0
    assert f"written: {target}" in capsys.readouterr().out  # and the markdown table above it
    rows = list(csv.DictReader(target.open()))
    assert [r["folder"] for r in rows] == [str(run), str(cv), str(ev)]
    assert [r["kind"] for r in rows] == ["run", "cv", "evaluate"]
    assert [r["seed"] for r in rows] == ["1", "2", "1"]
    m, c, e = _json(run, "metrics.json"), _json(cv, "cv.json"), _json(ev, "metrics.json")
    # plain numbers, exact: a spreadsheet computes with them
    assert [float(r["macro_f1"]) for r in rows] == [m["macro_f1"], c["pooled"]["macro_f1"], e["macro_f1"]]
    assert float(rows[0]["majority_accuracy"]) == m["baseline"]["accuracy"]
    assert float(rows[1]["macro_f1_mean"]) == c["summary"]["macro_f1"]["mean"]
    assert rows[0]["macro_f1_mean"] == rows[2]["macro_f1_mean"] == ""
    assert float(rows[0]["external.ext.macro_f1"]) == _json(run / "external" / "ext", "metrics.json")["macro_f1"]
    # "-" prints the same table instead of the markdown; an existing file is never replaced
    assert cli("compare", run, cv, ev, "--csv -") == 0
    assert capsys.readouterr().out == target.read_text()
    assert cli("compare", run, "--csv", target) == 2
    assert "already exists" in capsys.readouterr().err
    assert len(list(csv.DictReader(target.open()))) == 3


@pytest.mark.slow
def test_compare_names_a_folder_it_skips_and_compares_the_rest(folders, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli("compare", folders["run"], folders["data"], missing) == 0
    out, err = capsys.readouterr()
    assert f"skipped {folders['data']}: {folders['data']} holds no metrics.json or cv.json" in err
    assert f"skipped {missing}: no such folder" in err
    assert _table(out)["kind"] == ["run"]


def test_compare_fails_when_no_folder_holds_a_run(tmp_path, capsys):
    data = write_tree(tmp_path / "data", per_class=1)
    assert cli("compare", data, tmp_path / "nowhere") == 1
    err = capsys.readouterr().err
    assert f"skipped {data}: {data} holds no metrics.json or cv.json" in err
    assert f"skipped {tmp_path / 'nowhere'}: no such folder" in err
    assert "none of the folders holds a run, cv or evaluation" in err
