"""Research sets read as they ship: ChestX-ray14's findings joined by |, CheXpert's column per
finding (1, 0, -1, blank) with its uncertain-label policies, the COVID-19 collection's
comma-separated findings filtered by view and modality, renamed and merged findings, the errors that
name row, column and value, and the multi-label scan summary."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_image, write_csv
from PIL import Image
from test_multilabel_train import _multilabel_bundle

from lungxray.cli import main
from lungxray.config import DataConfig, Manifest, Preprocessing
from lungxray.data import load_dataset
from lungxray.errors import ConfigError, DataError
from lungxray.evaluation import Scoring, model_and_data
from lungxray.evaluation_multilabel import evaluate_multilabel, targets_for
from lungxray.labelling import CHEXPERT_FINDINGS, Findings
from lungxray.layout import Listing, normalise_class_name
from lungxray.manifest import locate

NAN = float("nan")


def _load(data, tmp_path, manifest: dict | None = None, **findings):
    cfg = DataConfig(Preprocessing(img_size=16), Manifest(**(manifest or {})), Findings(**findings),
                     cache_dir=tmp_path / "cache")  # fmt: skip
    return load_dataset(data, cfg, progress=False)


def _image(path: Path, index: int, label: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_image(label, index)).save(path)


def _equal(a, b) -> bool:
    """Target arrays equal value for value, NaN where NaN."""
    return np.array_equal(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32), equal_nan=True)


def _scan(*args) -> int:
    """``lungxray scan`` with each argument as given (column names hold spaces)."""
    return main(["scan", *map(str, args)])


# ChestX-ray14: Data_Entry_2017.csv beside images/, findings joined by |, "No Finding"
NIH_ROWS = [  # (Image Index, Finding Labels, Patient ID, View Position)
    ("00000001_000.png", "Cardiomegaly", "1", "PA"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", "1", "PA"),
    ("00000002_000.png", "No Finding", "2", "AP"),
    ("00000003_000.png", "Effusion|Infiltration", "3", "PA"),
    ("00000003_001.png", "Infiltration", "3", "AP"),
    ("00000004_000.png", "No Finding", "4", "PA"),
]


def _chestxray14(root: Path) -> Path:
    rows = []
    for i, (name, findings, patient, view) in enumerate(NIH_ROWS):
        _image(root / "images" / name, i)
        rows.append({"Image Index": name, "Finding Labels": findings, "Follow-up #": name[-7:-4].lstrip("0") or "0",
                     "Patient ID": patient, "Patient Age": str(40 + i), "Patient Gender": "MF"[i % 2],
                     "View Position": view, "OriginalImage[Width": "2048", "Height]": "2500"})  # fmt: skip
    return write_csv(root / "Data_Entry_2017.csv", rows)


def test_chestxray14_as_it_ships_gives_findings_labels_and_patients(tmp_path):
    entries = _chestxray14(tmp_path / "nih")
    ds = _load(entries, tmp_path, layout="chestxray14")
    assert ds.task == "multilabel"
    assert ds.classes == ["cardiomegaly", "effusion", "emphysema", "infiltration"]
    by_name = {s.path.name: s for s in ds.samples}
    order = [by_name[name] for name, *_ in NIH_ROWS]
    assert [s.label for s in order] == ["cardiomegaly", "cardiomegaly|emphysema", "no_finding",
                                        "effusion|infiltration", "infiltration", "no_finding"]  # fmt: skip
    expected = [[1, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert _equal([s.targets for s in order], expected)
    assert _equal(ds.targets[[ds.samples.index(s) for s in order]], expected)
    assert ds.targets.dtype == np.float32 and ds.targets.shape == (6, 4)
    # a patient's films share a group; each patient is their own
    assert order[0].group == order[1].group and order[3].group == order[4].group
    assert len({order[0].group, order[2].group, order[3].group, order[5].group}) == 4
    assert ds.summary()["manifest_patients"] == 6
    assert order[0].meta["View Position"] == "PA" and "Finding Labels" not in order[0].meta
    # the same set named column by column, without the layout: the same targets
    same = _load(entries, tmp_path, {"label_col": "Finding Labels", "image_dir": tmp_path / "nih" / "images"},
                 label_sep="|")  # fmt: skip
    assert same.classes == ds.classes and _equal(same.targets, ds.targets)
    assert [s.label for s in same.samples] == [s.label for s in ds.samples]


def test_scan_prints_each_findings_counts_prevalence_and_pairs(tmp_path, capsys):
    entries = _chestxray14(tmp_path / "nih")
    common = ("--img-size", "16", "--quiet", "--cache-dir", tmp_path / "cache")
    assert _scan(entries, "--layout", "chestxray14", "--json", *common) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "multilabel" and summary["classes"] == ["cardiomegaly", "effusion", "emphysema",
                                                                      "infiltration"]  # fmt: skip
    assert summary["findings"]["cardiomegaly"] == {"positive": 2, "negative": 4, "unknown": 0, "prevalence": 2 / 6}
    assert summary["findings"]["effusion"] == {"positive": 1, "negative": 5, "unknown": 0, "prevalence": 1 / 6}
    assert summary["counts"] == {"cardiomegaly": 2, "effusion": 1, "emphysema": 1, "infiltration": 2}
    assert summary["co_occurring"] == [{"findings": ["cardiomegaly", "emphysema"], "films": 1},
                                       {"findings": ["effusion", "infiltration"], "films": 1}]  # fmt: skip
    assert summary["findings_by_site"] == {}  # one root, no site column
    # the frontal PA films only, printed
    assert _scan(entries, "--layout", "chestxray14", "--where", "View Position=PA", *common) == 0
    out = capsys.readouterr().out
    assert "4 usable images" in out and "multi-label: 4 findings" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("cardiomegaly "))
    assert row.split() == ["cardiomegaly", "2", "/", "2", "/", "0", "50.0%"]
    assert "cardiomegaly + emphysema (1), effusion + infiltration (1)" in out


# CheXpert: train.csv inside CheXpert-v1.0-small/, paths from the folder above, a column per observation
CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", *CHEXPERT_FINDINGS]
CHEXPERT_ROWS = [  # (path under train/, Frontal/Lateral, {column: cell}; every other observation blank)
    ("patient00001/study1/view1_frontal.jpg", "Frontal", {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pleural Effusion": "0.0"}),  # noqa: E501
    ("patient00001/study1/view2_lateral.jpg", "Lateral", {"Cardiomegaly": "1.0", "Edema": "-1.0"}),
    ("patient00001/study2/view1_frontal.jpg", "Frontal", {"Edema": "1.0", "Atelectasis": "-1.0", "Fracture": "0.0"}),
    ("patient00002/study1/view1_frontal.jpg", "Frontal", {"No Finding": "1.0", "Support Devices": "1.0"}),
    ("patient00003/study1/view1_frontal.jpg", "Frontal", {"Atelectasis": "-1.0", "Edema": "0.0"}),
]  # fmt: skip


def _chexpert(root: Path, cells: dict[int, dict[str, str]] | None = None) -> Path:
    folder = root / "CheXpert-v1.0-small"
    rows = []
    for i, (path, view, given) in enumerate(CHEXPERT_ROWS):
        _image(folder / "train" / path, i)
        shown = {"Path": f"CheXpert-v1.0-small/train/{path}", "Sex": "Female", "Age": str(60 + i),
                 "Frontal/Lateral": view, "AP/PA": "AP" if view == "Frontal" else ""}  # fmt: skip
        row = dict.fromkeys(CHEXPERT_COLUMNS, "") | shown | given
        rows.append(row | (cells or {}).get(i, {}))
    return write_csv(folder / "train.csv", rows)


def _chexpert_targets(ds) -> dict[str, dict[str, float]]:
    """Each film's known targets, by its path under train/ and finding."""
    return {"/".join(s.path.parts[-3:]): {f: v for f, v in zip(ds.classes, s.targets, strict=True) if not math.isnan(v)}
            for s in ds.samples}  # fmt: skip


