"""The out-of-distribution score: how unlike the training images an input is, and the flag.

Each preprocessed image is described by 33 numbers: the first 20 principal components of its 32x32
thumbnail (what is where: an upright chest film, not one rotated, upside down, inverted or cropped)
and 13 intensity and texture statistics (grey-level percentiles, contrast, gradient energy along x
and y, the detail lost at half and quarter resolution: not a flat image, noise, text, a photograph
or an enlarged crop). A Gaussian with Ledoit-Wolf shrinkage is fitted to the training images'
descriptors; an input's score is its Mahalanobis distance to it, divided by the 95th percentile of
the out-of-sample distances of the training and validation images (cross-fitted, ``fit_ood``), so
a score above 1 is flagged ("in_distribution": false) and about 5% of images like the training
ones are flagged.

Measured against two alternatives (BENCHMARKS.md, "Out-of-distribution flag"), each thresholded
at the 95th percentile of the validation images' scores: the Mahalanobis distance of the network's
penultimate features to the training classes (Lee et al., 2018) flagged 47-80% of rotated,
upside-down and quarter-cropped films, the energy score 0-57% of each foreign kind, where this
score flags 95-100% of each; and this one does not depend on the network, so every model gets
it the same way. scikit-learn fits it (PCA, LedoitWolf); scoring is two matrix products in NumPy,
so the serving side needs neither scikit-learn nor the training code. What it cannot do: tell an
adult normal film from the adult COVID-19 films the shared set holds (both are plausible chest
films).
"""

from __future__ import annotations

import numpy as np

METHOD = "input-mahalanobis-v1"
THUMB = 32  # thumbnail side
COMPONENTS = 20  # principal components of the thumbnail kept
PERCENTILE = 95.0  # of the validation images' distances: the threshold
FILE = "ood.safetensors"
# The thresholds a bundle may hold: a percentile of Mahalanobis distances in the descriptors' whitened
# space (lungxray's fits give about 1 to 100). Far below, every image is flagged; far above, none.
THRESHOLD_RANGE = (1e-6, 1e6)


def thumbnails(images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 -> (N, THUMB * THUMB) float64 in [0, 1], area-averaged."""
    import torch

    x = torch.from_numpy(np.asarray(images, dtype=np.float32)).unsqueeze(1) / 255.0  # a copy: uploads are read-only
    return torch.nn.functional.adaptive_avg_pool2d(x, THUMB).flatten(1).double().numpy()


N_STATISTICS = 13


def _log_gradient(x: np.ndarray) -> np.ndarray:
    """(N, H, W) float -> (N,) log of the mean absolute difference between neighbours, both ways."""
    return np.log(np.abs(np.diff(x, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(x, axis=2)).mean(axis=(1, 2)) + 1e-4)


def _halve(x: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, H // 2, W // 2) by 2x2 averaging."""
    n, h, w = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def statistics(images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 -> (N, N_STATISTICS): grey-level percentiles 2..98, standard deviation, log
    mean absolute gradient along x and along y and their difference (a film on its side swaps
    them), and how much detail each halving of the resolution removes, twice (a crop of part of a
    film, enlarged, has less fine detail for its coarse structure)."""
    x = images.astype(np.float64) / 255.0
    flat = x.reshape(len(x), -1)
    quantiles = np.percentile(flat, [2, 10, 25, 50, 75, 90, 98], axis=1).T  # (N, 7)
    gx = np.log(np.abs(np.diff(x, axis=2)).mean(axis=(1, 2)) + 1e-4)
    gy = np.log(np.abs(np.diff(x, axis=1)).mean(axis=(1, 2)) + 1e-4)
    half = _halve(x)
    quarter = _halve(half)
    detail = [_log_gradient(x) - _log_gradient(half), _log_gradient(half) - _log_gradient(quarter)]
    return np.column_stack([quantiles, flat.std(axis=1), gx, gy, gx - gy, *detail])


class OODScore:
    """The fitted score: ``score(images)`` -> (N,) distances over the threshold (above 1: flagged)."""

    def __init__(self, tensors: dict[str, np.ndarray], info: dict) -> None:
        self.mean = tensors["pca_mean"]  # (THUMB*THUMB,)
        self.components = tensors["pca_components"]  # (k, THUMB*THUMB)
        self.location = tensors["location"]  # (k + N_STATISTICS,)
        self.precision = tensors["precision"]  # (k + N_STATISTICS, k + N_STATISTICS)
        self.info = info  # method, threshold, percentile, counts: config.json's "ood"
        self.threshold = float(info["threshold"])

    def descriptors(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) uint8 -> (N, k + N_STATISTICS), in chunks (the statistics take float copies)."""
        return np.concatenate(
            [
                np.column_stack([(thumbnails(chunk) - self.mean) @ self.components.T, statistics(chunk)])
                for chunk in _chunks(images)
            ]
        )

    def distance(self, images: np.ndarray) -> np.ndarray:
        """(N,) Mahalanobis distances to the training images."""
        d = self.descriptors(images) - self.location
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, self.precision, d), 0.0))

    def score(self, images: np.ndarray) -> np.ndarray:
        """(N,) distance / threshold: 1 is the threshold, above it the image is flagged."""
        if len(images) == 0:
            return np.zeros(0)
        return self.distance(images) / self.threshold

    def tensors(self) -> dict[str, np.ndarray]:
        """The arrays to store, C-contiguous: safetensors writes an array's memory as it lies, so a
        Fortran-ordered one (scikit-learn's PCA components) would come back transposed in place."""
        arrays = {"pca_mean": self.mean, "pca_components": self.components, "location": self.location,
                  "precision": self.precision}  # fmt: skip
        return {k: np.ascontiguousarray(v) for k, v in arrays.items()}


