"""Stratified, duplicate-grouped train/val/test splits and the leakage check that guards them.

A duplicate group (identical or near-identical images, see ``data.find_duplicate_groups``) is one
unit: it lands in exactly one split. The check raises instead of warning. Holds no model code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from lungxray.config import SplitConfig
from lungxray.data import Dataset
from lungxray.errors import ConfigError, DataError, LeakageError
from lungxray.stratify import group_units, stratify_groups


@dataclass
class Split:
    """Sample indices of each part; seed and mode say how they were drawn."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    mode: str
    seed: int
    test_duplicates_of_train: int = 0  # test images left in although a copy is in train/val
    site: str | None = None  # the held-out site (--test-site, cv --by site)
    left_out: int = 0  # other sites' images left out of training: a copy or their patient is at the test (or val) site
    val_site: str | None = None  # --val-by site: the whole site that validates

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def to_json(self, ds: Dataset) -> dict:
        parts = {"train": self.train, "val": self.val, "test": self.test}
        out = (
            {
                "mode": self.mode,
                "seed": self.seed,
                "sizes": self.sizes(),
                "test_duplicates_of_train": self.test_duplicates_of_train,
            }
            | ({"site": self.site, "left_out": self.left_out} if self.site is not None else {})
            | ({"val_site": self.val_site} if self.val_site is not None else {})
            | {name: [str(ds.samples[i].path) for i in idx] for name, idx in parts.items()}
        )
        if any(s.patient for s in ds.samples):
            # DICOM patients per split, as keyed pseudonyms: disjoint, as the leakage check made sure
            out["patients"] = {
                name: sorted({ds.samples[i].patient for i in idx} - {None}) for name, idx in parts.items()
            }
        return out


def hold_out(
    idx: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, held-out ~fraction), stratified by label, whole groups only."""
    # On a tiny dataset no class may have 1/fraction members: hold out a larger share instead.
    n_splits = max(2, min(round(1 / fraction), int(np.bincount(labels[idx]).max(initial=0))))
    if len(np.unique(groups[idx])) < n_splits or np.bincount(labels[idx]).max(initial=0) < 2:
        raise DataError(
            f"only {len(np.unique(groups[idx]))} distinct images to split into "
            f"{n_splits} parts; add images or raise --val-fraction/--test-fraction"
        )
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer members than folds; tiny classes are still split.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        rest, held = next(folds.split(idx, labels[idx], groups[idx]))
    return np.sort(idx[rest]), np.sort(idx[held])


def random_split(labels: np.ndarray, groups: np.ndarray, cfg: SplitConfig) -> Split:
    """Stratified train/val/test (default 70/10/20) with every duplicate group kept whole."""
    everything = np.arange(len(labels))
    rest, test = hold_out(everything, labels, groups, cfg.test_fraction, cfg.seed)
    train, val = hold_out(rest, labels, groups, cfg.val_fraction / (1 - cfg.test_fraction), cfg.seed + 1)
    split = Split(train, val, test, "random", cfg.seed)
    check_no_leakage(split, groups)
    return split


def folder_split(ds: Dataset, cfg: SplitConfig) -> Split:
    """The dataset's own train/test folders; val is its val/ folder or is carved out of train."""
    if ds.layout != "split":
        raise DataError(
            f"--split folders needs train/ and test/ folders in {ds.root}; "
            "it holds class folders only, so use --split random"
        )
    where = np.array([s.folder_split for s in ds.samples])
    labels, groups = ds.labels, ds.groups
    train, test = np.flatnonzero(where == "train"), np.flatnonzero(where == "test")
    if len(test) == 0:
        raise DataError(f"{ds.root} has no test/ folder with images", hint="use --split random")
    val = np.flatnonzero(where == "val")
    if len(val) == 0:
        train, val = hold_out(train, labels, groups, cfg.val_fraction / (1 - cfg.test_fraction), cfg.seed)
    seen = set(groups[train]) | set(groups[val])
    leaked = np.array([i for i in test if groups[i] in seen], dtype=np.int64)
    if len(leaked) and cfg.drop_test_duplicates:
        test = np.setdiff1d(test, leaked)
    elif len(leaked):
        warnings.warn(
            f"{len(leaked)} test image(s) duplicate a training/validation image or share its group "
            "(patient), so the test score is optimistic; pass --drop-test-duplicates to remove them",
            stacklevel=2,
        )
    split = Split(
        train, val, test, "folders", cfg.seed, test_duplicates_of_train=0 if cfg.drop_test_duplicates else len(leaked)
    )
    check_no_leakage(split, groups, allow_test_duplicates=not cfg.drop_test_duplicates)
    return split


