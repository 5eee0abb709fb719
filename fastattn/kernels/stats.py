"""Per-plane attention statistics in one fused pass, and top-k keys per query.

Input ``a`` has shape ``(..., Q, K)``: any number of leading dims (e.g. batch,
layer, head), each trailing ``(Q, K)`` plane a matrix of attention weights whose
rows are softmaxes.  ``lengths`` (None, or an integer array whose shape is a
prefix of ``a.shape[:-2]``) gives each plane's valid block
``A[:min(L, Q), :min(L, K)]``.  Nothing outside the valid block is read, so
padding may hold anything (NaN in the store); every output position outside it
is NaN (top-k: index -1, weight NaN).

Accumulation is in float64 whatever the input dtype.  Planes are independent:
the parallel variant splits planes between threads (``prange``), each row is
reduced by one thread in a fixed order, so results are bit-identical for any
thread count and for ``parallel=False``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import prange, types
from numba.extending import overload

from ._jit import FASTMATH, ngjit, ngjit_parallel, parallel_slot, plane_lengths

__all__ = ["PlaneStats", "plane_stats", "topk", "MAX_TOPK"]

MAX_TOPK = 64


class PlaneStats(NamedTuple):
    """Statistics of each plane's valid block; float64, NaN outside it.

    row_sum[..., q]    = Σ_k A[q, k]
    col_sum[..., k]    = Σ_q A[q, k]            (incoming attention of key k)
    entropy[..., q]    = −Σ_k A[q, k]·ln A[q, k]  (natural log, 0·ln 0 = 0, no epsilon)
    max_weight[..., q] = max_k A[q, k]
    diag[..., q]       = A[q, q]                (all NaN when Q ≠ K: cross-attention)
    distance[..., q]   = Σ_k A[q, k]·|q − k|     (mean attention distance)
    sq_sum[..., q]     = Σ_k A[q, k]²           (for the spread of the weights)
    """

    row_sum: np.ndarray
    col_sum: np.ndarray
    entropy: np.ndarray
    max_weight: np.ndarray
    diag: np.ndarray
    distance: np.ndarray
    sq_sum: np.ndarray


# --------------------------------------------------------------------------
# Vectorisable natural logs.
#
# Why: LLVM lowers ``np.log`` to a libm call, which stops the key loop from
# vectorising (SVML is not available with PyPI's llvmlite), and log is most of
# the work.  These are fdlibm/musl ``log`` and ``logf`` written with integer
# ops on the float's bits and a polynomial, branch-free, so LLVM vectorises
# them (float64: 4 lanes of AVX2, float32: 8 lanes).
#
#   x = 2^k · m,  m ∈ [√2/2, √2)          (exponent/mantissa split on the bits)
#   f = m − 1,  s = f / (2 + f)
#   ln m = 2·atanh(s) = f − f²/2 + s·(f²/2 + R(s²)),  R a minimax polynomial
#   ln x = k·ln2_hi + (ln m + k·ln2_lo)
#
# float64 (7-term R): max relative error vs np.log ~4.4e-16 (tests: < 1e-14).
# float32 (4-term R, float32 arithmetic): ~1.8e-7, i.e. ~1.5 ulp of float32
# (tests: < 3e-7).  The statistics use the log of the input's own precision:
# a float32 weight is only known to 6e-8 anyway, and 8 lanes instead of 4 make
# plane_stats ~1.5x faster.  The products and sums stay float64; because every
# x·ln x of a softmax row has the same sign, the entropy's relative error is at
# most the log's (~2e-7 for float32 input, tests check 1e-6).
#
# Subnormal inputs are scaled into the normal range first (one select).
# At x = 0 both return a finite value, so x·ln x is exactly 0 there: the
# 0·ln 0 = 0 convention with no branch.  Negative or non-finite x give garbage;
# attention weights are never that.
#
# No 2^52 "magic number" int→float trick for the exponent: under ``reassoc``
# LLVM may distribute k·ln2 over it and cancel catastrophically.  The exponent
# goes through int32, whose convert AVX2 has (it has none from int64).
# --------------------------------------------------------------------------

_LN2 = 0.6931471805599453
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_LG1 = 6.666666666666735130e-01
_LG2 = 3.999999999940941908e-01
_LG3 = 2.857142874366239149e-01
_LG4 = 2.222219843214978396e-01
_LG5 = 1.818357216161805012e-01
_LG6 = 1.531383769920937332e-01
_LG7 = 1.479819860511658591e-01
_TINY = 2.2250738585072014e-308  # smallest normal float64
_TWO54 = 18014398509481984.0

# float32 constants must be float32 scalars, or Numba promotes to float64.
_F = np.float32
_I = np.int32
_LN2_HI_F = _F(6.9313812256e-01)
_LN2_LO_F = _F(9.0580006145e-06)
_LG1_F = _F(0.66666662693)  # 0xaaaaaa.0p-24; |error of the fit| < 2**-34.24
_LG2_F = _F(0.40000972152)  # 0xccce13.0p-25
_LG3_F = _F(0.28498786688)  # 0x91e9ee.0p-25
_LG4_F = _F(0.24279078841)  # 0xf89e26.0p-26
_TINY_F = _F(1.17549435e-38)  # smallest normal float32
_TWO25_F = _F(33554432.0)
_SUB_F = _F(25.0)
_ZERO_F = _F(0.0)
_HALF_F = _F(0.5)
_ONE_F = _F(1.0)
_TWO_F = _F(2.0)


@ngjit
def _ln_normal(x):
    """ln x for normal float64 x > 0 (and x = 0 → finite); see the block comment."""
    # Shift the bits so the mantissa lands in [√2/2, √2) and the exponent
    # absorbs the carry (musl's trick: no compare, no blend).
    u = np.float64(x).view(np.int64) + 0x00095F6200000000
    k = np.float64(np.int32((u >> 52) - 1023))
    m = np.int64((u & 0x000FFFFFFFFFFFFF) + 0x3FE6A09E00000000).view(np.float64)
    f = m - 1.0
    hfsq = 0.5 * f * f
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (_LG2 + w * (_LG4 + w * _LG6))
    t2 = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7)))
    return s * (hfsq + t1 + t2) + k * _LN2_LO - hfsq + f + k * _LN2_HI


@ngjit
def _ln(x):
    """ln x for any float64 x ≥ 0, subnormals included (scaled by 2^54 first)."""
    tiny = x < _TINY
    xs = x * _TWO54 if tiny else x
    return _ln_normal(xs) - (54.0 * _LN2 if tiny else 0.0)


@ngjit
def _ln32(x):
    """ln x for float32 x ≥ 0 in float32 arithmetic (musl logf), subnormals included."""
    tiny = x < _TINY_F
    xs = x * _TWO25_F if tiny else x
    u = np.int32(np.float32(xs).view(np.int32) + _I(0x3F800000 - 0x3F3504F3))
    k = np.float32(np.int32((u >> _I(23)) - _I(127))) - (_SUB_F if tiny else _ZERO_F)
    m = np.int32((u & _I(0x007FFFFF)) + _I(0x3F3504F3)).view(np.float32)
    f = m - _ONE_F
    hfsq = _HALF_F * f * f
    s = f / (_TWO_F + f)
    z = s * s
    w = z * z
    t1 = w * (_LG2_F + w * _LG4_F)
    t2 = z * (_LG1_F + w * _LG3_F)
    return s * (hfsq + t1 + t2) + k * _LN2_LO_F - hfsq + f + k * _LN2_HI_F


def _ln_native(x):
    """ln x in x's own precision (float32 → _ln32, else _ln); jit-only."""
    raise NotImplementedError("only callable from jitted code")


