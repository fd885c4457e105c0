"""Datasets with sites: CSV manifests and several roots, the errors that name row, column and value,
held-out sites that no training image reaches, and the class x site audit."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, cli, synthetic_image, write_csv, write_tree
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lungxray.config import DataConfig, Manifest, Preprocessing, SplitConfig
from lungxray.confound import audit
from lungxray.data import Dataset, Sample, load_dataset
from lungxray.errors import ConfigError, DataError
from lungxray.splits import make_split, site_folds


def _load(data, tmp_path, **manifest):
    cfg = DataConfig(Preprocessing(img_size=16), Manifest(**manifest), cache_dir=tmp_path / "cache")
    return load_dataset(data, cfg, progress=False)


def _images(folder: Path, n: int, label: int = 0, start: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(start, start + n):
        Image.fromarray(synthetic_image(label, i)).save(folder / f"f{label}_{i}.png")
        names.append(f"f{label}_{i}.png")
    return names


def test_a_manifest_gives_classes_sites_patients_and_metadata(tmp_path):
    rows = []
    for label in range(2):
        for i, name in enumerate(_images(tmp_path / "img", 6, label)):
            rows.append({"path": f"img/{name}", "label": ["Covid", "Viral Pneumonia"][label],
                         "patient": f"p{i // 2}", "site": "north" if i < 3 else "south", "view": "PA"})  # fmt: skip
    manifest = write_csv(tmp_path / "labels.csv", rows)
    ds = _load(manifest, tmp_path)
    assert ds.classes == ["covid", "viral_pneumonia"] and len(ds.samples) == 12
    assert ds.sites == ["north", "south"]
    assert ds.site_class_counts() == {
        "north": {"covid": 3, "viral_pneumonia": 3},
        "south": {"covid": 3, "viral_pneumonia": 3},
    }
    assert all(s.meta == {"view": "PA"} for s in ds.samples)
    by_path = {s.path.name: s for s in ds.samples}
    # patient p0 of a site: films f0_0 and f0_1 share a group; p0 at the other site is another person
    assert by_path["f0_0.png"].group == by_path["f0_1.png"].group != by_path["f0_2.png"].group
    assert by_path["f0_2.png"].group != by_path["f0_3.png"].group  # p1 at north and p1 at south
    assert ds.summary()["manifest_patients"] == 12


def test_where_column_flags_and_image_dir_read_a_published_layout(tmp_path):
    names = _images(tmp_path / "images", 4, 0) + _images(tmp_path / "images", 4, 1)
    rows = [{"Image Index": n, "Finding": "a" if n.startswith("f0") else "b", "View Position": "PA" if i % 2 else "AP",
             "Patient ID": str(i)} for i, n in enumerate(names)]  # fmt: skip
    (tmp_path / "meta").mkdir()
    manifest = write_csv(tmp_path / "meta" / "entries.csv", rows)
    ds = _load(manifest, tmp_path, label_col="Finding", image_dir=tmp_path / "images", where=("View Position=PA",))
    assert sorted(s.path.name for s in ds.samples) == sorted(n for i, n in enumerate(names) if i % 2)
    assert ds.classes == ["a", "b"] and ds.sites == []  # one root and no site column: no sites
    assert all(s.meta == {"View Position": "PA"} for s in ds.samples)


def test_a_manifest_without_a_label_column_takes_the_class_from_the_folder(tmp_path):
    write_tree(tmp_path / "data", per_class=3)
    rows = [
        {"file": str(p.relative_to(tmp_path / "data")), "source": "x"}
        for p in sorted((tmp_path / "data").rglob("*.png"))
    ]
    manifest = write_csv(tmp_path / "data" / "manifest.csv", rows)
    ds = _load(manifest, tmp_path, site_col="source")
    assert ds.counts() == dict.fromkeys(["covid", "normal", "viral_pneumonia"], 3) and ds.sites == ["x"]


def test_several_roots_make_one_dataset_each_root_a_site(tmp_path):
    a = write_tree(tmp_path / "hospital_a", per_class=4)
    b = write_tree(tmp_path / "hospital_b", per_class=4, start=20)
    ds = _load([a, b], tmp_path)
    assert ds.sites == ["hospital_a", "hospital_b"] and len(ds.samples) == 24
    assert ds.site_class_counts()["hospital_b"] == dict.fromkeys(ds.classes, 4)
    assert ds.summary()["sources"] == [str(a), str(b)]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"path": "img/missing.png", "label": "a"}, "row 4, column path: 'img/missing.png' does not exist"),
        ({"path": "../outside.png", "label": "a"}, "row 4, column path: '../outside.png' lies outside"),
        ({"path": "img/f0_0.png", "label": ""}, "row 4, column label: empty"),
        ({"path": "img/f0_0.png", "label": "+++"}, "row 4, column label: '+++' names no class"),
        ({"path": "img/f0_0.png", "label": "b"}, "row 4: "),
        ({"path": "", "label": "a"}, "row 4, column path: empty"),
    ],
)
def test_each_bad_row_is_named_by_row_column_and_value(tmp_path, row, message):
    _images(tmp_path / "img", 2, 0)
    Image.fromarray(synthetic_image(0, 9)).save(tmp_path / "outside.png")
    rows = [{"path": "img/f0_0.png", "label": "a"}, {"path": "img/f0_1.png", "label": "b"}, row]
    root = tmp_path / "set"
    root.mkdir()
    (root / "img").symlink_to(tmp_path / "img")
    manifest = write_csv(root / "m.csv", rows)
    with pytest.raises(DataError) as err:
        _load(manifest, tmp_path)
    assert message in str(err.value) and str(manifest) in str(err.value)
    if message == "row 4: ":  # the same file twice with two classes names both rows
        assert "as 'b' (row 2 says 'a')" in str(err.value)


def test_column_and_where_errors_list_the_manifest_columns(tmp_path):
    _images(tmp_path, 2)
    manifest = write_csv(tmp_path / "m.csv", [{"file": "f0_0.png", "kind": "a"}, {"file": "f0_1.png", "kind": "b"}])
    with pytest.raises(DataError, match=r"--label-col 'label': .* has no such column \(its columns: file, kind\)"):
        _load(manifest, tmp_path, label_col="label")
    with pytest.raises(DataError, match=r"--where 'view=PA': .* has no column 'view'"):
        _load(manifest, tmp_path, label_col="kind", where=("view=PA",))
    with pytest.raises(DataError, match="has no rows that --where keeps"):
        _load(manifest, tmp_path, label_col="kind", where=("kind=c",))
    (tmp_path / "latin.csv").write_bytes("path,label\nf0_0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8 text"):
        _load(tmp_path / "latin.csv", tmp_path)
    with pytest.raises(ConfigError, match="is not COL=VALUE"):
        Manifest(where=("view",))
    with pytest.raises(DataError, match="--where chooses rows of a CSV manifest"):
        _load(write_tree(tmp_path / "tree", per_class=2), tmp_path, where=("a=b",))


def test_a_file_two_roots_name_with_two_classes_is_an_error(tmp_path):
    tree = write_tree(tmp_path / "tree", per_class=2)
    manifest = write_csv(tmp_path / "m.csv", [{"path": "tree/Covid/img000.png", "label": "normal"}])
    with pytest.raises(DataError, match=r"1 file\(s\) named twice with two classes: .*img000.png: normal"):
        _load([tree, manifest], tmp_path)


def _fake_dataset(sites: list[str], labels: list[int], groups: list[int]) -> Dataset:
    classes = ["a", "b"]
    samples = [Sample(Path(f"/x/{i}.png"), classes[y], None, str(i), str(i), "0", group=g, site=s)
               for i, (s, y, g) in enumerate(zip(sites, labels, groups, strict=True))]  # fmt: skip
    return Dataset(Path("/x"), "manifest", classes, samples, np.zeros((len(samples), 2, 2), np.uint8))


@pytest.mark.filterwarnings("ignore:no training image of class")
@settings(max_examples=60, deadline=None)
@given(data=st.data(), n_sites=st.integers(2, 4))
def test_no_image_of_a_held_out_site_or_of_its_groups_reaches_training(data, n_sites):
    n = data.draw(st.integers(8 * n_sites, 12 * n_sites))
    names = [f"s{k}" for k in range(n_sites)]
    sites = [names[i % n_sites] for i in range(n)]
    labels = [(i // n_sites) % 2 for i in range(n)]
    # groups drawn at random: some copies and patients straddle sites
    groups = data.draw(st.lists(st.integers(0, n), min_size=n, max_size=n))
    ds = _fake_dataset(sites, labels, groups)
    try:
        folds = site_folds(ds, seed=data.draw(st.integers(0, 5)), val_fraction=0.2)
    except DataError as exc:  # groups chained across sites can leave too little to train on: said so
        assert "distinct images to split into" in str(exc) or "group(s) to train on" in str(exc)
        return
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested) == list(range(n))  # every image held out exactly once, with its site
    for fold in folds:
        seen = np.concatenate([fold.train, fold.val])
        assert {sites[i] for i in fold.test} == {fold.site}
        assert fold.site not in {sites[i] for i in seen}
        assert not set(np.array(groups)[seen]) & set(np.array(groups)[fold.test])
        assert fold.left_out == sum(
            sites[i] != fold.site and groups[i] in set(np.array(groups)[fold.test]) for i in range(n)
        )
    try:
        split = make_split(ds, SplitConfig(test_site="s1", val_fraction=0.1, test_fraction=0.2))
    except DataError as exc:  # a smaller share for val than the folds': too few groups is said so
        assert "distinct images to split into" in str(exc)
        return
    assert {sites[i] for i in split.test} == {"s1"} and "s1" not in {sites[i] for i in np.r_[split.train, split.val]}


def test_an_unknown_test_site_lists_the_sites(tmp_path):
    ds = _fake_dataset(["n", "s"] * 8, [0, 0, 1, 1] * 4, list(range(16)))
    with pytest.raises(DataError, match="no site named 'east'; the sites are: n, s"):
        make_split(ds, SplitConfig(test_site="east"))
    with pytest.raises(DataError, match="cv --by site needs at least two sites, found 0"):
        site_folds(_fake_dataset([None] * 8, [0, 1] * 4, list(range(8))), 0)


def test_the_site_audit_fires_where_class_equals_site_and_not_where_sites_are_balanced(tmp_path):
    # class equals site, and each site has its own image size: the site gives the class away
    for label, (site, size) in enumerate([("north", 32), ("south", 48)]):
        folder = tmp_path / "confounded" / site / CLASSES[label]
        folder.mkdir(parents=True)
        for i in range(15):
            Image.fromarray(synthetic_image(label, i)).resize((size, size)).save(folder / f"{i}.png")
    ds = _load([tmp_path / "confounded" / "north", tmp_path / "confounded" / "south"], tmp_path)
    sites = audit(ds)["sites"]
    assert sites["cramers_v"] == pytest.approx(1.0) and sites["single_site_classes"] == {
        "covid": "north",
        "normal": "south",
    }
    assert sites["probe"]["balanced_accuracy"] >= 0.9 and sites["probe"]["majority"] == 0.5
    assert any("all 15 'covid' images come from one site (north)" in w for w in sites["warnings"])
    assert any("the classes follow the sites (Cramer's V 1.00)" in w for w in sites["warnings"])
    # both sites hold both classes alike, the same kind of file: nothing to warn of
    rng = np.random.default_rng(0)
    for site in ("north", "south"):
        for name in CLASSES[:2]:
            folder = tmp_path / "balanced" / site / name
            folder.mkdir(parents=True)
            for i in range(15):
                Image.fromarray(rng.normal(110, 30, (32, 32)).clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    ds = _load([tmp_path / "balanced" / "north", tmp_path / "balanced" / "south"], tmp_path)
    sites = audit(ds)["sites"]
    assert sites["cramers_v"] == pytest.approx(0.0) and sites["warnings"] == [] and not sites["probe"]["fires"]


def test_scan_of_two_roots_prints_the_class_by_site_table(tmp_path, capsys):
    a = write_tree(tmp_path / "a", per_class=6)
    b = write_tree(tmp_path / "b", per_class=6, start=30)
    assert cli("scan", a, b, "--img-size 16 --quiet --cache-dir", tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert "images per site and class:" in out and "Cramer's V of class and site: 0.00" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("b "))
    assert row.split()[1:] == ["6", "6", "6"]


@pytest.mark.slow  # trains models end to end
def test_cv_by_site_holds_each_site_out_and_reports_it(tmp_path, capsys):
    a = write_tree(tmp_path / "north", per_class=8)
    b = write_tree(tmp_path / "south", per_class=8, start=40)
    out = tmp_path / "cv"
    code = cli("cv", a, b, "--by site --model mlp --img-size 16 --epochs 2 --quiet --out", out,
               "--cache-dir", tmp_path / "cache")  # fmt: skip
    assert code == 0
    report = json.loads((out / "cv.json").read_text())
    assert report["by"] == "site" and report["folds"] == 2 and report["pooled"]["n"] == 48
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("  north, ", "  south, "))]
    assert [line.split(",")[0].strip() for line in printed] == ["north", "south"]
    assert all(
        line.split(": ", 1)[1].startswith("balanced accuracy ") and "one-vs-rest AUROC" in line for line in printed
    )
    assert [f["site"] for f in report["per_fold"]] == ["north", "south"]
    assert all(f["test"] == 24 and "ci95" in f["metrics"] for f in report["per_fold"])
    folds = json.loads((out / "folds.json").read_text())
    for fold in folds:
        held = Path(fold["test"][0]).parts[-3]
        assert all(Path(p).parts[-3] == held for p in fold["test"])
        assert all(Path(p).parts[-3] != held for p in fold["train"] + fold["val"])


@pytest.mark.slow  # trains models end to end
def test_run_test_site_tests_on_the_whole_site_and_leads_with_it(tmp_path, capsys):
    a = write_tree(tmp_path / "north", per_class=8)
    b = write_tree(tmp_path / "south", per_class=5, start=40)
    out = tmp_path / "run"
    code = cli("run", a, b, "--test-site south --model mlp --img-size 16 --trials 2 --epochs 2 --final-epochs 2",
               "--quiet --out", out, "--cache-dir", tmp_path / "cache")  # fmt: skip
    assert code == 0
    splits = json.loads((out / "splits.json").read_text())
    assert splits["site"] == "south" and splits["sizes"]["test"] == 15
    assert all("/south/" in p for p in splits["test"]) and not any(
        "/south/" in p for p in splits["train"] + splits["val"]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"]["site"] == "south" and "per_site" not in metrics
    lines = capsys.readouterr().out.splitlines()
    held = next(i for i, line in enumerate(lines) if line.startswith("held-out site south (15 images"))
    assert "balanced accuracy" in lines[held] and held < next(
        i for i, line in enumerate(lines) if line.startswith("test accuracy")
    )
    assert "held-out site south" in (out / "model" / "MODEL_CARD.md").read_text()


def test_scoring_images_of_several_sites_gives_each_site_and_names_the_worst(trained_run, tmp_path, capsys):
    _, run, _ = trained_run
    a = write_tree(tmp_path / "east", per_class=3, start=60)
    b = write_tree(tmp_path / "west", per_class=3, start=70)
    out = tmp_path / "eval"
    assert cli("evaluate", run / "model", a, b, "--quiet --out", out, "--cache-dir", tmp_path / "cache") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    sites = metrics["per_site"]
    assert set(sites) == {"east", "west"} and all(m["n"] == 9 for m in sites.values())
    assert metrics["worst_site"] == min(sites, key=lambda s: sites[s]["balanced_accuracy"])
    assert "recall/covid" in sites["east"]["ci95"]
    predictions = json.loads((out / "predictions.json").read_text())["images"]
    assert {p["site"] for p in predictions} == {"east", "west"}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "none of the 18 images was used in training or validation: this is a test"
    assert lines[1].startswith("against chance on 18 images: balanced accuracy ")
    assert lines[2].startswith(f"worst site: {metrics['worst_site']} (9 images, of 2 sites): balanced accuracy ")


def test_headers_match_whatever_their_case_and_a_bom_is_read(tmp_path):
    _images(tmp_path / "covid", 2, 0)
    _images(tmp_path / "normal", 2, 1)
    # the folders say covid/normal; the Label column says the opposite and must win
    text = (
        "\ufeffPath, Label ,SITE\ncovid/f0_0.png,normal,a\ncovid/f0_1.png,normal,b\n"
        "normal/f1_0.png,covid,a\nnormal/f1_1.png,covid,b\n"
    )
    (tmp_path / "m.csv").write_text(text, encoding="utf-8")
    ds = _load(tmp_path / "m.csv", tmp_path)
    assert {s.path.name: s.label for s in ds.samples} == {"f0_0.png": "normal", "f0_1.png": "normal",
                                                         "f1_0.png": "covid", "f1_1.png": "covid"}  # fmt: skip
    assert ds.sites == ["a", "b"]


def test_a_root_given_twice_counts_each_file_once_and_clashes_name_both_sources(tmp_path):
    tree = write_tree(tmp_path / "h", per_class=3)
    ds = _load([tree, Path(f"{tree}/")], tmp_path)
    assert len(ds.samples) == 9 and ds.sites == ["h-1"]
    manifest = write_csv(tmp_path / "labels.csv", [{"path": "h/Covid/img000.png", "label": "normal"}])
    with pytest.raises(DataError) as err:
        _load([tree, manifest], tmp_path)
    assert f"normal in {manifest}, covid in {tree}" in str(err.value)


def test_a_blank_site_cell_is_an_error_naming_its_row(tmp_path):
    _images(tmp_path, 2)
    manifest = write_csv(tmp_path / "m.csv", [{"path": "f0_0.png", "label": "a", "site": "x"},
                                               {"path": "f0_1.png", "label": "b", "site": ""}])  # fmt: skip
    with pytest.raises(DataError, match="row 3, column site: empty"):
        _load(manifest, tmp_path)


def test_a_site_that_takes_a_class_out_of_training_is_warned_of(tmp_path):
    ds = _fake_dataset(["n"] * 8 + ["s"] * 8, [0, 1] * 4 + [0] * 8, list(range(16)))
    with pytest.warns(UserWarning, match="no training image of class b outside site n"):
        site_folds(ds, 0)
    chained = _fake_dataset(["n", "s"] * 6, [0, 1, 1, 0] * 3, [0] * 12)  # one patient everywhere
    with pytest.raises(DataError, match=r"holding out site n leaves 0 group\(s\) to train on \(6 image"):
        site_folds(chained, 0)


@pytest.mark.slow  # trains models end to end
def test_a_folder_made_with_other_manifest_options_is_refused(tmp_path):
    a = write_tree(tmp_path / "north", per_class=8)
    b = write_tree(tmp_path / "south", per_class=8, start=40)
    rows = [{"path": str(p.relative_to(tmp_path)), "site": p.parts[-3], "view": "PA" if i % 4 else "AP"}
            for i, p in enumerate(sorted(list(a.rglob("*.png")) + list(b.rglob("*.png"))))]  # fmt: skip
    manifest = write_csv(tmp_path / "m.csv", rows)
    out = tmp_path / "cv"
    common = ("--by site --model mlp --img-size 16 --epochs 1 --quiet --out", out, "--cache-dir", tmp_path / "cache")
    assert cli("cv", manifest, "--where view=PA", *common) == 0
    assert json.loads((out / "cv.json").read_text())["pooled"]["n"] == 36
    assert cli("cv", manifest, "--force", *common) != 0  # the same folder, every view: other data


def _with_metadata(folder: Path, per_class: int, start: int = 0) -> Path:
    """A manifest of ``per_class`` images of each of the three classes with view, sex and age
    columns: the views alternate, every fifth sex is blank, every age differs."""
    rows = []
    for label, name in enumerate(CLASSES):
        for i, image in enumerate(_images(folder / "img", per_class, label, start)):
            k = label * per_class + i
            rows.append({"path": f"img/{image}", "label": name, "view": "PA" if k % 2 else "AP",
                         "sex": "" if k % 5 == 0 else "FM"[k % 2], "age": str(20 + 3 * k)})  # fmt: skip
    return write_csv(folder / "manifest.csv", rows)


def test_the_scan_summary_counts_each_manifest_column_and_spreads_the_numeric_ones(tmp_path):
    ds = _load(_with_metadata(tmp_path, 8), tmp_path)  # 24 images: 24 different ages
    metadata = ds.summary()["metadata"]
    assert list(metadata) == ["age", "sex", "view"]
    assert metadata["view"] == {"missing": 0, "counts": {"AP": 12, "PA": 12}}
    assert metadata["sex"] == {"missing": 5, "counts": {"F": 9, "M": 10}}  # k = 0, 5, 10, 15, 20 blank
    ages = [20 + 3 * k for k in range(24)]  # past 20 values: how many, and their spread, not each count
    assert metadata["age"] == {"missing": 0, "distinct": 24, "min": 20.0, "median": float(np.median(ages)),
                               "max": 89.0}  # fmt: skip
    assert json.loads(json.dumps(ds.summary()))["metadata"] == metadata  # as scan.json holds it


@pytest.mark.slow  # scans, trains or scores whole folders: the full suite runs it
def test_scoring_a_manifest_keeps_each_images_columns_in_its_prediction(trained_run, tmp_path):
    _, run, _ = trained_run
    manifest = _with_metadata(tmp_path / "elsewhere", 2, start=80)
    out = tmp_path / "eval"
    assert cli("evaluate", run / "model", manifest, "--quiet --out", out, "--cache-dir", tmp_path / "cache") == 0
    with open(manifest, newline="") as handle:
        expected = {Path(r["path"]).name: {k: r[k] for k in ("view", "sex", "age")} for r in csv.DictReader(handle)}
    predictions = json.loads((out / "predictions.json").read_text())["images"]
    assert len(predictions) == 6
    assert {Path(p["path"]).name: p["meta"] for p in predictions} == expected