def test_chexpert_as_it_ships_with_each_uncertain_policy(tmp_path):
    train = _chexpert(tmp_path)
    frontal = {"where": ("Frontal/Lateral=Frontal",)}
    ds = _load(train, tmp_path, frontal, layout="chexpert")
    findings = sorted(normalise_class_name(c) for c in CHEXPERT_FINDINGS)
    assert ds.task == "multilabel" and ds.classes == findings and len(ds.samples) == 4  # the lateral left out
    known = {
        "patient00001/study1/view1_frontal.jpg": {"cardiomegaly": 1.0, "pleural_effusion": 0.0},
        "patient00001/study2/view1_frontal.jpg": {"edema": 1.0, "fracture": 0.0},
        "patient00002/study1/view1_frontal.jpg": dict.fromkeys(findings, 0.0) | {"support_devices": 1.0},
        "patient00003/study1/view1_frontal.jpg": {"edema": 0.0},
    }
    assert _chexpert_targets(ds) == known  # -1 ignored and blank: unknown (NaN), but negative on No Finding's row
    first = next(s for s in ds.samples if s.path.parts[-3:-1] == ("patient00001", "study1"))
    assert math.isnan(first.targets[findings.index("edema")])  # -1, ignored
    assert int(np.isnan(ds.targets).sum()) == 4 * 13 - 5 - 13
    assert sorted(s.label for s in ds.samples) == ["cardiomegaly", "edema", "no_finding", "support_devices"]
    groups = {s.path.parts[-3]: set() for s in ds.samples}
    for s in ds.samples:
        groups[s.path.parts[-3]].add(s.group)
    assert len(groups["patient00001"]) == 1 and len(set.union(*groups.values())) == 3  # patients from the paths
    positive = _chexpert_targets(_load(train, tmp_path, frontal, layout="chexpert", uncertain="positive"))
    assert positive["patient00001/study1/view1_frontal.jpg"] == {"cardiomegaly": 1.0, "edema": 1.0,
                                                                 "pleural_effusion": 0.0}  # fmt: skip
    assert positive["patient00003/study1/view1_frontal.jpg"] == {"atelectasis": 1.0, "edema": 0.0}
    negative = _chexpert_targets(_load(train, tmp_path, frontal, layout="chexpert", uncertain="negative"))
    assert negative["patient00001/study2/view1_frontal.jpg"] == {"edema": 1.0, "atelectasis": 0.0, "fracture": 0.0}
    mixed = _load(train, tmp_path, frontal, layout="chexpert", uncertain=("positive", "Edema=negative"))
    mixed = _chexpert_targets(mixed)
    assert mixed["patient00001/study1/view1_frontal.jpg"]["edema"] == 0.0  # its own policy
    assert mixed["patient00003/study1/view1_frontal.jpg"]["atelectasis"] == 1.0  # every other finding's


