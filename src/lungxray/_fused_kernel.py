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
def update(w, m, v, i, g, b1, b2, c1, c2, lr, inv, eps, keep):  # torch's Adam, one weight
    mi = b1 * m[i] + c1 * g
    vi = b2 * v[i] + c2 * g * g
    m[i], v[i] = mi, vi
    w[i] = w[i] * keep - lr * mi / (np.sqrt(vi) * inv + eps)


@numba.njit(nogil=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def adam_rows(w, m, v, xs, dz, g, lo, hi, step_size, beta1, beta2, inv_bc2_sqrt, eps, decay):
    """Rows lo .. hi - 1 of w, m, v ((rows, n) float32, updated in place); xs: (b, n), dz:
    (b, rows), b a multiple of 8; g: (n,) scratch for batches of more than 8."""
    b1, b2, c1, c2 = np.float32(beta1), np.float32(beta2), np.float32(1 - beta1), np.float32(1 - beta2)
    lr, inv, e, keep = np.float32(step_size), np.float32(inv_bc2_sqrt), np.float32(eps), np.float32(decay)
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
                    update(wr, mr, vr, i, gi, b1, b2, c1, c2, lr, inv, e, keep)
            elif first == 0:
                for i in range(n):
                    g[i] = gradient(x, d, i)
            else:
                for i in range(n):
                    g[i] += gradient(x, d, i)
        if xs.shape[0] > 8:
            for i in range(n):
                update(wr, mr, vr, i, g[i], b1, b2, c1, c2, lr, inv, e, keep)
