"""Iterative stratification of multi-label data over groups: whole groups go to parts so that each
finding's prevalence stays close across the parts.

The algorithm is Sechidis, Tsoumakas and Vlahavas (2011), "On the stratification of multi-label
data", with a group (a patient, a chain of near-copies) as its unit: the unit carries the sum of
its images' positive findings and its number of images. Written here because no maintained library
does both at once: scikit-learn's ``StratifiedGroupKFold`` takes one label per image,
iterative-stratification's ``MultilabelStratifiedKFold`` and scikit-multilearn's
``IterativeStratification`` take no groups (iterative-stratification declined them, its issue #10).

Holds the assignment only; ``splits`` turns it into folds and a ``Split``, and checks leakage.
"""

from __future__ import annotations

import numpy as np

from lungxray.errors import ConfigError, DataError


def stratify_groups(targets: np.ndarray, groups: np.ndarray, fractions: tuple[float, ...], seed: int) -> np.ndarray:
    """The part (0 .. len(fractions) - 1) of each image, whole groups only, each part near its
    fraction of the images and of every finding's positives.

    ``targets`` (N, F): 1 positive, 0 negative, NaN unknown (not positive here); ``groups`` (N,)
    int: images sharing a value are one unit, -1 an image on its own. Deterministic for a seed.
    """
    share = np.asarray(fractions, dtype=np.float64)
    if share.ndim != 1 or len(share) < 2 or np.any(share <= 0) or abs(share.sum() - 1) > 1e-6:
        raise ConfigError(
            f"the parts' fractions must be two or more positive shares summing to 1, got {list(fractions)}",
            hint="check --val-fraction and --test-fraction",
        )
    unit = group_units(targets, groups)  # (N,) unit of each image
    positive = np.greater(targets, 0.5)  # (N, F); NaN compares False: unknown is not positive
    counts = np.zeros((unit.max(initial=-1) + 1, positive.shape[1]))  # (U, F) positives per unit
    np.add.at(counts, unit, positive)
    sizes = np.bincount(unit).astype(np.float64)  # (U,) images per unit
    return _assign(counts, sizes, share, np.random.default_rng(seed))[unit]


def group_units(targets: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(N,) unit index 0 .. U-1 of each image: one per distinct group, one per image of group -1."""
    targets, groups = np.asarray(targets), np.asarray(groups)
    if targets.ndim != 2 or groups.shape != (len(targets),):
        raise DataError(
            f"targets must be (images, findings) and groups (images,), got {targets.shape} and {groups.shape}"
        )
    if not np.issubdtype(groups.dtype, np.integer):
        raise DataError(f"groups must be integers (-1: an image on its own), got dtype {groups.dtype}")
    ids = groups.astype(np.int64)
    alone = ids == -1
    ids[alone] = ids.max(initial=0) + 1 + np.arange(int(alone.sum()))  # fresh ids, above every other
    return np.unique(ids, return_inverse=True)[1].reshape(-1)


def _assign(counts: np.ndarray, sizes: np.ndarray, share: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(U,) part of each unit: Sechidis et al.'s loop over findings, rarest first, then the units
    without a positive finding by room alone."""
    wants = np.outer(share, counts.sum(axis=0))  # (K, F) positives each part still wants
    room = share * sizes.sum()  # (K,) images each part still wants
    part = np.full(len(sizes), -1)
    left = counts.sum(axis=0)  # (F,) positives not yet placed
    while np.any(left > 0):
        # The rarest finding still to place (its count in images): its few units are spread first,
        # while every part still wants it; the common findings even out over the many units left.
        finding = int(np.flatnonzero(left == left[left > 0].min())[0])
        todo = _largest_first(np.flatnonzero((part < 0) & (counts[:, finding] > 0)), counts[:, finding], rng)
        for u in todo:
            p = _most_wanting(wants[:, finding], room, rng)
            part[u] = p
            wants[p] -= counts[u]
            room[p] -= sizes[u]
        left -= counts[todo].sum(axis=0)
    rest = np.flatnonzero(part < 0)
    for u in _largest_first(rest, sizes, rng):
        p = _most_wanting(room, room, rng)
        part[u] = p
        room[p] -= sizes[u]
    return part


def _largest_first(units: np.ndarray, weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``units`` by falling ``weight[units]``, equal weights in a seeded random order.

    Sechidis et al. take a finding's images in any order, all weighing one. Units weigh several:
    the heavy ones go first, while every part can still take them, and the light ones even out
    what they left (as in largest-first bin packing)."""
    shuffled = rng.permutation(units)
    return shuffled[np.argsort(-weight[shuffled], kind="stable")]


def _most_wanting(want: np.ndarray, room: np.ndarray, rng: np.random.Generator) -> int:
    """The part with the largest ``want`` (K,); ties to the largest ``room`` (K,), then a seeded draw."""
    best = np.flatnonzero(want == want.max())
    if len(best) > 1:
        best = best[room[best] == room[best].max()]
    return int(best[0] if len(best) == 1 else best[rng.integers(len(best))])
