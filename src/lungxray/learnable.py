"""What a multi-label dataset can teach: the findings with enough known positives and negatives
to learn from and to choose a threshold on. Used by the stages that train (run, tune, worker, cv),
not by evaluation, where a finding without positives is simply scored as such."""

from __future__ import annotations

from dataclasses import replace

from lungxray.data import Dataset
from lungxray.errors import DataError
from lungxray.progress import note
from lungxray.targets import positives as film_label

MIN_SIDE = 2  # a finding is learnt from at least this many known positives and as many negatives


def trainable(ds: Dataset, progress: bool = True) -> Dataset:
    """A multi-label dataset less the findings it cannot teach: fewer than ``MIN_SIDE`` known
    positives or negatives (a column blank on every kept row, a finding whose films were all
    excluded or unreadable). Kept, such a finding would be served with an untrained output and a
    threshold chosen on nothing; each dropped one is named. A single-label dataset as it is."""
    if ds.task != "multilabel":
        return ds
    targets = ds.targets
    positives, negatives = (targets == 1).sum(axis=0), (targets == 0).sum(axis=0)
    keep = (positives >= MIN_SIDE) & (negatives >= MIN_SIDE)
    if keep.all():
        return ds
    dropped = [f"{c} ({int(p)} positive, {int(n)} negative)" for c, p, n, k in
               zip(ds.classes, positives, negatives, keep, strict=True) if not k]  # fmt: skip
    if not keep.any():
        raise DataError(f"no finding has {MIN_SIDE} known positives and negatives: {', '.join(dropped)}",
                        hint="check --finding-cols/--label-sep, --where and --uncertain")  # fmt: skip
    note(f"warning: left out, too few known films to learn from: {', '.join(dropped)}", progress)
    classes = [c for c, k in zip(ds.classes, keep, strict=True) if k]
    samples = []
    for sample, row in zip(ds.samples, targets[:, keep], strict=True):
        label = film_label(dict(zip(classes, row, strict=True)))
        samples.append(replace(sample, targets=tuple(map(float, row)), label=label))
    return replace(ds, classes=classes, samples=samples)
