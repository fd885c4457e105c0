"""The numba kernel of ``augment.BatchAugment`` on the CPU, in a module of its own (numba imported
only when a batch is augmented on the CPU; cached on disk after the first compilation).

Written by hand because torch runs the augmentation as some twenty passes over the batch (the
affine grid, bilinear sampling, the mean, brightness and contrast, gamma, padding, the blur,
noise, quantisation and their clamps), a large share of the small CNN's training step on one
core; here one image is warped, adjusted, blurred and quantised in three passes that stay in cache. The arithmetic is
torch's, step for step (``affine_grid`` and ``grid_sample`` with ``align_corners=False`` and zero
padding, a replicate-padded 3x3 Gaussian); sums and ``pow`` round differently in the last bits.
"""

from __future__ import annotations

import numba
import numpy as np


# fastmath (every LLVM fast-math flag: reassociation, contraction, no NaN or infinity, which finite
# images never hold) here only: LLVM then vectorises the warp and its sum, the kernel's slowest
# pass (reassociation and contraction alone ran slower, timed by hand); the pixels move by float
# rounding alone, which the quantisation after it absorbs but at a level's edge (the tests bound
# both against torch's path)
@numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=True)
def _warp(src, theta, out):
    """``out`` = bilinear ``grid_sample`` of ``src`` (H, W) on ``affine_grid(theta)`` (2, 3, torch's
    x, y order), zeros outside, align_corners=False; returns the mean of ``out``."""
    h, w = src.shape
    fh, fw, one, half = np.float32(h), np.float32(w), np.float32(1.0), np.float32(0.5)
    t00, t01, t02, t10, t11, t12 = theta[0, 0], theta[0, 1], theta[0, 2], theta[1, 0], theta[1, 1], theta[1, 2]
    total = 0.0
    for i in range(h):
        yn = np.float32((2 * i + 1) / h - 1)
        rx, ry = t01 * yn + t02, t11 * yn + t12
        for j in range(w):
            xn = np.float32((2 * j + 1) / w - 1)
            ix = ((t00 * xn + rx + one) * fw - one) * half
            iy = ((t10 * xn + ry + one) * fh - one) * half
            fx0, fy0 = np.floor(ix), np.floor(iy)
            x0, y0 = int(fx0), int(fy0)
            fx, fy = ix - fx0, iy - fy0
            if x0 >= 0 and x0 + 1 < w and y0 >= 0 and y0 + 1 < h:  # inside: no bounds to check
                top = src[y0, x0] * (one - fx) + src[y0, x0 + 1] * fx
                bottom = src[y0 + 1, x0] * (one - fx) + src[y0 + 1, x0 + 1] * fx
                v = top * (one - fy) + bottom * fy
            else:
                v = np.float32(0.0)
                if 0 <= y0 < h:
                    if 0 <= x0 < w:
                        v += src[y0, x0] * (one - fx) * (one - fy)
                    if 0 <= x0 + 1 < w:
                        v += src[y0, x0 + 1] * fx * (one - fy)
                if 0 <= y0 + 1 < h:
                    if 0 <= x0 < w:
                        v += src[y0 + 1, x0] * (one - fx) * fy
                    if 0 <= x0 + 1 < w:
                        v += src[y0 + 1, x0 + 1] * fx * fy
            out[i, j] = v
            total += v
    return np.float32(total / (h * w))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _clamp(v):
    return min(max(v, np.float32(0.0)), np.float32(1.0))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def augment(x, out, geometry, scanner, padded):
    """Augment the (B, H, W) float32 images ``x`` into ``out``.

    ``geometry``: None, or (theta (B, 2, 3), contrast (B,), brightness (B,)); ``scanner``: None, or
    (gamma (B,), blur (B,), noise (B, H, W), spread (B,), levels (B,)), every value drawn by the
    caller; ``padded``: (H + 2, W + 2) float32 scratch."""
    n, h, w = x.shape
    for b in range(n):
        src = x[b]
        if geometry is not None:
            theta, contrast, brightness = geometry
            mean = _warp(x[b], theta[b], out[b])
            for i in range(h):
                for j in range(w):
                    out[b, i, j] = _clamp((out[b, i, j] - mean) * contrast[b] + mean + brightness[b])
            src = out[b]
        if scanner is None:
            if geometry is None:
                out[b] = src  # neither: the image as it came
            continue
        gamma, blur, noise, spread, levels = scanner
        for i in range(h):
            for j in range(w):
                padded[i + 1, j + 1] = _clamp(src[i, j]) ** gamma[b]
        padded[0, 1 : w + 1] = padded[1, 1 : w + 1]  # replicate padding
        padded[h + 1, 1 : w + 1] = padded[h, 1 : w + 1]
        padded[:, 0] = padded[:, 1]
        padded[:, w + 1] = padded[:, w]
        for i in range(h):
            for j in range(w):
                p = padded[i + 1, j + 1]
                blurred = (
                    (padded[i, j] * 0.0625 + padded[i, j + 1] * 0.125 + padded[i, j + 2] * 0.0625)
                    + (padded[i + 1, j] * 0.125 + p * 0.25 + padded[i + 1, j + 2] * 0.125)
                    + (padded[i + 2, j] * 0.0625 + padded[i + 2, j + 1] * 0.125 + padded[i + 2, j + 2] * 0.0625)
                )
                v = _clamp(p + blur[b] * (np.float32(blurred) - p) + noise[b, i, j] * spread[b])
                out[b, i, j] = _clamp(np.float32(np.rint(v * levels[b])) / levels[b])
