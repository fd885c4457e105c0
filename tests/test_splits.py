"""Splits are disjoint, stratified, seeded, and never cut a duplicate group."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lungxray.config import ConfigError, DataConfig, Preprocessing, SplitConfig
from lungxray.data import load_dataset
from lungxray.errors import DataError
from lungxray.splits import LeakageError, Split, check_no_leakage, folder_split, make_folds, make_split, random_split


def _labels_groups(n_per_class=40, n_classes=3, dup_every=5):
    labels = np.repeat(np.arange(n_classes), n_per_class)
    groups = np.arange(len(labels))
    groups[::dup_every] = groups[1::dup_every][: len(groups[::dup_every])]  # pairs of near-copies
    return labels, groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_split_is_disjoint_grouped_and_stratified(seed):
    labels, groups = _labels_groups()
    split = random_split(labels, groups, SplitConfig(seed=seed))
    parts = [split.train, split.val, split.test]
    assert sum(len(p) for p in parts) == len(labels)
    assert len(np.unique(np.concatenate(parts))) == len(labels)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not set(groups[parts[a]]) & set(groups[parts[b]])
    assert abs(len(split.test) / len(labels) - 0.20) < 0.05
    assert abs(len(split.val) / len(labels) - 0.10) < 0.05
    for part in parts:  # every class in every part, near its overall share
        shares = np.bincount(labels[part], minlength=3) / len(part)
        assert np.all(np.abs(shares - 1 / 3) < 0.12)


def test_same_seed_same_split_other_seed_other_split():
    labels, groups = _labels_groups()
    a = random_split(labels, groups, SplitConfig(seed=3))
    b = random_split(labels, groups, SplitConfig(seed=3))
    c = random_split(labels, groups, SplitConfig(seed=4))
    assert np.array_equal(a.test, b.test) and np.array_equal(a.val, b.val)
    assert not np.array_equal(a.test, c.test)


def test_leakage_check_raises_on_shared_group_and_shared_image():
    groups = np.array([0, 0, 1, 2, 3, 4])
    with pytest.raises(LeakageError, match="straddle train and test"):
        check_no_leakage(Split(np.array([0, 2]), np.array([3]), np.array([1, 4]), "random", 0), groups)
    with pytest.raises(LeakageError, match="both train and val"):
        check_no_leakage(Split(np.array([0, 2]), np.array([2]), np.array([4]), "random", 0), groups)


def test_folder_split_warns_then_drops_test_duplicates(split_tree, cache_dir):
    ds = load_dataset(split_tree, DataConfig(Preprocessing(img_size=16), cache_dir=cache_dir), progress=False)
    with pytest.warns(UserWarning, match="1 test image"):
        kept = folder_split(ds, SplitConfig(mode="folders"))
    assert kept.test_duplicates_of_train == 1 and len(kept.test) == 13
    dropped = folder_split(ds, SplitConfig(mode="folders", drop_test_duplicates=True))
    assert len(dropped.test) == 12
    assert "copy_of_train.png" not in {ds.samples[i].path.name for i in dropped.test}
    test_paths = {ds.samples[i].path.parent.parent.name for i in dropped.test}
    assert test_paths == {"test"}  # val was carved out of train only
    assert {ds.samples[i].folder_split for i in np.concatenate([dropped.train, dropped.val])} == {"train"}


def test_shared_dataset_split_keeps_every_duplicate_group_whole(shared_data, tmp_path):
    ds = load_dataset(shared_data, DataConfig(cache_dir=tmp_path / "cache"), progress=False)
    split = random_split(ds.labels, ds.groups, SplitConfig(seed=0))
    where = {}
    for name, part in (("train", split.train), ("val", split.val), ("test", split.test)):
        for i in part:
            where.setdefault(ds.groups[i], set()).add(name)
    assert all(len(parts) == 1 for parts in where.values())
    assert len(ds.duplicate_groups) >= 8


def test_bad_fractions_name_the_flag():
    with pytest.raises(ConfigError, match="--val-fraction"):
        SplitConfig(val_fraction=0.5, test_fraction=0.45)


@pytest.mark.parametrize("k, seed", [(5, 0), (3, 7)])
def test_folds_are_disjoint_stratified_grouped_and_test_every_image_once(k, seed):
    labels, groups = _labels_groups(n_per_class=30)
    folds = make_folds(labels, groups, k, seed)
    assert len(folds) == k
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested.tolist()) == list(range(len(labels)))  # each image in exactly one test part
    for fold in folds:
        parts = [fold.train, fold.val, fold.test]
        assert sum(len(p) for p in parts) == len(labels)
        for a in range(3):
            for b in range(a + 1, 3):
                assert not set(parts[a]) & set(parts[b])
                assert not set(groups[parts[a]]) & set(groups[parts[b]])  # no near-copy on both sides
        counts = np.bincount(labels[fold.test], minlength=3)
        assert counts.max() - counts.min() <= 2  # 30 per class over k folds: balanced test parts
        assert abs(len(fold.test) - len(labels) / k) <= 3
    again = make_folds(labels, groups, k, seed)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(folds, again, strict=True))


def test_too_few_images_for_the_folds_is_a_clear_error():
    labels, groups = np.array([0, 1, 0, 1]), np.arange(4)
    with pytest.raises(ValueError, match="distinct images for 5 folds") as info:
        make_folds(labels, groups, 5, 0)
    assert "fewer --folds" in info.value.hint


@pytest.mark.slow  # 60 generated datasets: the full suite runs it
@settings(max_examples=60, deadline=None)
@given(
    patients=st.lists(st.one_of(st.none(), st.sampled_from("ABCDEFGHIJ")), min_size=60, max_size=60),
    copies=st.lists(st.integers(0, 59), min_size=0, max_size=15),
    seed=st.integers(0, 10_000),
)
def test_patient_groups_never_straddle_a_split_or_a_fold(patients, copies, seed):
    """Random patient files joined with random duplicate pairs: every patient's images, and every
    chain of copies, stay in one part of the random split and of every cv fold."""
    from lungxray.layout import join_groups

    labels = np.arange(60) % 3
    duplicates = np.arange(60)
    for a, b in zip(copies[::2], copies[1::2], strict=False):
        duplicates[duplicates == duplicates[b]] = duplicates[a]  # b's cluster joins a's
    groups = join_groups(duplicates, patients)
    for i in range(60):
        for j in range(60):
            if (patients[i] is not None and patients[i] == patients[j]) or duplicates[i] == duplicates[j]:
                assert groups[i] == groups[j]
    if len(np.unique(groups)) < 10:
        return  # too few groups to split into 70/10/20 or 3 folds
    split = random_split(labels, groups, SplitConfig(seed=seed))
    parts = [set(groups[split.train]), set(groups[split.val]), set(groups[split.test])]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    for fold in make_folds(labels, groups, 3, seed):
        assert not set(groups[fold.test]) & (set(groups[fold.train]) | set(groups[fold.val]))


def test_groups_file_joins_patients_and_unknown_paths_are_listed(flat_tree, cache_dir, tmp_path):
    rows = ["path,group", "Covid/img000.png,p1", "Normal/img005.png,p1", "Viral Pneumonia/img003.png,p2"]
    (tmp_path / "groups.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(flat_tree, DataConfig(cache_dir=cache_dir, groups=tmp_path / "groups.csv"), progress=False)
    by_name = {f"{s.path.parent.name}/{s.path.name}": s.group for s in ds.samples}
    assert by_name["Covid/img000.png"] == by_name["Normal/img005.png"] != by_name["Viral Pneumonia/img003.png"]
    assert ds.summary()["groups"] == {"n": 35, "largest": 2, "file": str(tmp_path / "groups.csv")}
    # with --exclude, rows of excluded images are fine; a blank group or a short row is its own group
    (tmp_path / "drop.txt").write_text("Normal/img005.png\n")
    (tmp_path / "more.csv").write_text(
        "path,group\nCovid/img000.png,p1\nNormal/img005.png,p1\nCovid/img001.png,\nCovid/img002.png\n"
    )
    cfg = DataConfig(cache_dir=cache_dir, groups=tmp_path / "more.csv", exclude=tmp_path / "drop.txt")
    ds = load_dataset(flat_tree, cfg, progress=False)
    assert ds.summary()["groups"]["n"] == 35 and ds.summary()["groups"]["largest"] == 1
    (tmp_path / "bad.csv").write_text("path,group\nCovid/img000.png,p1\nCovid/nope.png,p1\nNormal/gone.png,p2\n")
    with pytest.raises(DataError, match="names 2 path") as info:
        load_dataset(flat_tree, DataConfig(cache_dir=cache_dir, groups=tmp_path / "bad.csv"), progress=False)
    assert "Covid/nope.png" in str(info.value) and "Normal/gone.png" in str(info.value)


def test_exclude_drops_the_listed_images_and_says_which(flat_tree, cache_dir, tmp_path):
    (tmp_path / "issues.csv").write_text("path,given,suggested\nCovid/img001.png,covid,normal\n")
    (tmp_path / "plain.txt").write_text(f"{flat_tree / 'Normal' / 'img002.png'}\n")  # absolute works too
    for file, gone in ((tmp_path / "issues.csv", "Covid/img001.png"), (tmp_path / "plain.txt", "Normal/img002.png")):
        ds = load_dataset(flat_tree, DataConfig(cache_dir=cache_dir, exclude=file), progress=False)
        assert len(ds.samples) == 35 and ds.excluded == [str(flat_tree / gone)]
        assert ds.summary()["excluded"] == [str(flat_tree / gone)]
    (tmp_path / "typo.txt").write_text("Covid/img0001.png\n")
    with pytest.raises(DataError, match="Covid/img0001.png"):
        load_dataset(flat_tree, DataConfig(cache_dir=cache_dir, exclude=tmp_path / "typo.txt"), progress=False)


def test_groups_and_exclude_files_with_a_bom_read_and_latin1_ones_name_the_line(flat_tree, cache_dir, tmp_path):
    """A file Excel saved as UTF-8 (byte-order mark first) reads as UTF-8; a Latin-1 one is refused
    in one line naming the flag, the file and the line, with the fix."""
    (tmp_path / "bom.csv").write_bytes("path,group\nCovid/img000.png,p1\nNormal/img005.png,p1\n".encode("utf-8-sig"))
    ds = load_dataset(flat_tree, DataConfig(cache_dir=cache_dir, groups=tmp_path / "bom.csv"), progress=False)
    group = {f"{s.path.parent.name}/{s.path.name}": s.group for s in ds.samples}
    assert group["Covid/img000.png"] == group["Normal/img005.png"]
    (tmp_path / "drop.csv").write_bytes("path,reason\nCovid/img001.png,blurred\n".encode("utf-8-sig"))
    ds = load_dataset(flat_tree, DataConfig(cache_dir=cache_dir, exclude=tmp_path / "drop.csv"), progress=False)
    assert ds.excluded == [str(flat_tree / "Covid" / "img001.png")]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("path,group\nCovid/img000.png,p1\nNormal/img005.png,Müller\n".encode("latin-1"))
    for flag, field in (("--groups", "groups"), ("--exclude", "exclude")):
        with pytest.raises(DataError) as info:
            load_dataset(flat_tree, DataConfig(cache_dir=cache_dir, **{field: latin}), progress=False)
        assert str(info.value) == f"{flag} {latin} is not UTF-8: line 3 holds the byte 0xfc"
        assert "save it as UTF-8" in info.value.hint


def test_scan_flags_a_duplicate_group_whose_copies_disagree(flat_tree, cache_dir):
    (flat_tree / "Normal" / "copy.png").write_bytes((flat_tree / "Covid" / "img000.png").read_bytes())
    ds = load_dataset(flat_tree, DataConfig(cache_dir=cache_dir), progress=False)
    mixed = ds.summary()["mixed_label_duplicate_groups"]
    assert len(mixed) == 1 and {m["label"] for m in mixed[0]} == {"covid", "normal"}


def test_groups_that_share_an_image_are_joined_and_the_rows_named(flat_tree, cache_dir, tmp_path):
    """One image listed in two groups of a --groups file joins them: every film of both groups lands
    in one part of the split, and one warning names the rows."""
    rows = ["path,group", "Covid/img000.png,p1", "Normal/img001.png,p1", "Normal/img002.png,p2",
            "Covid/img000.png,p2", "Viral Pneumonia/img003.png,p2", "Normal/img004.png,p3",
            "Viral Pneumonia/img005.png,p3"]  # fmt: skip
    (tmp_path / "groups.csv").write_text("\n".join(rows) + "\n")
    cfg = DataConfig(Preprocessing(img_size=16), cache_dir=cache_dir, groups=tmp_path / "groups.csv")
    with pytest.warns(UserWarning, match="1 image") as said:
        ds = load_dataset(flat_tree, cfg, progress=False)
    assert len([w for w in said if "--groups" in str(w.message)]) == 1
    message = str(said[0].message)
    assert "Covid/img000.png in rows 2, 5" in message and "p1" not in message and "p2" not in message  # no patient ID
    group = {f"{s.path.parent.name}/{s.path.name}": s.group for s in ds.samples}
    joined = ["Covid/img000.png", "Normal/img001.png", "Normal/img002.png", "Viral Pneumonia/img003.png"]
    assert len({group[name] for name in joined}) == 1 and group["Normal/img004.png"] != group[joined[0]]
    assert group["Normal/img004.png"] == group["Viral Pneumonia/img005.png"]
    for seed in range(5):
        split = make_split(ds, SplitConfig(seed=seed))
        part = {
            i: name for name, idx in (("train", split.train), ("val", split.val), ("test", split.test)) for i in idx
        }
        where = {f"{s.path.parent.name}/{s.path.name}": part[i] for i, s in enumerate(ds.samples)}
        assert len({where[name] for name in joined}) == 1