def test_scan_takes_the_chexpert_layout_and_policies_as_flags(tmp_path, capsys):
    train = _chexpert(tmp_path)
    code = _scan(train, "--layout", "chexpert", "--where", "Frontal/Lateral=Frontal", "--uncertain", "positive",
                 "--uncertain", "edema=negative", "--json", "--img-size", "16", "--quiet", "--cache-dir",
                 tmp_path / "cache")  # fmt: skip
    assert code == 0
    findings = json.loads(capsys.readouterr().out)["findings"]
    # edema: 1.0 once, -1.0 once (its own policy: negative), 0.0 once; atelectasis: -1.0 twice (positive);
    # every blank cell of the No Finding row: negative
    assert findings["edema"] == {"positive": 1, "negative": 3, "unknown": 0, "prevalence": 1 / 4}
    assert findings["atelectasis"] == {"positive": 2, "negative": 1, "unknown": 1, "prevalence": 2 / 3}
    assert findings["lung_lesion"] == {"positive": 0, "negative": 1, "unknown": 3, "prevalence": 0.0}


def test_finding_cols_all_takes_the_columns_of_1_0_minus_1_and_blank(tmp_path):
    train = _chexpert(tmp_path)
    located = locate(train, Manifest(path_col="Path", image_dir=tmp_path), Findings(finding_cols="all"))
    # not Sex, Age, Frontal/Lateral, AP/PA (other values), No Finding (the absence of the others), nor the
    # observations blank on every row here
    assert located.findings == ["atelectasis", "cardiomegaly", "edema", "fracture", "pleural_effusion",
                                "support_devices"]  # fmt: skip
    picked = locate(train, Manifest(path_col="Path", image_dir=tmp_path),
                    Findings(finding_cols="Edema,Cardiomegaly", uncertain="positive"))  # fmt: skip
    assert picked.findings == ["cardiomegaly", "edema"]
    by_path = {"/".join(p.parts[-3:]): o.targets for p, o in picked.origins.items()}
    assert _equal(by_path["patient00001/study1/view1_frontal.jpg"], (1.0, 1.0))
    assert _equal(by_path["patient00001/study2/view1_frontal.jpg"], (NAN, 1.0))
    assert _equal(by_path["patient00002/study1/view1_frontal.jpg"], (0.0, 0.0))  # No Finding: blank is negative
    assert _equal(by_path["patient00003/study1/view1_frontal.jpg"], (NAN, 0.0))


