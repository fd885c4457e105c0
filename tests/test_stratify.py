"""Multi-label splits and folds keep groups whole, place every image once, repeat for a seed, and
keep each finding's prevalence close across the parts, much closer than a grouped-only split."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.model_selection import GroupKFold

from lungxray.errors import ConfigError, DataError
from lungxray.splits import check_no_leakage, multilabel_folds, multilabel_split
from lungxray.stratify import group_units, stratify_groups

NAN = float("nan")


def _patients(seed: int, n_patients: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """(targets (N, 4) with 5% unknown, groups (N,)): 1-5 films a patient, findings at about 30%,
    15%, 8% and 4% of films, a patient's films sharing them often."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), rng.integers(1, 6, n_patients))
    has = rng.random((n_patients, 4)) < np.array([0.45, 0.22, 0.12, 0.06])  # (P, 4)
    targets = (has[groups] & (rng.random((len(groups), 4)) < 0.7)).astype(np.float64)
    targets[rng.random(targets.shape) < 0.05] = NAN
    return targets, groups


def _spread(targets: np.ndarray, folds: list[np.ndarray]) -> np.ndarray:
    """(F,) max - min across folds of each finding's prevalence (unknown counted as not positive)."""
    prevalence = np.array([np.nan_to_num(targets[fold]).mean(axis=0) for fold in folds])  # (k, F)
    return prevalence.max(axis=0) - prevalence.min(axis=0)


def _part_of_each_group(groups: np.ndarray, parts: list[np.ndarray]) -> dict[int, set[int]]:
    where: dict[int, set[int]] = {}
    for p, idx in enumerate(parts):
        for i in idx:
            if groups[i] != -1:
                where.setdefault(int(groups[i]), set()).add(p)
    return where


@settings(max_examples=80, deadline=None)
@given(
    groups=st.lists(st.integers(-1, 12), min_size=20, max_size=60),
    k=st.integers(2, 5),
    seed=st.integers(0, 10_000),
)
def test_groups_never_straddle_and_every_image_lands_once(groups, k, seed):
    """Random groups (-1 among them) and findings with unknowns: every fold and every part of the
    split holds whole groups, and every image is in exactly one."""
    groups = np.array(groups)
    rng = np.random.default_rng(seed)
    targets = rng.choice([0.0, 1.0, NAN], size=(len(groups), 3), p=[0.6, 0.3, 0.1])
    if group_units(targets, groups).max() + 1 < 2 * max(k, 3):
        return  # too few groups for k folds or a split in three (an error, tested below)
    folds = multilabel_folds(targets, groups, k, seed)
    assert len(folds) == k and all(len(f) for f in folds)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(groups)))
    assert all(len(parts) == 1 for parts in _part_of_each_group(groups, folds).values())
    split = multilabel_split(targets, groups, seed)
    parts = [split.train, split.val, split.test]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(groups)))
    assert all(len(p) == 1 for p in _part_of_each_group(groups, parts).values())


def test_same_seed_same_folds_and_split_other_seed_other_ones():
    targets, groups = _patients(0)
    a, b, c = (multilabel_folds(targets, groups, 5, s) for s in (3, 3, 4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    one, two = multilabel_split(targets, groups, 3), multilabel_split(targets, groups, 3)
    assert np.array_equal(one.test, two.test) and np.array_equal(one.val, two.val)
    assert not np.array_equal(one.test, multilabel_split(targets, groups, 4).test)


@pytest.mark.parametrize("seed", range(5))
def test_a_finding_in_only_k_groups_lands_in_k_different_folds(seed):
    """Five patients (3, 1, 2, 1 and 1 films) have the rare finding; each fold gets one of them."""
    targets, groups = _patients(seed)
    rare = np.zeros((len(groups), 1))
    carriers = []
    for patient, films in enumerate((3, 1, 2, 1, 1)):
        members = np.flatnonzero(groups == patient)
        rare[members[:films]] = 1.0
        carriers.append(patient)
    targets = np.hstack([targets, rare])
    folds = multilabel_folds(targets, groups, 5, seed)
    assert [int(rare[fold].sum() > 0) for fold in folds] == [1, 1, 1, 1, 1]
    assert sorted(len(set(groups[fold]) & set(carriers)) for fold in folds) == [1, 1, 1, 1, 1]


@pytest.mark.parametrize("seed", range(6))
def test_prevalence_spread_is_far_below_a_grouped_only_split(seed):
    """Grouped stratification against scikit-learn's GroupKFold (groups balanced by size only) on
    about 360 films of 120 patients: its widest finding spread across 5 folds is under 0.05
    (prevalence, 0..1), and its mean spread under a third of GroupKFold's."""
    targets, groups = _patients(seed)
    ours = _spread(targets, multilabel_folds(targets, groups, 5, seed))
    theirs = _spread(targets, [test for _, test in GroupKFold(5).split(targets, groups=groups)])
    assert ours.max() < 0.05
    assert ours.mean() < theirs.mean() / 3


def test_split_keeps_fractions_and_prevalence_and_passes_the_leakage_check():
    targets, groups = _patients(1, n_patients=300)
    split = multilabel_split(targets, groups, seed=0)
    n = len(groups)
    assert split.mode == "random multilabel" and split.seed == 0
    assert abs(len(split.train) / n - 0.7) < 0.02 and abs(len(split.val) / n - 0.1) < 0.02
    assert abs(len(split.test) / n - 0.2) < 0.02
    overall = np.nan_to_num(targets).mean(axis=0)
    for part in (split.train, split.val, split.test):
        assert np.all(np.abs(np.nan_to_num(targets[part]).mean(axis=0) - overall) < 0.02)
    check_no_leakage(split, groups)
    other = multilabel_split(targets, groups, seed=0, fractions=(0.5, 0.25, 0.25))
    assert abs(len(other.val) / n - 0.25) < 0.02 and abs(len(other.test) / n - 0.25) < 0.02


def test_minus_one_is_an_image_on_its_own_and_unknown_is_not_positive():
    """Images of group -1 spread over the folds like any singletons; NaN places as 0 does."""
    targets, _ = _patients(2)
    alone = np.full(len(targets), -1)
    folds = multilabel_folds(targets, alone, 4, seed=0)
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 2 and sum(sizes) == len(targets)
    known = np.nan_to_num(targets)
    assert np.array_equal(
        stratify_groups(targets, alone, (0.7, 0.1, 0.2), 5), stratify_groups(known, alone, (0.7, 0.1, 0.2), 5)
    )


def test_bad_inputs_are_clear_errors():
    targets, groups = _patients(0, n_patients=4)
    with pytest.raises(DataError, match="distinct images") as info:
        multilabel_folds(targets, groups, 5, 0)
    assert "fewer --folds" in info.value.hint
    with pytest.raises(ConfigError, match="at least 2"):
        multilabel_folds(targets, groups, 1, 0)
    with pytest.raises(DataError, match=r"\(images, findings\)"):
        multilabel_folds(targets[:, 0], groups, 2, 0)
    with pytest.raises(DataError, match="integers"):
        multilabel_folds(targets, groups.astype(float), 2, 0)
    with pytest.raises(ConfigError, match="summing to 1"):
        stratify_groups(targets, groups, (0.7, 0.2, 0.2), 0)
