"""Reference scaled dot-product attention: softmax(q·kᵀ·scale) and its product with v.

A plain, exact kernel (float64 accumulation, row max subtracted before exp),
used to make realistic synthetic attention and to check other implementations,
not a fast attention.  Any number of leading dims; planes are independent and
split between threads (``parallel_for``).

Masking, for query row i and key j of a plane with length L:

- ``causal``: key j > i is masked (top-left aligned, as PyTorch's ``is_causal``);
- ``lengths``: keys j ≥ L are masked and query rows i ≥ L are fully masked.

A masked weight is exactly 0.  A fully masked row (a padding query, or nothing
left after causal + lengths) is a row of exact zeros and its ``sdpa`` output is
0: defined, never NaN.
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import float_dtype, ngjit, parallel_for, plane_lengths

__all__ = ["attention_weights", "sdpa"]


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split in two (Cody–Waite): k·_LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_EXP_MIN = -708.0  # below this e^x is subnormal; the softmax treats it as 0
#: 1/n! for n = 12 … 0: the Taylor series of e^r, |r| ≤ ln2/2, to ~2e-16 relative.
_EXP_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(12, -1, -1))


@ngjit
def _exp_nonpositive(x):
    """e^x for x ≤ 0 (a score minus its row's max), as exp(r)·2^k with x = k·ln2 + r.

    Why not np.exp: LLVM lowers it to a libm call, one per score, which keeps the row
    loop scalar and was half of the kernel's time.  This is branch-free (selects, integer
    ops on the exponent bits, a polynomial), so the loop vectorises.  Relative error
    against np.exp grows with |x| (the reduction to r): ≤ 1.3e-15 for x ≥ −30, where the
    weights that matter are, ≤ 2.5e-14 down to −708; exactly 0 below −708.
    """
    xc = max(x, _EXP_MIN)
    kf = np.floor(xc * _LOG2E + 0.5)
    r = (xc - kf * _LN2_HI) - kf * _LN2_LO
    poly = _EXP_TAYLOR[0]
    for c in _EXP_TAYLOR[1:]:
        poly = poly * r + c
    two_k = np.int64((np.int64(np.int32(kf)) + 1023) << 52).view(np.float64)  # via int32: AVX2 converts that
    return poly * two_k if x >= _EXP_MIN else 0.0


@ngjit
def _softmax_row(q, k, p, i, m, scale, buf):
    """buf[:m] = softmax_j(scale · q[p, i]·k[p, j]) for j < m, in float64.

    exp(s_j − max s) keeps every exponent ≤ 0 (no overflow) and the largest
    term at 1 (the normaliser is ≥ 1, no underflow to 0/0).
    """
    D = q.shape[2]
    top = -np.inf
    for j in range(m):
        s = 0.0
        for d in range(D):
            s += np.float64(q[p, i, d]) * np.float64(k[p, j, d])
        s *= scale
        buf[j] = s
        top = max(top, s)
    z = 0.0
    for j in range(m):
        e = _exp_nonpositive(buf[j] - top)
        buf[j] = e
        z += e
    inv = 1.0 / z
    for j in range(m):
        buf[j] *= inv


@ngjit
def _keys_of_row(i, nq, nk, causal):
    """Number of unmasked keys (a prefix) of query row i; 0 if fully masked."""
    if i >= nq:
        return 0
    if causal:
        return min(nk, i + 1)
    return nk


@ngjit
def _attend_planes(lo, hi, q, k, v, lens, scale, causal, weights, out):
    """Per plane ``lo … hi − 1``: the weights into ``weights`` and/or weights·v into ``out``.

    One kernel for both public functions (one compile per dtype); a caller
    that does not want an output passes an empty (0, 0, 0) array for it.
    """
    Q = q.shape[1]
    K = k.shape[1]
    DV = v.shape[2]
    want_weights = weights.shape[0] > 0
    want_out = out.shape[0] > 0
    for p in range(lo, hi):
        buf = np.empty(K)
        acc = np.empty(DV)
        nq = min(lens[p], Q)
        nk = min(lens[p], K)
        for i in range(Q):
            m = _keys_of_row(i, nq, nk, causal)
            if m > 0:
                _softmax_row(q, k, p, i, m, scale, buf)
            if want_weights:
                for j in range(m):
                    weights[p, i, j] = buf[j]
                for j in range(m, K):
                    weights[p, i, j] = 0.0
            if want_out:
                acc[:] = 0.0
                for j in range(m):
                    w = buf[j]
                    for d in range(DV):
                        acc[d] += w * np.float64(v[p, j, d])
                for d in range(DV):
                    out[p, i, d] = acc[d]


def _prepare(q, k, v, scale, lengths):
    arrays = [np.asarray(q), np.asarray(k)] + ([] if v is None else [np.asarray(v)])
    for name, x in zip("qkv", arrays):
        if x.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., N, d), got shape {x.shape}")
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{name} must be a real numeric array, got dtype {x.dtype}")
    dtype = float_dtype(*arrays)
    q, k = arrays[0], arrays[1]
    lead = q.shape[:-2]
    if k.shape[:-2] != lead:
        raise ValueError(f"q and k leading dims differ: {q.shape} vs {k.shape}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k feature dims differ: {q.shape} vs {k.shape}")
    if v is not None:
        v = arrays[2]
        if v.shape[:-2] != lead or v.shape[-2] != k.shape[-2]:
            raise ValueError(f"v must have shape (..., K, dv) matching k: {v.shape} vs {k.shape}")
    Q, D = q.shape[-2:]
    K = k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D else 1.0
    P = int(np.prod(lead, dtype=np.int64))

    def planes(x):
        return np.ascontiguousarray(x, dtype=dtype).reshape((P,) + x.shape[-2:])

    lens = plane_lengths(lengths, lead, max(Q, K))
    out = [planes(x) for x in arrays]
    return out, lens, float(scale), dtype, lead, P


def _run(q, k, v, lens, scale, causal, weights, out, parallel):
    parallel_for(_attend_planes, q.shape[0], q, k, v, lens, scale, bool(causal), weights, out, parallel=parallel)


def attention_weights(
    q, k, *, scale=None, causal=False, lengths=None, parallel: bool = True
) -> np.ndarray:
    """softmax(q·kᵀ·scale) over keys, with optional causal and length masks.

    q: (..., Q, d), k: (..., K, d) with the same leading dims; scale defaults
    to 1/√d; lengths: None or ints whose shape is a prefix of the leading dims.
    Returns (..., Q, K) in the inputs' float dtype (float32 if both are
    float32, else float64), computed in float64.  Masked weights are exactly 0;
    a fully masked row is all zeros (see the module docstring).  ``parallel``
    False runs single-threaded (inside dask or a thread pool); same results.
    """
    (qp, kp), lens, scale, dtype, lead, P = _prepare(q, k, None, scale, lengths)
    Q, K = qp.shape[1], kp.shape[1]
    weights = np.empty((P, Q, K), dtype=dtype)
    none = np.empty((0, 0, 0), dtype=dtype)
    _run(qp, kp, none, lens, scale, causal, weights, none, parallel)
    return weights.reshape(lead + (Q, K))


def sdpa(q, k, v, *, scale=None, causal=False, lengths=None, parallel: bool = True) -> np.ndarray:
    """Scaled dot-product attention: attention_weights(q, k, ...) · v.

    v: (..., K, dv).  Returns (..., Q, dv); rows of fully masked queries are 0.
    The product uses the float64 weights (not the rounded output weights).
    """
    (qp, kp, vp), lens, scale, dtype, lead, P = _prepare(q, k, v, scale, lengths)
    Q, DV = qp.shape[1], vp.shape[2]
    out = np.empty((P, Q, DV), dtype=dtype)
    none = np.empty((0, 0, 0), dtype=dtype)
    _run(qp, kp, vp, lens, scale, causal, none, out, parallel)
    return out.reshape(lead + (Q, DV))