def test_a_no_finding_row_makes_its_blank_finding_cells_negative_and_keeps_its_given_cells(tmp_path):
    # patient00002: No Finding 1, Support Devices 1, here Edema -1 too; patient00003: No Finding 0
    train = _chexpert(tmp_path, cells={3: {"Edema": "-1.0"}, 4: {"No Finding": "0.0"}})
    frontal = {"where": ("Frontal/Lateral=Frontal",)}
    targets = _chexpert_targets(_load(train, tmp_path, frontal, layout="chexpert", uncertain="positive"))
    findings = sorted(normalise_class_name(c) for c in CHEXPERT_FINDINGS)
    assert targets["patient00002/study1/view1_frontal.jpg"] == dict.fromkeys(findings, 0.0) | {
        "support_devices": 1.0, "edema": 1.0}  # fmt: skip
    assert targets["patient00003/study1/view1_frontal.jpg"] == {"atelectasis": 1.0, "edema": 0.0}  # blanks unknown
    # the no-finding column is the one --no-finding-label names
    other = _chexpert_targets(_load(train, tmp_path, frontal, layout="chexpert", no_finding_label="Normal"))
    assert other["patient00002/study1/view1_frontal.jpg"] == {"support_devices": 1.0}


def test_a_finding_cell_that_is_not_1_0_minus_1_or_blank_is_named_by_row_column_and_value(tmp_path):
    train = _chexpert(tmp_path, cells={1: {"Edema": "2"}, 3: {"Pleural Effusion": "yes", "Fracture": "1.5"}})
    with pytest.raises(DataError) as err:
        locate(train, Manifest(), Findings(layout="chexpert"))
    message = str(err.value)
    assert "3 problem(s)" in message and str(train) in message
    assert "row 3, column Edema: '2' is not 1, 0, -1 or blank" in message
    assert "row 5, column Pleural Effusion: 'yes' is not 1, 0, -1 or blank" in message
    assert "row 5, column Fracture: '1.5' is not 1, 0, -1 or blank" in message
    with pytest.raises(DataError, match=r"--finding-cols: .* has no column 'Effusion' \(its columns: Path, Sex"):
        locate(train, Manifest(), Findings(finding_cols="Edema,Effusion"))
    with pytest.raises(DataError) as err:
        locate(train, Manifest(), Findings(layout="chexpert", patient_from_path=r"p\d{8}"))
    assert (
        "row 2, column Path: no patient in 'CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg' "
        r"(--patient-from-path 'p\d{8}')" in str(err.value)
    )


# The COVID-19 collection: metadata.csv beside images/, findings joined by commas, views and modalities
COVID_ROWS = [  # (patientid, finding, view, modality, folder, filename)
    ("1", "COVID-19", "PA", "X-ray", "images", "a.png"),
    ("1", "COVID-19, ARDS", "AP", "X-ray", "images", "b.png"),
    ("2", "Pneumonia/Viral/COVID-19", "AP Supine", "X-ray", "images", "c.png"),
    ("3", "Pneumocystis", "L", "X-ray", "images", "d.png"),
    ("4", "No Finding", "PA", "X-ray", "images", "e.png"),
    ("5", "COVID-19", "Axial", "CT", "volumes", "f.nii.gz"),
    ("6", "Streptococcus, Pneumocystis", "PA", "X-ray", "images", "g.png"),
]


