"""The numba kernel of ``lungxray.fused``, in a module of its own: imported (and numba with it) only
when an MLP trains with the fused step, and cached on disk by numba after the first compilation.
"""

from __future__ import annotations

import numba
import numpy as np

# Reassociation lets the compiler vectorise the sums; no approximate reciprocals or square roots, and
# no assumption that values are finite (a diverging fit must still show NaN).
_FASTMATH = {"nsz", "contract", "reassoc"}


@numba.njit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def gradient(x, d, i):  # d loss / d w[j, i] over 8 images: x their rows, d their dz[:, j]
    return ((d[0] * x[0][i] + d[1] * x[1][i]) + (d[2] * x[2][i] + d[3] * x[3][i])) + (
        (d[4] * x[4][i] + d[5] * x[5][i]) + (d[6] * x[6][i] + d[7] * x[7][i])
    )


@numba.njit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def update(w, m, v, i, g, coef):  # torch's Adam, one weight; coef: adam_rows' float32 factors
    b1, b2, c1, c2, lr, inv, eps, keep = coef
    mi = b1 * m[i] + c1 * g
    vi = b2 * v[i] + c2 * g * g
    m[i], v[i] = mi, vi
    w[i] = w[i] * keep - lr * mi / (np.sqrt(vi) * inv + eps)


@numba.njit(nogil=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def adam_rows(state, xs, dz, g, lo, hi, hyper):
    """Rows lo .. hi - 1 of ``state`` = (w, m, v), each (rows, n) float32, updated in place; xs:
    (b, n), dz: (b, rows), b a multiple of 8; g: (n,) scratch for batches of more than 8; ``hyper``:
    (step_size, beta1, beta2, inv_bc2_sqrt, eps, decay) as Python floats."""
    w, m, v = state
    step_size, beta1, beta2, inv_bc2_sqrt, eps, decay = hyper
    b1, b2, c1, c2 = np.float32(beta1), np.float32(beta2), np.float32(1 - beta1), np.float32(1 - beta2)
    lr, inv, e, keep = np.float32(step_size), np.float32(inv_bc2_sqrt), np.float32(eps), np.float32(decay)
    coef = (b1, b2, c1, c2, lr, inv, e, keep)
    n = w.shape[1]
    for j in range(lo, hi):
        wr, mr, vr = w[j], m[j], v[j]
        for first in range(0, xs.shape[0], 8):
            # rows and factors read once, out of the loops: numba cannot tell the compiler
            # that they do not alias the weights written below
            x = (xs[first], xs[first + 1], xs[first + 2], xs[first + 3],
                 xs[first + 4], xs[first + 5], xs[first + 6], xs[first + 7])  # fmt: skip
            d = (dz[first, j], dz[first + 1, j], dz[first + 2, j], dz[first + 3, j],
                 dz[first + 4, j], dz[first + 5, j], dz[first + 6, j], dz[first + 7, j])  # fmt: skip
            if xs.shape[0] == 8:  # the tutorial's batch: the gradient never leaves registers
                for i in range(n):
                    gi = gradient(x, d, i)
                    update(wr, mr, vr, i, gi, coef)
            elif first == 0:
                for i in range(n):
                    g[i] = gradient(x, d, i)
            else:
                for i in range(n):
                    g[i] += gradient(x, d, i)
        if xs.shape[0] > 8:
            for i in range(n):
                update(wr, mr, vr, i, g[i], coef)


@numba.njit(nogil=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def linear_rows(w, xs, bias, out, lo, hi):
    """out[:, j] = xs @ w[j] + bias[j] for rows lo .. hi - 1 (lo even); xs: (b, n), b a multiple of
    8; out: (b, rows). Rows go in pairs, (0, 1), (2, 3), ..., so each image's values are loaded once
    for two rows (16 sums in registers): the batch, which does not fit the first-level cache, is
    read half as often as row by row (0.47 against 0.79 ms at 128 rows and batch 8, one thread).
    A row's sums are the same whichever thread computes its pair."""
    n = w.shape[1]
    for first in range(0, xs.shape[0], 8):
        x0, x1, x2, x3 = xs[first], xs[first + 1], xs[first + 2], xs[first + 3]
        x4, x5, x6, x7 = xs[first + 4], xs[first + 5], xs[first + 6], xs[first + 7]
        for j in range(lo, hi, 2):
            if j + 1 == hi:  # the last row of an odd count, alone
                wr = w[j]
                a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0)
                for i in range(n):
                    p = wr[i]
                    a0 += p * x0[i]
                    a1 += p * x1[i]
                    a2 += p * x2[i]
                    a3 += p * x3[i]
                    a4 += p * x4[i]
                    a5 += p * x5[i]
                    a6 += p * x6[i]
                    a7 += p * x7[i]
                _store(out, first, j, bias[j], (a0, a1, a2, a3, a4, a5, a6, a7))
                continue
            wr, ws = w[j], w[j + 1]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0)
            c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = np.float32(0)
            for i in range(n):
                p, q = wr[i], ws[i]
                y0, y1, y2, y3, y4, y5, y6, y7 = x0[i], x1[i], x2[i], x3[i], x4[i], x5[i], x6[i], x7[i]
                a0 += p * y0
                a1 += p * y1
                a2 += p * y2
                a3 += p * y3
                a4 += p * y4
                a5 += p * y5
                a6 += p * y6
                a7 += p * y7
                c0 += q * y0
                c1 += q * y1
                c2 += q * y2
                c3 += q * y3
                c4 += q * y4
                c5 += q * y5
                c6 += q * y6
                c7 += q * y7
            _store(out, first, j, bias[j], (a0, a1, a2, a3, a4, a5, a6, a7))
            _store(out, first, j + 1, bias[j + 1], (c0, c1, c2, c3, c4, c5, c6, c7))


@numba.njit(inline="always")
def _store(out, first, j, b, sums):  # sums: the 8 images' sums of row j
    a0, a1, a2, a3, a4, a5, a6, a7 = sums
    out[first, j] = a0 + b
    out[first + 1, j] = a1 + b
    out[first + 2, j] = a2 + b
    out[first + 3, j] = a3 + b
    out[first + 4, j] = a4 + b
    out[first + 5, j] = a5 + b
    out[first + 6, j] = a6 + b
    out[first + 7, j] = a7 + b