@overload(_ln_native, jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
def _ln_native_impl(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: _ln32(x)
    return lambda x: _ln(np.float64(x))


@ngjit
def _ln_array(x, out):
    for i in range(x.size):
        out[i] = _ln_native(x[i])


def fast_log(x: np.ndarray) -> np.ndarray:
    """Elementwise ln with this module's log: float32 in → float32 log, else float64.

    Exposed for tests and benchmarks; returns float64 either way.
    """
    x = np.ascontiguousarray(x).ravel()
    if x.dtype != np.float32:
        x = x.astype(np.float64)
    out = np.empty(x.shape, dtype=x.dtype)
    _ln_array(x, out)
    return out.astype(np.float64)


# --------------------------------------------------------------------------
# The fused statistics kernel.
# --------------------------------------------------------------------------

_SIGN_OFF = 0x7FFFFFFFFFFFFFFF


@ngjit
def _valid(n, Q, K):
    """Valid rows and keys of a plane with length n; an empty block is (0, 0)."""
    nq = min(n, Q)
    nk = min(n, K)
    if nq == 0 or nk == 0:
        return 0, 0
    return nq, nk


@ngjit
def _plane_stats(a, p, n, absd, lnbuf, row_sum, col_sum, entropy, max_weight, diag, distance, sq_sum):
    """All statistics of plane ``p`` in one pass over its valid block.

    Rows outer, keys inner, every inner loop over contiguous keys and
    branch-free, so it vectorises.  Per row, two loops over the keys (the row,
    256 bytes for K = 64 float32, stays in L1 between them):

    1. ``lnbuf[k] = ln A[q, k]`` in the input's precision, nothing else in the
       loop, so for float32 LLVM uses all 8 float32 lanes of AVX2;
    2. in float64 (4 lanes): row sum, x·ln x, max, x·|q−k| (from the ``absd``
       table, no abs/convert), x², and the column sum (load-add-store into
       ``col_sum[p]``).

    Max is taken on the float's bits mapped to an order-preserving int64
    (b ^ ((b >> 63) & 0x7FF…F)): LLVM vectorises integer max reductions but not
    floating-point ones without ``nnan``.
    """
    Q = a.shape[1]
    K = a.shape[2]
    nq, nk = _valid(n, Q, K)
    for k in range(nk):
        col_sum[p, k] = 0.0
    for k in range(nk, K):
        col_sum[p, k] = np.nan
    for q in range(nq):
        for k in range(nk):
            lnbuf[k] = _ln_native(a[p, q, k])
        # absd[off + k] == |q - k|.  The max() lets LLVM prove the index is
        # non-negative, dropping Numba's negative-index wraparound select that
        # would stop the loop from vectorising.
        off = max(Q - 1 - q, 0)
        rs = 0.0
        ent = 0.0
        dist = 0.0
        sq = 0.0
        key = np.int64(-0x7FFFFFFFFFFFFFFF - 1)
        for k in range(nk):
            xd = np.float64(a[p, q, k])
            rs += xd
            sq += xd * xd
            ent += xd * np.float64(lnbuf[k])
            b = np.float64(xd).view(np.int64)
            key = max(key, b ^ ((b >> 63) & _SIGN_OFF))
            dist += xd * absd[off + k]
            col_sum[p, k] += xd
        row_sum[p, q] = rs
        entropy[p, q] = -ent
        max_weight[p, q] = np.int64(key ^ ((key >> 63) & _SIGN_OFF)).view(np.float64)
        distance[p, q] = dist
        sq_sum[p, q] = sq
        diag[p, q] = a[p, q, q] if Q == K else np.nan
    for q in range(nq, Q):
        row_sum[p, q] = np.nan
        entropy[p, q] = np.nan
        max_weight[p, q] = np.nan
        distance[p, q] = np.nan
        sq_sum[p, q] = np.nan
        diag[p, q] = np.nan


def _stats_planes(a, lens, absd, row_sum, col_sum, entropy, max_weight, diag, distance, sq_sum):
    for p in prange(a.shape[0]):
        lnbuf = np.empty(a.shape[2], dtype=a.dtype)  # per plane, so per thread
        _plane_stats(a, p, lens[p], absd, lnbuf, row_sum, col_sum, entropy, max_weight, diag, distance, sq_sum)


_stats_parallel = ngjit_parallel(_stats_planes)
_stats_serial = ngjit(_stats_planes)  # prange is plain range without parallel=True


# --------------------------------------------------------------------------
# Top-k keys per query row.
# --------------------------------------------------------------------------


#: Keys per group of the top-k pre-filter: 8 float32 are one AVX2 vector, so a group's max is
#: one vector reduction.
_GROUP = 8


@ngjit
def _insert(x, j, k, wbuf, ibuf):
    """Insert weight x of key j into the descending k-buffer; an equal weight stays behind."""
    last = k - 1
    if x > wbuf[last]:
        i = last
        while i > 0 and wbuf[i - 1] < x:
            wbuf[i] = wbuf[i - 1]
            ibuf[i] = ibuf[i - 1]
            i -= 1
        wbuf[i] = x
        ibuf[i] = j


@ngjit
def _plane_topk(a, p, n, k, index, weight, wbuf, ibuf, cand, gmax):
    """Top ``k`` keys of each valid row of plane ``p``: a threshold, then insertion sort.

    Why not a sort: k ≪ K.  Why not insertion over every key: on a softmax row about
    k·ln(K/k) keys enter the buffer, each a mispredicted branch, which cost more than
    the compares.  So first a lower bound on the k-th largest weight: the k-th largest of
    the maxima of groups of 8 keys (k of those maxima are k distinct weights ≥ it).  Keys
    below it cannot be in the top k; the others are gathered without a branch and only
    they are inserted.  The buffer starts as k entries of weight −inf; descending by
    weight; an equal weight never passes an earlier key (strict compares), so ties go to
    the lower key index, the order of a stable argsort of −w.
    """
    Q = a.shape[1]
    nq, nk = _valid(n, Q, a.shape[2])
    for q in range(Q):
        for t in range(k):
            index[p, q, t] = -1
            weight[p, q, t] = np.nan
    if k == 0:
        return
    groups = nk // _GROUP
    for q in range(nq):
        row = a[p, q]
        threshold = -np.inf
        if groups >= k:
            for g in range(groups):
                m = row[g * _GROUP]
                for j in range(1, _GROUP):
                    m = max(m, row[g * _GROUP + j])
                gmax[g] = m
            for t in range(k):
                wbuf[t] = -np.inf
            for g in range(groups):
                _insert(np.float64(gmax[g]), g, k, wbuf, ibuf)
            threshold = wbuf[k - 1]
        count = 0
        for j in range(nk):
            cand[count] = j
            count += np.float64(row[j]) >= threshold
        for t in range(k):
            wbuf[t] = -np.inf
            ibuf[t] = -1
        for c in range(count):
            _insert(np.float64(row[cand[c]]), cand[c], k, wbuf, ibuf)
        for t in range(k):
            if ibuf[t] >= 0:
                index[p, q, t] = ibuf[t]
                weight[p, q, t] = wbuf[t]


def _topk_planes(a, lens, k, index, weight):
    for p in prange(a.shape[0]):
        wbuf = np.empty(k)
        ibuf = np.empty(k, dtype=np.int32)
        cand = np.empty(a.shape[2], dtype=np.int64)
        gmax = np.empty(a.shape[2] // _GROUP + 1, dtype=a.dtype)
        _plane_topk(a, p, lens[p], k, index, weight, wbuf, ibuf, cand, gmax)


_topk_parallel = ngjit_parallel(_topk_planes)
_topk_serial = ngjit(_topk_planes)


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


def _as_planes(a) -> tuple[np.ndarray, tuple[int, ...]]:
    a = np.asarray(a)
    if a.ndim < 2:
        raise ValueError(f"attention must have at least 2 dims (..., Q, K), got shape {a.shape}")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    lead = a.shape[:-2]
    Q, K = a.shape[-2:]
    # C order keeps each row's keys contiguous for the vectorised inner loop;
    # a non-contiguous input is copied once.
    n_planes = int(np.prod(lead, dtype=np.int64))
    planes = np.ascontiguousarray(a).reshape((n_planes, Q, K))
    return planes, lead


def plane_stats(a, lengths=None, *, parallel: bool = True) -> PlaneStats:
    """Row/column sums, entropy, max, diagonal, attention distance and Σ A² per row.

    a:        (..., Q, K) float32 or float64 attention weights.
    lengths:  None or ints whose shape is a prefix of ``a.shape[:-2]``.
    parallel: False runs a single-threaded compiled variant (use it inside
              dask or any thread pool, so Numba threads × pool threads never
              exceed the cores).  Results are identical either way.

    Returns a :class:`PlaneStats` of float64 arrays: row statistics
    ``(..., Q)``, ``col_sum`` ``(..., K)``; NaN outside each valid block.
    """
    planes, lead = _as_planes(a)
    P, Q, K = planes.shape
    lens = plane_lengths(lengths, lead, max(Q, K))
    absd = np.abs(np.arange(-(Q - 1), K, dtype=np.float64))
    outs = [np.empty((P, Q)) for _ in range(6)]
    row_sum, entropy, max_weight, diag, distance, sq_sum = outs
    col_sum = np.empty((P, K))
    if P:
        with parallel_slot(parallel) as par:
            kernel = _stats_parallel if par else _stats_serial
            kernel(planes, lens, absd, row_sum, col_sum, entropy, max_weight, diag, distance, sq_sum)
    row_shape = lead + (Q,)
    return PlaneStats(
        row_sum=row_sum.reshape(row_shape),
        col_sum=col_sum.reshape(lead + (K,)),
        entropy=entropy.reshape(row_shape),
        max_weight=max_weight.reshape(row_shape),
        diag=diag.reshape(row_shape),
        distance=distance.reshape(row_shape),
        sq_sum=sq_sum.reshape(row_shape),
    )


def topk(a, k: int, lengths=None, *, parallel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest weights of each query row and their key indices.

    Returns ``(index, weight)``: int32 and float64 arrays of shape
    ``(..., Q, k)``, descending by weight, ties to the lower key index.  Rows
    with fewer than ``k`` valid keys are padded with index −1 / weight NaN;
    rows outside the valid block are all −1 / NaN (NaN or −inf weights inside
    it are never selected).  ``k`` must be in [0, 64] (ValueError otherwise);
    ``parallel`` as in :func:`plane_stats`.
    """
    k = int(k)
    if not 0 <= k <= MAX_TOPK:
        raise ValueError(f"k must be between 0 and {MAX_TOPK}, got {k}")
    planes, lead = _as_planes(a)
    P, Q, K = planes.shape
    lens = plane_lengths(lengths, lead, max(Q, K))
    index = np.empty((P, Q, k), dtype=np.int32)
    weight = np.empty((P, Q, k), dtype=np.float64)
    if P:
        with parallel_slot(parallel) as par:
            kernel = _topk_parallel if par else _topk_serial
            kernel(planes, lens, k, index, weight)
    return index.reshape(lead + (Q, k)), weight.reshape(lead + (Q, k))