def _covid(root: Path) -> Path:
    rows = []
    for i, (patient, finding, view, modality, folder, name) in enumerate(COVID_ROWS):
        if folder == "images":
            _image(root / folder / name, i)
        location = "Milan" if patient in ("1", "4") else "Wuhan"
        rows.append({"patientid": patient, "offset": "", "sex": "M", "age": "50", "finding": finding,
                     "RT_PCR_positive": "Y" if "COVID" in finding else "", "survival": "", "view": view,
                     "modality": modality, "date": "2020", "location": location, "folder": folder, "filename": name,
                     "doi": "", "url": "https://example.org", "license": "CC BY", "clinical_notes": "",
                     "other_notes": ""})  # fmt: skip
    return write_csv(root / "metadata.csv", rows)


def test_covid_metadata_with_view_and_modality_filters_and_merged_findings(tmp_path):
    metadata = _covid(tmp_path / "covid")
    where = {"where": ("view=PA,AP", "modality=X-ray")}
    ds = _load(metadata, tmp_path, where | {"site_col": "location"}, layout="covid-metadata")
    assert sorted(s.path.name for s in ds.samples) == ["a.png", "b.png", "e.png", "g.png"]
    assert ds.classes == ["ards", "covid_19", "pneumocystis", "streptococcus"]
    by_name = {s.path.name: s for s in ds.samples}
    assert _equal(by_name["b.png"].targets, [1, 1, 0, 0]) and by_name["b.png"].label == "ards|covid_19"
    assert _equal(by_name["e.png"].targets, [0, 0, 0, 0]) and by_name["e.png"].label == "no_finding"
    assert by_name["a.png"].group == by_name["b.png"].group != by_name["g.png"].group  # patient 1's two films
    by_site = ds.summary()["findings_by_site"]
    assert ds.sites == ["Milan", "Wuhan"] and by_site["Milan"]["covid_19"] == {
        "positive": 2, "negative": 1, "unknown": 0, "prevalence": 2 / 3}  # fmt: skip
    assert by_site["Wuhan"]["streptococcus"]["prevalence"] == 1.0 and by_site["Wuhan"]["ards"]["prevalence"] == 0.0
    # merged (the names before = into the name after it) and dropped (nothing after =)
    merged = _load(metadata, tmp_path, where, layout="covid-metadata", map=("COVID-19, ARDS=covid", "Pneumocystis="))
    assert merged.classes == ["covid", "streptococcus"]
    labels = {s.path.name: s.label for s in merged.samples}
    assert labels == {"a.png": "covid", "b.png": "covid", "e.png": "no_finding", "g.png": "streptococcus"}
    assert _equal(merged.targets[[s.path.name == "g.png" for s in merged.samples]], [[0, 1]])
    # the same renames from a CSV of from,to; a name the data lacks is warned of, not an error
    pairs = [("COVID-19", "covid"), ("ARDS", "covid"), ("Pneumocystis", ""), ("SARS", "covid")]
    table = write_csv(tmp_path / "map.csv", [{"from": a, "to": b} for a, b in pairs])
    with pytest.warns(UserWarning, match=r"--map or --uncertain name\(s\) that the data does not have: sars"):
        from_file = _load(metadata, tmp_path, where, layout="covid-metadata", map=str(table))
    assert from_file.classes == merged.classes and _equal(from_file.targets, merged.targets)


def test_map_renames_and_drops_single_label_classes(tmp_path):
    rows = []
    for i, label in enumerate(["Viral Pneumonia", "Bacterial Pneumonia", "Normal", "Other", "Normal"]):
        _image(tmp_path / "img" / f"{i}.png", i, label=i % 3)
        rows.append({"path": f"img/{i}.png", "label": label})
    manifest = write_csv(tmp_path / "m.csv", rows)
    ds = _load(manifest, tmp_path, map=("Viral Pneumonia,Bacterial Pneumonia=pneumonia", "other="))
    assert ds.task == "single" and ds.classes == ["normal", "pneumonia"] and ds.samples[0].targets is None
    assert [s.label for s in ds.samples] == ["pneumonia", "pneumonia", "normal", "normal"]
    assert _equal(ds.targets, np.eye(2)[[1, 1, 0, 0]])  # single-label: the one-hot of the labels
    assert [(Path(s.path).name, s.reason) for s in ds.skipped] == [("3.png", "its class (Other) is dropped by --map")]