def make_split(ds: Dataset, cfg: SplitConfig) -> Split:
    """The split named by ``cfg.mode``, or the whole site ``cfg.test_site`` as the test; of a
    multi-label dataset, the random split stratified by every finding (``multilabel_split``)."""
    if ds.task == "multilabel":
        if cfg.test_site is not None or cfg.mode == "folders" or cfg.val_by == "site":
            raise ConfigError(
                "a multi-label dataset is split at random only, for now (no --test-site, --split folders or "
                "--val-by site)", hint="leave those flags out, or use `lungxray cv --by site` to hold out each site",
            )  # fmt: skip
        train = 1 - cfg.val_fraction - cfg.test_fraction
        return multilabel_split(ds.targets, ds.groups, cfg.seed, (train, cfg.val_fraction, cfg.test_fraction))
    if cfg.test_site is not None:
        if cfg.mode == "folders":
            raise ConfigError("--test-site and --split folders exclude each other", hint="drop one")
        return site_split(ds, cfg.test_site, cfg.val_fraction / (1 - cfg.test_fraction), cfg.seed, val_by=cfg.val_by)
    if cfg.val_by == "site":
        raise ConfigError("--val-by site validates on a site other than the test's", hint="add --test-site SITE")
    if cfg.mode == "folders":
        return folder_split(ds, cfg)
    return random_split(ds.labels, ds.groups, cfg)


def site_split(
    ds: Dataset, site: str, val_fraction: float, seed: int, mode: str | None = None, val_by: str = "group"
) -> Split:
    """Every image of ``site`` is the test; train and val (``val_fraction`` of the rest, stratified,
    whole groups; with ``val_by="site"`` one whole other site, ``val_site``) come from the other
    sites. An image elsewhere whose group (a copy, a patient) reaches into ``site`` is left out of
    both: the held-out site stays unseen."""
    if site not in ds.sites:
        known = ", ".join(ds.sites) or "none: DATA names no site (give several roots, or a manifest with a site column)"
        raise DataError(f"no site named {site!r}; the sites are: {known}")
    unnamed = sum(s.site is None for s in ds.samples)
    if unnamed:
        raise DataError(
            f"{unnamed} image(s) have no site, so no fold would hold them out",
            hint="give every row of the manifest's site column a site",
        )
    where = np.array([s.site == site for s in ds.samples])
    labels, groups = ds.labels, ds.groups
    test = np.flatnonzero(where)
    others = np.flatnonzero(~where)
    reaching = np.isin(groups[others], groups[test])
    if len(np.unique(groups[others[~reaching]])) < 2:
        raise DataError(
            f"holding out site {site} leaves {len(np.unique(groups[others[~reaching]]))} group(s) to train on "
            f"({int(reaching.sum())} image(s) elsewhere share a copy or a patient with it)",
            hint="check the site and patient columns: do the sites share patients?",
        )
    val_site = None
    if val_by == "site":
        train, val, val_site = _site_hold_out(ds, others[~reaching], seed)
    else:
        train, val = hold_out(others[~reaching], labels, groups, val_fraction, seed)
    missing = sorted(set(ds.classes) - {ds.classes[k] for k in labels[train]})
    if missing:
        warnings.warn(
            f"no training image of class {', '.join(missing)} outside site {site}: the model held out from it "
            "cannot predict that class",
            stacklevel=2,
        )
    left_out = len(others) - len(train) - len(val)
    split = Split(train, val, test, mode or f"site {site}", seed, site=site, left_out=left_out, val_site=val_site)
    check_no_leakage(split, groups)
    return split


