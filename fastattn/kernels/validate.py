"""One pass over a dump's attention that says which samples are bad, so good dumps (all but
a few) never pay for the four NumPy passes (isfinite, min, sum, abs) that say where.

A sample is bad when its valid block ``A[:n, :n]`` (n its length) holds a NaN or Inf, a
negative weight, or a row whose sum is off 1 by more than ``tolerance``.
"""

from __future__ import annotations

import functools
import threading

import numba
import numpy as np
from numba import types

from ._jit import ngjit

__all__ = ["flagged_samples"]


def _flags_py(a, lengths, tolerance, out):
    B, L, H = a.shape[0], a.shape[1], a.shape[2]
    for b in range(B):
        n = lengths[b]
        bad = False
        for layer in range(L):
            for h in range(H):
                for q in range(n):
                    total = 0.0
                    nan_or_inf = 0.0  # x − x is 0 for every finite x, NaN otherwise
                    negative = 0
                    for k in range(n):
                        x = np.float64(a[b, layer, h, q, k])
                        total += x
                        nan_or_inf += x - x
                        negative += x < 0.0
                    if not (nan_or_inf == 0.0 and negative == 0 and abs(total - 1.0) <= tolerance):
                        bad = True
        out[b] = bad


_COMPILING = threading.Lock()  # ingest validates dumps on several threads


@functools.cache
def _compiled(dtype: np.dtype):
    array = types.Array(numba.from_dtype(dtype), 5, "A", readonly=True)
    return ngjit(_flags_py, types.void(array, types.int64[::1], types.float64, types.boolean[::1]))


def _flags(dtype: np.dtype):
    """The kernel for one dtype, compiled (or loaded from the cache) on its first use.

    Its one signature takes any layout (C, Fortran, a transposed view) and read-only buffers:
    one compile per dtype, not one per layout of each new dump.  Only the dtypes a run meets
    are compiled (float32 dumps never pay for the float64 kernel)."""
    with _COMPILING:
        return _compiled(dtype)


def flagged_samples(attention: np.ndarray, lengths: np.ndarray, tolerance: float) -> np.ndarray:
    """Indices of the samples of `(batch, layer, head, query, key)` attention that are bad.

    Float16 is checked as float32 (Numba has no float16; the conversion is exact).
    """
    if attention.dtype not in (np.float32, np.float64):
        attention = attention.astype(np.float32)
    out = np.zeros(attention.shape[0], dtype=np.bool_)
    _flags(attention.dtype)(attention, np.asarray(lengths, dtype=np.int64), float(tolerance), out)
    return np.flatnonzero(out)