def test_a_class_that_map_drops_leaves_its_films_out_in_multilabel_mode_too(tmp_path):
    for i, name in enumerate(["Covid", "Normal", "Effusion"]):
        _image(tmp_path / "tree" / name / "a.png", i, label=i)
    ds = _load(tmp_path / "tree", tmp_path, task="multilabel", map="covid=")
    assert ds.classes == ["effusion", "normal"]
    assert sorted(s.path.parent.name for s in ds.samples) == ["Effusion", "Normal"]
    assert [(Path(s.path).parent.name, s.reason) for s in ds.skipped] == [
        ("Covid", "its class (covid) is dropped by --map")
    ]
    # a label column of one class per film, read as findings: the same
    rows = [{"path": f"tree/{name}/a.png", "label": name} for name in ["Covid", "Normal", "Effusion"]]
    located = locate(write_csv(tmp_path / "m.csv", rows), Manifest(), Findings(task="multilabel", map="covid="))
    assert sorted(p.parent.name for p, _, _ in located.files) == ["Effusion", "Normal"]
    assert [s.reason for s in located.skipped] == ["its class (Covid) is dropped by --map"]
    # findings joined by a separator: a film naming only dropped ones stays, negative for the others
    nih = locate(_chestxray14(tmp_path / "nih"), Manifest(), Findings(layout="chestxray14", map="Infiltration="))
    assert nih.findings == ["cardiomegaly", "effusion", "emphysema"] and not nih.skipped
    assert _equal(nih.origins[tmp_path / "nih" / "images" / "00000003_001.png"].targets, [0, 0, 0])


def test_task_single_with_a_separator_takes_one_finding_per_film(tmp_path):
    names = [name for name, *_ in NIH_ROWS]
    entries = _chestxray14(tmp_path / "nih")
    with pytest.raises(DataError) as err:
        locate(entries, Manifest(), Findings(layout="chestxray14", task="single"))
    assert "row 3, column Finding Labels: 'Cardiomegaly|Emphysema' names 2 findings (cardiomegaly, emphysema)" in str(
        err.value
    ) and "row 5, column Finding Labels: 'Effusion|Infiltration'" in str(err.value)
    located = locate(entries, Manifest(where=("Patient ID=2,4",)), Findings(layout="chestxray14", task="single"))
    assert [label for _, label, _ in located.files] == ["no_finding", "no_finding"] and located.findings is None
    assert [p.name for p, _, _ in located.files] == [names[2], names[5]]


def test_the_same_file_twice_with_other_findings_is_an_error(tmp_path):
    entries = _chestxray14(tmp_path / "nih")
    with open(entries, "a", newline="") as handle:
        csv.writer(handle).writerow(["00000001_000.png", "Cardiomegaly", "0", "1", "41", "M", "PA", "1", "1"])
        csv.writer(handle).writerow(["00000002_000.png", "Mass", "0", "2", "41", "M", "AP", "1", "1"])
    with pytest.raises(DataError) as err:
        locate(entries, Manifest(), Findings(layout="chestxray14"))
    assert "1 problem(s)" in str(err.value)  # the same findings again: one film, once
    assert "row 9: " in str(err.value) and "00000002_000.png again, as 'mass' (row 4 says 'no_finding')" in str(
        err.value
    )


def test_identical_films_with_different_findings_are_flagged(tmp_path, capsys):
    entries = _chestxray14(tmp_path / "nih")
    images = tmp_path / "nih" / "images"
    (images / "00000005_000.png").write_bytes((images / "00000003_000.png").read_bytes())  # a copy, other findings
    with open(entries, "a", newline="") as handle:
        csv.writer(handle).writerow(["00000005_000.png", "Effusion", "0", "5", "41", "M", "PA", "1", "1"])
    common = ("--layout", "chestxray14", "--img-size", "16", "--quiet", "--cache-dir", tmp_path / "cache")
    assert _scan(entries, "--json", *common) == 0
    mixed = json.loads(capsys.readouterr().out)["mixed_label_duplicate_groups"]
    assert [sorted((Path(m["path"]).name, m["label"]) for m in g) for g in mixed] == [
        [("00000003_000.png", "effusion|infiltration"), ("00000005_000.png", "effusion")]
    ]
    assert _scan(entries, *common) == 0
    assert "1 duplicate group(s) whose copies carry different labels" in capsys.readouterr().out