def tensor_problem(tensors: dict[str, np.ndarray]) -> str | None:
    """Why stored tensors cannot score, or None: a value that is not finite, or a precision matrix
    that is not symmetric positive definite (all zeros, say, would score every image 0, so that
    none is ever flagged)."""
    if not all(np.isfinite(v).all() for v in tensors.values()):
        return "it holds values that are NaN or infinite"
    precision = tensors["precision"]
    if not np.allclose(precision, precision.T) or np.linalg.eigvalsh(precision).min() <= 0:
        return "its precision matrix is not positive definite: every image would score 0 and none be flagged"
    return None


CHUNK = 512  # images per descriptor batch: bounded memory on large datasets


def _chunks(images: np.ndarray):
    for start in range(0, len(images), CHUNK):
        yield images[start : start + CHUNK]


def _gaussian(train: np.ndarray, k: int) -> OODScore:
    """The descriptor Gaussian of ``train`` with ``k`` principal components (threshold 1: raw
    distances). Deterministic: PCA by full SVD, Ledoit-Wolf in closed form."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    pca = PCA(n_components=k, svd_solver="full").fit(np.concatenate([thumbnails(c) for c in _chunks(train)]))
    score = OODScore(
        {
            "pca_mean": pca.mean_,
            "pca_components": pca.components_,
            "location": np.zeros(k + N_STATISTICS),
            "precision": np.eye(k + N_STATISTICS),
        },
        {"threshold": 1.0},
    )
    lw = LedoitWolf().fit(score.descriptors(train))
    score.location, score.precision = lw.location_, lw.precision_
    return score


def fit_ood(train: np.ndarray, val: np.ndarray, percentile: float = PERCENTILE, folds: int = 5) -> OODScore:
    """Fit the descriptor Gaussian on ``train`` images; set the threshold at ``percentile`` of the
    out-of-sample distances of the training and validation images together: ``folds``-fold
    cross-fitting, each fifth scored by a Gaussian fitted on the other four (folds drawn with a
    fixed seed, so the fit is deterministic).

    Why not the validation images' distances alone: a percentile of ~30 images moved with the split
    (on the shared dataset, over 5 split seeds, it flagged 2-17% of the test images and 9-70% of an
    external set); over the ~250 cross-fitted distances it flagged 2-11% and 14-42%. With fewer
    than 2 x ``folds`` images the training images' own distances set it."""
    from sklearn.model_selection import KFold

    if len(train) < 3:
        raise ValueError(f"the out-of-distribution score needs at least 3 training images, got {len(train)}")
    pool = np.concatenate([train, val]) if len(val) else train
    cross_fit = len(pool) >= 2 * folds
    smallest_fit = len(pool) - -(-len(pool) // folds) if cross_fit else len(train)  # a fold's training part
    # The same dimensions in every fit, and at most half of the smallest fit's images: more
    # components than that describe those images' own noise, and new images land far away.
    k = max(1, min(COMPONENTS, len(train) // 2, smallest_fit // 2))
    score = _gaussian(train, k)
    if cross_fit:
        distances = np.zeros(len(pool))
        for rest, held_out in KFold(folds, shuffle=True, random_state=0).split(pool):
            distances[held_out] = _gaussian(pool[rest], k).distance(pool[held_out])
        source = f"out-of-sample distances of the training and validation images ({folds}-fold cross-fitting)"
    else:
        distances = score.distance(train)
        source = "the training images' own distances (too few images to cross-fit)"
    info = {
        "method": METHOD,
        "threshold": float(np.percentile(distances, percentile)),
        "percentile": percentile,
        "threshold_from": source,
        "n_fit": int(len(train)),
        "n_threshold": int(len(distances)),
        "components": int(len(score.components)),
    }
    return OODScore({k: np.asarray(v, dtype=np.float64) for k, v in score.tensors().items()}, info)


def ood_fields(score: float | None) -> dict:
    """A prediction's ``{"ood_score", "in_distribution"}``; both None for a model without the score."""
    if score is None:
        return {"ood_score": None, "in_distribution": None}
    return {"ood_score": float(score), "in_distribution": bool(score <= 1.0)}
