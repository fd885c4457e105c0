"""What a training step minimises and how its examples weigh: inverse class frequency
(``--class-weighted``), site-balanced draws (``--site-balanced``), and for multi-label models the
binary cross-entropy over known entries, per-finding positive weights and the epoch's figures.

A multi-label target is float (N, F), one column per finding: 1.0 positive, 0.0 negative, NaN
unknown (a blank cell, or an uncertain one under ``--uncertain ignore``); a single-label target is
int64 (N,). The network gives F logits either way; each finding's probability is its own sigmoid.
Holds no training loop (``train.py``) and no calibration (``multilabel_calibration.py``).
"""

from __future__ import annotations

import torch
from torch import nn


def class_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so a balanced set gets weight 1 for every class."""
    counts = torch.bincount(y, minlength=n_classes).float().clamp_(min=1)
    return len(y) / (n_classes * counts)


def site_balanced_weights(y: torch.Tensor, sites: torch.Tensor) -> torch.Tensor:
    """(N,) float64 weights that draw every site equally often, and within a site each of its
    classes equally often: 1 / (sites x the site's classes x images of that site and class).
    WeightedRandomSampler would draw from these too; the loop draws its order itself, seeded."""
    pairs, inverse, counts = torch.unique(torch.stack([sites, y]), dim=1, return_inverse=True, return_counts=True)
    site_of_pair = pairs[0]
    n_sites = len(torch.unique(site_of_pair))
    classes_at = {int(s): int((site_of_pair == s).sum()) for s in torch.unique(site_of_pair)}
    per_pair = torch.tensor(
        [1.0 / (n_sites * classes_at[int(s)] * int(c)) for s, c in zip(site_of_pair, counts, strict=True)],
        dtype=torch.float64,
    )
    return per_pair[inverse]


def is_multilabel(y: torch.Tensor) -> bool:
    """Whether ``y`` is a multi-label target: float (N, F)."""
    return y.dim() == 2 and y.is_floating_point()


def check_targets(train: torch.Tensor, val: torch.Tensor, n_findings: int) -> None:
    """Refuse multi-label targets that are not (N, ``n_findings``) of 0, 1 and NaN, or a part with
    no known entry (its loss would be 0 whatever the model, its accuracy undefined)."""
    for part, y in (("training", train), ("validation", val)):
        if not is_multilabel(y) or y.shape[1] != n_findings:
            raise ValueError(f"the {part} targets are {y.dtype} {tuple(y.shape)}, expected float (N, {n_findings})")
        known = ~torch.isnan(y)
        if not bool(((y[known] == 0) | (y[known] == 1)).all()):
            raise ValueError(f"the {part} targets must be 0.0, 1.0 or NaN (unknown)")
        if not bool(known.any()):
            raise ValueError(f"the {part} targets are all unknown (NaN): there is nothing to learn or watch")


def masked_bce(
    logits: torch.Tensor, y: torch.Tensor, pos_weight: torch.Tensor | None = None, smoothing: float = 0.0
) -> torch.Tensor:
    """Binary cross-entropy with logits (N, F) against ``y`` (N, F), averaged over its known entries.

    An unknown entry's target becomes 0 with weight 0, so it adds neither loss nor gradient (NaN
    kept in the target would turn both into NaN); a batch with no known entry gives 0 and a zero
    gradient. ``smoothing`` moves each target towards 0.5 (y (1 - s) + s / 2, Keras's binary label
    smoothing); ``pos_weight`` (F,) weighs each finding's positive term.
    """
    known = ~torch.isnan(y)
    target = torch.where(known, y, torch.zeros_like(y))
    if smoothing:
        target = target * (1 - smoothing) + 0.5 * smoothing
    total = nn.functional.binary_cross_entropy_with_logits(
        logits, target, weight=known.to(logits.dtype), pos_weight=pos_weight, reduction="sum"
    )
    return total / known.sum().clamp(min=1)


def positive_weights(y: torch.Tensor) -> torch.Tensor:
    """(F,) negatives / positives among each finding's known entries: BCE's ``pos_weight`` that makes
    a finding's positives weigh as much as its negatives (``--class-weighted``). A count of 0 counts
    as 1, so a finding with no known positive, or none negative, keeps a finite weight."""
    positives = (y == 1).sum(0).float().clamp_(min=1)
    negatives = (y == 0).sum(0).float().clamp_(min=1)
    return negatives / positives


class MaskedBCE:
    """``masked_bce`` with one fit's settings: ``train_one_epoch``'s loss for multi-label targets.
    ``class_weighted``: positive weights from the training targets ``y`` (``positive_weights``)."""

    def __init__(self, y: torch.Tensor, class_weighted: bool = False, smoothing: float = 0.0) -> None:
        self.pos_weight = positive_weights(y) if class_weighted else None
        self.smoothing = smoothing

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return masked_bce(logits, y, self.pos_weight, self.smoothing)


def correct_known(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How many known entries of ``y`` (N, F) sigmoid(logit) >= 0.5 decides right (a 0-d tensor)."""
    decided = (torch.sigmoid(logits) >= 0.5).to(y.dtype)
    return (decided == y).sum()  # NaN equals nothing: unknown entries never count


def multilabel_figures(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(binary cross-entropy, share decided right) over the known entries of ``y``: validation's figures."""
    return masked_bce(logits, y).item(), correct_known(logits, y).item() / max(1, int((~torch.isnan(y)).sum()))


def epoch_counts(outputs: list[torch.Tensor], labels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """An epoch's steps' logits and targets -> (known entries of each step (steps,) float64, known
    entries decided right): each step's loss is a mean over its known entries, so the epoch's loss
    weighs it by their count, as a single-label epoch weighs a step by its images."""
    sizes = torch.stack([(~torch.isnan(y)).sum() for y in labels]).double()
    return sizes, correct_known(torch.cat(outputs), torch.cat(labels))