def test_task_multilabel_reads_class_folders_as_one_finding_each(tmp_path):
    for i, name in enumerate(["Covid", "Normal", "No Finding"]):
        _image(tmp_path / "tree" / name / "a.png", i, label=i)
    ds = _load(tmp_path / "tree", tmp_path, task="multilabel")
    assert ds.task == "multilabel" and ds.classes == ["covid", "normal"]
    assert {s.path.parent.name: s.label for s in ds.samples} == {"Covid": "covid", "Normal": "normal",
                                                                 "No Finding": "no_finding"}  # fmt: skip
    by_folder = {s.path.parent.name: s.targets for s in ds.samples}
    assert by_folder == {"Covid": (1.0, 0.0), "Normal": (0.0, 1.0), "No Finding": (0.0, 0.0)}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"uncertain": "maybe"}, "--uncertain 'maybe': the policy must be one of ignore, positive, negative"),
        ({"uncertain": ("positive", "negative")}, "--uncertain gives two policies for every finding"),
        ({"label_sep": "|", "finding_cols": "all"}, "--label-sep and --finding-cols both say"),
        ({"layout": "chexpert", "task": "single"}, "--task single reads one class per film"),
        ({"patient_from_path": "patient("}, "--patient-from-path 'patient(' is not a regular expression"),
        ({"layout": "nih"}, "--layout must be one of chestxray14, chexpert, covid-metadata"),
        ({"map": "no-such-file.csv"}, "--map 'no-such-file.csv' is neither NAMES=NAME nor a CSV file"),
    ],
)
def test_findings_settings_are_checked_naming_the_flag(tmp_path, settings, message):
    with pytest.raises(ConfigError) as err:
        locate(tmp_path / "m.csv", Manifest(), Findings(**settings))
    assert message in str(err.value)


def test_task_auto_is_multilabel_only_where_a_film_can_carry_several_findings():
    assert not Findings().multilabel and not Findings(map="a=b").multilabel
    assert Findings(label_sep="|").multilabel and Findings(finding_cols="all").multilabel
    assert Findings(layout="covid-metadata").multilabel and not Findings(layout="chestxray14", task="single").multilabel