def _site_hold_out(ds: Dataset, idx: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(train, val, the val site) from ``idx``: one whole site validates, drawn with ``seed`` among
    those with two classes or more whose absence leaves every class of ``idx`` in training.
    Training images whose group reaches the val site are left out of both."""
    labels, groups = ds.labels, ds.groups
    sites = np.array([ds.samples[i].site for i in idx], dtype=object)
    every = set(labels[idx])
    fits = [
        site
        for site in sorted(set(sites))
        if len(set(labels[idx[sites == site]])) >= 2 and set(labels[idx[sites != site]]) == every
    ]
    if not fits:
        raise DataError(
            "--val-by site found no site to validate on: none has two classes whose absence leaves every class "
            f"in training (sites: {', '.join(sorted(set(sites)))})",
            hint="drop --val-by site, or add a site that has several classes",
        )
    chosen = fits[np.random.default_rng(seed).integers(len(fits))]
    val = idx[sites == chosen]
    rest = idx[sites != chosen]
    return np.sort(rest[~np.isin(groups[rest], groups[val])]), np.sort(val), chosen


def site_folds(ds: Dataset, seed: int, val_fraction: float = 0.125, val_by: str = "group") -> list[Split]:
    """Leave-one-site-out: one fold per site, which is its test; the other sites train and validate."""
    if len(ds.sites) < 2:
        raise DataError(
            f"cv --by site needs at least two sites, found {len(ds.sites)}",
            hint="give several DATA roots (each a site), or a manifest with a site column (--site-col)",
        )
    k = len(ds.sites)
    return [
        site_split(ds, site, val_fraction, seed + 1 + i, f"site {i + 1}/{k}: {site}", val_by)
        for i, site in enumerate(ds.sites)
    ]


def make_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int, val_fraction: float = 0.125) -> list[Split]:
    """``k`` cross-validation folds: fold i tests on part i and trains on the rest, minus a
    validation part (``val_fraction`` of the rest) for early stopping and tuning.

    Parts are stratified by label and hold whole duplicate groups, so no near-copy sits on both
    sides of a fold; every image is tested exactly once. Each fold passes the leakage check.
    """
    if k < 2:
        raise ConfigError(f"--folds must be at least 2, got {k}")
    n_groups = len(np.unique(groups))
    if n_groups < 2 * k:
        raise DataError(f"only {n_groups} distinct images for {k} folds", hint="use fewer --folds or add images")
    everything = np.arange(len(labels))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        parts = list(splitter.split(everything, labels, groups))
    for i, (rest, test) in enumerate(parts):
        train, val = hold_out(everything[rest], labels, groups, val_fraction, seed + 1 + i)
        fold = Split(train, val, np.sort(everything[test]), f"fold {i + 1}/{k}", seed)
        check_no_leakage(fold, groups)
        folds.append(fold)
    return folds


def multilabel_split(
    targets: np.ndarray, groups: np.ndarray, seed: int, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
) -> Split:
    """Train/val/test of multi-label ``targets`` (N, F; NaN unknown) by ``fractions``: whole
    groups (-1: an image on its own), each finding's prevalence close in the three parts
    (``stratify.stratify_groups``)."""
    if len(fractions) != 3:
        raise ConfigError(f"a split takes three fractions (train, val, test), got {list(fractions)}")
    _enough_groups(targets, groups, 3, "a train/val/test split", "add images or raise --val-fraction/--test-fraction")
    part = stratify_groups(targets, groups, fractions, seed)
    train, val, test = (np.flatnonzero(part == i) for i in range(3))
    if not (len(train) and len(val) and len(test)):
        raise DataError(
            f"the split left a part empty (train {len(train)}, val {len(val)}, test {len(test)} images)",
            hint="add images or raise --val-fraction/--test-fraction",
        )
    split = Split(train, val, test, "random multilabel", seed)
    check_no_leakage(split, group_units(targets, groups))
    return split


def multilabel_folds(targets: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """The test indices of ``k`` folds of multi-label ``targets`` (N, F; NaN unknown): every image
    in exactly one, whole groups (-1: an image on its own), each finding's prevalence close in all."""
    if k < 2:
        raise ConfigError(f"--folds must be at least 2, got {k}")
    _enough_groups(targets, groups, k, f"{k} folds", "use fewer --folds or add images")
    part = stratify_groups(targets, groups, (1 / k,) * k, seed)
    folds = [np.flatnonzero(part == i) for i in range(k)]
    if not all(len(fold) for fold in folds):
        raise DataError(f"{k} folds left a fold empty: too few images", hint="use fewer --folds or add images")
    return folds


def _enough_groups(targets: np.ndarray, groups: np.ndarray, parts: int, what: str, hint: str) -> None:
    n_groups = int(group_units(targets, groups).max(initial=-1)) + 1
    if n_groups < 2 * parts:
        raise DataError(f"only {n_groups} distinct images (groups) for {what}", hint=hint)


def check_no_leakage(split: Split, groups: np.ndarray, *, allow_test_duplicates: bool = False) -> None:
    """Raise LeakageError when parts share an index, or a duplicate group (unless allowed for test)."""
    parts = {"train": split.train, "val": split.val, "test": split.test}
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = np.intersect1d(parts[a], parts[b])
            if len(shared):
                raise LeakageError(f"{len(shared)} image(s) are in both {a} and {b}")
            if allow_test_duplicates and "test" in (a, b):
                continue
            shared_groups = np.intersect1d(groups[parts[a]], groups[parts[b]])
            if len(shared_groups):
                raise LeakageError(
                    f"{len(shared_groups)} duplicate group(s) straddle {a} and {b}: "
                    "a near-copy of a held-out image would be seen in training"
                )


def multilabel_cv_folds(
    targets: np.ndarray, groups: np.ndarray, k: int, seed: int, val_fraction: float = 0.125
) -> list[Split]:
    """``make_folds`` for multi-label ``targets``: ``multilabel_folds``' test parts, and from the
    rest of each a validation part of ``val_fraction``, both stratified by every finding over whole
    groups. Each fold passes the leakage check."""
    everything = np.arange(len(targets))
    folds = []
    for i, test in enumerate(multilabel_folds(targets, groups, k, seed)):
        rest = np.setdiff1d(everything, test)
        part = stratify_groups(targets[rest], groups[rest], (1 - val_fraction, val_fraction), seed + 1 + i)
        train, val = rest[part == 0], rest[part == 1]
        if not len(val):
            raise DataError(f"fold {i + 1}/{k} has no validation image: too few images", hint="use fewer --folds")
        fold = Split(train, val, test, f"fold {i + 1}/{k} multilabel", seed)
        check_no_leakage(fold, group_units(targets, groups))
        folds.append(fold)
    return folds