def test_reading_a_manifest_lists_each_folder_once_instead_of_a_status_call_per_row(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(300):
        (folder / f"{i:08d}_000.png").touch()  # placeholders: reading the manifest opens no image
        rows.append({"Image Index": f"{i:08d}_000.png", "Finding Labels": "Effusion" if i % 3 else "No Finding",
                     "Patient ID": str(i // 2)})  # fmt: skip
    entries = write_csv(tmp_path / "Data_Entry_2017.csv", rows)
    calls = {"stat": 0, "scandir": 0}
    stat, scandir = os.stat, os.scandir
    monkeypatch.setattr(os, "stat", lambda *a, **k: calls.__setitem__("stat", calls["stat"] + 1) or stat(*a, **k))
    monkeypatch.setattr(os, "scandir", lambda *a: calls.__setitem__("scandir", calls["scandir"] + 1) or scandir(*a))
    located = locate(entries, Manifest(), Findings(layout="chestxray14"))
    assert len(located.files) == 300 and located.findings == ["effusion"]
    assert calls["scandir"] < 5 and calls["stat"] < 10  # not one per row: images/ listed once


def test_a_name_the_folder_listing_spells_otherwise_is_found_as_the_file_system_finds_it(tmp_path, monkeypatch):
    # a case-insensitive file system (macOS, Windows) opens a.png as A.PNG; its listing spells one of them
    (tmp_path / "images").mkdir()
    names = ["a.png", "b.png", "c.png"]
    for name in names:
        (tmp_path / "images" / name).touch()
    listed = Listing._list
    monkeypatch.setattr(
        Listing, "_list", staticmethod(lambda folder: {k.upper(): v for k, v in listed(folder).items()})
    )
    rows = [{"path": f"images/{name}", "label": "normal"} for name in [*names, "d.png"]]
    with pytest.raises(DataError) as err:
        locate(write_csv(tmp_path / "m.csv", rows), Manifest())
    assert "1 problem(s): row 5, column path: 'images/d.png' does not exist" in str(err.value)
    located = locate(write_csv(tmp_path / "m.csv", rows[:3]), Manifest())
    assert [p.name for p, _, _ in located.files] == names


def _evaluated(model: Path, data: Path, tmp_path: Path, **findings):
    """The bundle, the dataset, the indices scored and their targets in the model's finding order,
    as ``lungxray evaluate`` reads them."""
    scoring = Scoring(model, data, DataConfig(manifest=Manifest(), findings=Findings(**findings),
                                              cache_dir=tmp_path / "cache"), progress=False)  # fmt: skip
    predictor, ds, idx, _ = model_and_data(scoring)
    return predictor, ds, idx, targets_for(predictor, ds, idx)


def test_a_finding_no_label_column_names_is_negative_where_a_column_per_finding_leaves_it_unknown(tmp_path):
    _, model = _multilabel_bundle(tmp_path)  # effusion, cardiomegaly, nodule
    nih = _chestxray14(tmp_path / "nih")
    _, ds, idx, y = _evaluated(model, nih, tmp_path, layout="chestxray14", map="Emphysema, Infiltration=")
    assert ds.classes == ["cardiomegaly", "effusion"] and len(idx) == 6
    assert _equal(y[:, :2], ds.targets[idx][:, ::-1]) and _equal(y[:, 2], np.zeros(6))  # nodule: no film names it
    assert ds.unnamed_negative
    train = _chexpert(tmp_path / "chexpert")
    _, ds, idx, y = _evaluated(model, train, tmp_path, layout="chexpert", finding_cols="Pleural Effusion,Cardiomegaly",
                               map="Pleural Effusion=effusion")  # fmt: skip
    assert ds.classes == ["cardiomegaly", "effusion"] and not ds.unnamed_negative and len(idx) == 5
    assert _equal(y[:, :2], ds.targets[idx][:, ::-1]) and np.isnan(y[:, 2]).all()  # no column for nodule: unknown


def test_a_set_whose_every_film_names_no_finding_is_evaluated_negative_for_each(tmp_path):
    _, model = _multilabel_bundle(tmp_path)
    nih = _chestxray14(tmp_path / "nih")
    with open(nih, newline="") as handle:
        normal = [row for row in csv.DictReader(handle) if row["Finding Labels"] == "No Finding"]
    only_normal = write_csv(tmp_path / "nih" / "normal.csv", normal)
    predictor, ds, idx, y = _evaluated(model, only_normal, tmp_path, layout="chestxray14")
    assert ds.classes == [] and ds.targets.shape == (2, 0) and _equal(y, np.zeros((2, 3)))
    metrics = evaluate_multilabel(predictor, ds, idx, tmp_path / "out")
    assert [metrics["per_finding"][f]["counts"]["negatives"] for f in ("effusion", "cardiomegaly", "nodule")] == [2] * 3
    assert metrics["macro_auroc"] is None  # no positive film: nothing to rank
    with pytest.raises(DataError, match=r"found 0 finding\(s\) .* need at least 1: "):
        _load(only_normal, tmp_path, layout="chestxray14")  # as run and cv read a set: nothing to learn


def test_one_finding_makes_a_multilabel_set_but_one_class_no_single_label_one(tmp_path):
    nih = _chestxray14(tmp_path / "nih")
    ds = _load(nih, tmp_path, layout="chestxray14", map="Emphysema, Infiltration, Effusion=")  # as run and cv read it
    assert ds.task == "multilabel" and ds.classes == ["cardiomegaly"]
    assert {s.path.name: s.targets for s in ds.samples} == {
        name: (1.0 if "Cardiomegaly" in findings else 0.0,) for name, findings, *_ in NIH_ROWS}  # fmt: skip
    with pytest.raises(DataError, match=r"found 1 class folder\(s\) .* need at least 2: "):
        _load(nih, tmp_path, {"where": ("Finding Labels=No Finding",)}, layout="chestxray14", task="single")
