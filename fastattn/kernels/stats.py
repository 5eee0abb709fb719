"""Every per-plane attention statistic, top-k and pattern flag in one fused pass.

Input ``a`` has shape ``(..., Q, K)``: any number of leading dims (e.g. batch,
layer, head), each trailing ``(Q, K)`` plane a matrix of attention weights whose
rows are softmaxes.  ``lengths`` (None, or an integer array whose shape is a
prefix of ``a.shape[:-2]``) gives each plane's valid block
``A[:nq, :nk]``, ``nq = min(L, Q)``, ``nk = min(L, K)``.  Nothing outside the
valid block is read, so padding may hold anything (NaN in the store); every
output position outside it is NaN (top-k: index -1, weight NaN).

One kernel call reads each row once (from memory; the row then stays in L1 for
the log, the sums and the top-k) and writes, per plane:

- per query (``ROW_STATS``), per key (``col_sum``) and the top-k keys per query;
- the per-plane summaries (``PLANE_STATS``), ``peak_key`` and the pattern flags
  (``FLAGS``), from running sums over the rows: no second pass over the
  per-query arrays.

Accumulation is in float64 whatever the input dtype.  Planes are independent:
with ``parallel=True`` threads take pieces of the planes (``_jit.parallel_for``),
each row is reduced by one thread in a fixed order, so results are bit-identical
for any thread count and for ``parallel=False``.

Compiling.  A first run compiles one kernel, ``_stats_planes``, for the input's
dtype: ~5 CPU-s for float32 (it was ~14 with the ``prange`` variant, a separate
per-plane function and a top-k per dtype; ``_jit`` says why each cost).  It is
one function on purpose; its per-row helpers are inlined into it by Numba.

Per-plane summaries (n = the plane's length, nq/nk its valid queries/keys; for
self-attention nq = nk = n; NaN where undefined, e.g. for an empty plane):

    entropy_mean   = Σ_q entropy[q] / nq
    entropy_norm   = entropy_mean / ln nk                 (NaN if nk ≤ 1)
    self_attention = Σ_q A[q,q] / nq                      (NaN for Q ≠ K)
    diag_share     = Σ_q A[q,q] / Σ_qk A[q,k]             (NaN for Q ≠ K)
    peak_key       = argmax_k col_sum[k], first on ties   (-1 for an empty plane)
    peak_incoming  = max_k col_sum[k]
    confidence     = Σ_q max_weight[q] / nq
    distance_mean  = Σ_q distance[q] / nq
    row_sum_error  = max_q |row_sum[q] − 1|
    prev_token     = Σ_{q=1}^{n−1} A[q,q−1] / n           (NaN for Q ≠ K)
    next_token     = Σ_{q=0}^{n−2} A[q,q+1] / n           (NaN for Q ≠ K)
    first_token    = col_sum[0] / nq
    last_token     = col_sum[nk−1] / nq
    duplicate_token = Σ_q Σ_{k<q, id[k]=id[q]} A[q,k] / Σ_qk A[q,k]
    induction      = Σ_q Σ_{k<q, id[k]=id[q]} A[q,k+1] / Σ_qk A[q,k]

The last two need the plane's token ids (``repeats``; NaN without them, for Q ≠ K,
and for a plane whose valid tokens repeat no id).  They are TransformerLens's
``head_detector`` scores with its defaults (``error_measure="mul"``, nothing
excluded): its duplicate-token pattern marks the earlier positions holding the
query's id, its induction pattern the position right after each of them
(k + 1 ≤ q, so the pattern stays lower triangular), and the score is
Σ A·pattern / Σ A.  The pairs (q, k) are found once per sequence in NumPy
(``repeats``), not per plane: each row adds only its own few pairs.

Pattern flags.  The seed rules were written for 8 tokens, where a uniform row
gives every key u = 1/8 and every key receives 1 in total.  Each rule is
rescaled so that at length 8 it gives exactly the seed's number (u = 1/nk):

    uniform        std of the valid weights < 0.08·u         (seed: std < 0.01)
    diagonal_only  diag_share > 0.8                          (a share already)
    dominant_key   peak_incoming / nq > 3.0/8 of all attention (seed: > 3.0)
    critical_key   peak_incoming / nq > 1.5/8                (seed: > 1.5)
    weak           largest weight < 1.2·u                    (seed: max < 0.15)
    strong_self    self_attention > 1.2·u                    (seed: > 0.15)

Incoming attention is a share of all attention (the total is nq), not a
multiple of the uniform column sum (1 at any length): "3x a fair share" of 512
keys is 0.6% of the attention, which is not one key dominating.  Every flag is
False for planes of length ≤ 1, and the diagonal ones for cross-attention.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numba
import numpy as np
from numba import types
from numba.extending import overload

from ._jit import FASTMATH, ngjit, parallel_for, plane_lengths
from ..stat_names import FLAGS, PLANE_STATS, ROW_STATS

#: Per-row helpers are inlined into their caller by Numba (at the IR level): as calls, LLVM keeps
#: them out of line, and a call per row passing ~40 array fields cost as much as the row's work
#: (~25% of the kernel's time).  Only small helpers: inlining a big one is slow to compile (_jit).
_inline = numba.njit(inline="always", fastmath=FASTMATH, error_model="numpy")

__all__ = [
    "PlaneStats",
    "Repeats",
    "StatsBuffers",
    "repeats",
    "plane_stats",
    "topk",
    "attention_stats",
    "empty_buffers",
    "fill",
    "named",
    "ROW_STATS",
    "PLANE_STATS",
    "FLAGS",
    "MAX_TOPK",
]

MAX_TOPK = 64

#: The seed's thresholds at 8 tokens (the module docstring says how each scales).
SEED_LENGTH = 8
UNIFORM_STD = 0.01
DIAGONAL_SHARE = 0.8
DOMINANT_INCOMING = 3.0
CRITICAL_INCOMING = 1.5
WEAK_MAX = 0.15
STRONG_SELF = 0.15

# Row indices into the kernel's outputs (numba freezes module globals as constants).
_ROW_SUM, _ENTROPY, _MAX_WEIGHT, _DISTANCE, _DIAG, _SQ_SUM = range(len(ROW_STATS))
(_ENTROPY_MEAN, _ENTROPY_NORM, _SELF_ATTENTION, _DIAG_SHARE, _PEAK_INCOMING, _CONFIDENCE, _DISTANCE_MEAN,
 _ROW_SUM_ERROR, _PREV_TOKEN, _NEXT_TOKEN, _FIRST_TOKEN, _LAST_TOKEN, _DUPLICATE_TOKEN, _INDUCTION) = range(len(PLANE_STATS))
_UNIFORM, _DIAGONAL_ONLY, _DOMINANT_KEY, _WEAK, _CRITICAL_KEY, _STRONG_SELF = range(len(FLAGS))


# --------------------------------------------------------------------------
# Vectorisable natural logs.
#
# Why: LLVM lowers ``np.log`` to a libm call, which stops the key loop from
# vectorising (SVML is not available with PyPI's llvmlite), and log is most of
# the work.  These are fdlibm/musl ``log`` and Cephes ``logf`` written with
# integer ops on the float's bits and a polynomial, branch-free, so LLVM
# vectorises them (float64: 4 lanes of AVX2, float32: 8 lanes).
#
#   x = 2^k · m,  m ∈ [√2/2, √2)          (exponent/mantissa split on the bits)
#   f = m − 1
#   float64 (musl log):   s = f / (2 + f),
#                         ln m = 2·atanh(s) = f − f²/2 + s·(f²/2 + R(s²)),  R minimax
#   float32 (Cephes logf): ln m = f − f²/2 + f³·P(f),  P of degree 8, no division
#   ln x = k·ln2_hi + (ln m + k·ln2_lo)
#
# float64 (7-term R): max relative error vs np.log ~4.4e-16 (tests: < 1e-14).
# float32 (float32 arithmetic): ~1.2e-7, i.e. ~1 ulp of float32 (tests: < 3e-7).
# musl's logf (a division and a 4-term R) was less exact (~1.8e-7) and made
# the whole kernel ~4% slower (docs/performance.md).
#
# The statistics use the log of the input's own precision:
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
# Cephes logf: ln 2 split as 0.693359375 (exact in few bits) − 2.12194440e-4, and P's coefficients.
_LN2_HI_F = _F(0.693359375)
_LN2_LO_F = _F(-2.12194440e-4)
_P8_F = _F(7.0376836292e-2)
_P7_F = _F(-1.1514610310e-1)
_P6_F = _F(1.1676998740e-1)
_P5_F = _F(-1.2420140846e-1)
_P4_F = _F(1.4249322787e-1)
_P3_F = _F(-1.6668057665e-1)
_P2_F = _F(2.0000714765e-1)
_P1_F = _F(-2.4999993993e-1)
_P0_F = _F(3.3333331174e-1)
_TINY_F = _F(1.17549435e-38)  # smallest normal float32
_TWO25_F = _F(33554432.0)
_SUB_F = _F(25.0)
_ZERO_F = _F(0.0)
_HALF_F = _F(0.5)
_ONE_F = _F(1.0)


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
    """ln x for float32 x ≥ 0 in float32 arithmetic (Cephes logf), subnormals included."""
    tiny = x < _TINY_F
    xs = x * _TWO25_F if tiny else x
    u = np.int32(np.float32(xs).view(np.int32) + _I(0x3F800000 - 0x3F3504F3))
    k = np.float32(np.int32((u >> _I(23)) - _I(127))) - (_SUB_F if tiny else _ZERO_F)
    m = np.int32((u & _I(0x007FFFFF)) + _I(0x3F3504F3)).view(np.float32)
    f = m - _ONE_F
    z = f * f
    y = _P8_F * f + _P7_F  # Horner: Estrin (shorter chains, more operations) was ~3% slower
    y = y * f + _P6_F
    y = y * f + _P5_F
    y = y * f + _P4_F
    y = y * f + _P3_F
    y = y * f + _P2_F
    y = y * f + _P1_F
    y = y * f + _P0_F
    return f + (y * f * z + k * _LN2_LO_F - _HALF_F * z) + k * _LN2_HI_F


def _ln_native(x):
    """ln x in x's own precision (float32 → _ln32, else _ln); jit-only."""
    raise NotImplementedError("only callable from jitted code")


@overload(_ln_native, jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
def _ln_native_impl(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: _ln32(x)
    return lambda x: _ln(np.float64(x))


_KEY32_OFF = np.int32(0x7FFFFFFF)
_KEY64_OFF = np.int64(0x7FFFFFFFFFFFFFFF)


def _max_bits(x):
    """x's bits as an integer that orders like x (of x's width: float32 max in 8 int32 lanes)."""
    raise NotImplementedError("only callable from jitted code")


@overload(_max_bits, inline="always", jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
def _max_bits_impl(x):
    # LLVM vectorises integer max reductions, but floating-point ones only with ``nnan``.
    # Sign-magnitude to two's complement: b ^ ((b >> 31) & 0x7FF…F); NaN stays above +inf.
    if isinstance(x, types.Float) and x.bitwidth == 32:

        def bits32(x):
            b = np.float32(x).view(np.int32)
            return np.int32(b ^ (np.int32(b >> _I(31)) & _KEY32_OFF))

        return bits32
    return lambda x: np.float64(x).view(np.int64) ^ ((np.float64(x).view(np.int64) >> 63) & _KEY64_OFF)


def _lowest_bits(a):
    """The smallest ``_max_bits`` value of ``a``'s element type (the start of a max)."""
    raise NotImplementedError("only callable from jitted code")


@overload(_lowest_bits, inline="always", jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
def _lowest_bits_impl(a):
    if a.dtype == types.float32:
        return lambda a: np.int32(-(2**31))
    return lambda a: np.int64(-(2**63))


def _from_max_bits(m):
    """The float64 value of a ``_max_bits`` integer (inverse map)."""
    raise NotImplementedError("only callable from jitted code")


@overload(_from_max_bits, inline="always", jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
def _from_max_bits_impl(m):
    if m.bitwidth == 32:
        return lambda m: np.float64(np.int32(m ^ (np.int32(m >> _I(31)) & _KEY32_OFF)).view(np.float32))
    return lambda m: np.int64(m ^ ((m >> 63) & _KEY64_OFF)).view(np.float64)


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
# Top-k keys of one row.
#
# Why this way: k ≪ K, and a sort, or an insertion buffer fed every key, costs
# a mispredicted branch per key that enters.  Instead each weight becomes an
# integer key that orders like it (``_order_key32``/``_order_key64``), and each of
# the k ranks is found without a data-dependent branch:
#
# - The keys sit in 8 strided lanes (lane = j mod 8); the lane maxima are kept,
#   so a rank's key is the max of 8 lane maxima, after which only the winner's
#   lane (K/8 keys) is searched again.
# - float32 rows: the 32-bit key and the key's position go into one int64,
#   key << 32 | (2³² − 1 − j), so keys are distinct and the larger of two equal
#   weights is the lower position: the position comes out of the key itself.
#   The two halves are written as int32 pairs (high and low word), which LLVM
#   vectorises as 8-lane int32 work and two interleaving shuffles: ~7% off the
#   whole kernel against shifting and or-ing in 4 int64 lanes.
# - float64 rows (no room for the position): the key alone, and one vectorised
#   pass per rank finds the lowest position holding it.
#
# Only those two steps depend on the dtype (``_put_keys``, ``_key_position``,
# small overloads); one ranking code for both compiles faster than two.
#
# Either way ties go to the lower key index (the order of a stable argsort of
# −w), NaN and −inf are never selected, and −0.0 ties with +0.0.
# --------------------------------------------------------------------------


def _order_key_of(bits: int, width: int) -> int:
    """The order key of a float's bits (as a Python int), for the constants below."""
    sign = -1 if bits >> (width - 1) else 0
    signed = bits - (1 << width) if sign else bits
    return (signed ^ (sign & ((1 << (width - 1)) - 1))) - sign


_KEY32_NEG_INF = np.int32(_order_key_of(0xFF800000, 32))
_KEY32_POS_INF = np.int32(_order_key_of(0x7F800000, 32))
_KEY64_NEG_INF = np.int64(_order_key_of(0xFFF0000000000000, 64))
_KEY64_POS_INF = np.int64(_order_key_of(0x7FF0000000000000, 64))
_NO_KEY = np.int64(-(2**63))  # below every key: padding, keys already ranked, a float64 NaN/−inf
_NOT_SELECTABLE32 = np.int32(-(2**31))  # a float32 NaN/−inf's high word: below every real key
_NONE_BELOW = np.int64(-(2**63) + 2**32)  # a slot's max below this: only NaN/−inf (or nothing) left
# Which int32 of an int64 is its high word (the float32 key) and which its low word (the position).
_HIGH_WORD, _LOW_WORD = (1, 0) if sys.byteorder == "little" else (0, 1)
_LOW32 = np.int64(0xFFFFFFFF)
_LANES = 8
_LOCKSTEP = 4  # rows whose ranks are found together (_row_ranks)


@_inline
def _order_key32(x):
    """float32 → int32 key and whether x is selectable (not NaN, not −inf).

    ``_max_bits`` with the negatives moved up by one, so that −0.0 and +0.0 are both 0 (they
    tie, as in a float compare).  NaNs land above +inf or below −inf, so "selectable" is one
    integer range test, no float compare, and the loop stays in integer lanes.  (Written out,
    not through ``_max_bits``: LLVM vectorised that ~6% worse.)"""
    b = np.float32(x).view(np.int32)
    s = np.int32(b >> _I(31))
    k = np.int32(np.int32(b ^ (s & _KEY32_OFF)) - s)
    return k, (k > _KEY32_NEG_INF) & (k <= _KEY32_POS_INF)


@_inline
def _order_key64(x):
    """float64 → int64 key, as ``_order_key32``."""
    b = np.float64(x).view(np.int64)
    s = b >> 63
    k = (b ^ (s & _KEY64_OFF)) - s
    return k, (k > _KEY64_NEG_INF) & (k <= _KEY64_POS_INF)


@_inline
def _no_topk(index, weight, d, q, k):
    for t in range(k):
        index[d, q, t] = -1
        weight[d, q, t] = np.nan


def _put_keys(a, p, q, nk, keys, ur):
    """Slot ``ur`` of ``keys``: the top-k keys of row ``a[p, q, :nk]`` (int64, below
    ``_NONE_BELOW`` for NaN/−inf): float32 packed with its position, float64 the order key alone.
    Jit-only."""
    raise NotImplementedError("only callable from jitted code")


@overload(_put_keys, inline="always", jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
def _put_keys_impl(a, p, q, nk, keys, ur):
    if a.dtype == types.float32:

        def packed(a, p, q, nk, keys, ur):
            words = keys[ur].view(np.int32)  # key << 32 | (2³² − 1 − j), as two int32 words
            for j in range(nk):
                key, ok = _order_key32(a[p, q, j])
                words[np.uint64(2 * j + _HIGH_WORD)] = key if ok else _NOT_SELECTABLE32
                words[np.uint64(2 * j + _LOW_WORD)] = _I(-1) - _I(j)  # 2³² − 1 − j as uint32

        return packed

    def alone(a, p, q, nk, keys, ur):
        for j in range(nk):
            key, ok = _order_key64(a[p, q, j])
            keys[ur, np.uint64(j)] = key if ok else _NO_KEY

    return alone


def _key_position(a, keys, r, m, nk):
    """The position of the largest key ``m`` of slot ``r``: unpacked from ``m`` (float32 rows),
    or the lowest position holding it (float64 rows, one vectorised pass).  Jit-only."""
    raise NotImplementedError("only callable from jitted code")


@overload(_key_position, inline="always", jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
def _key_position_impl(a, keys, r, m, nk):
    if a.dtype == types.float32:
        return lambda a, keys, r, m, nk: _LOW32 - (m & _LOW32)

    def search(a, keys, r, m, nk):
        first = nk
        for j in range(nk):
            first = min(first, j if keys[r, j] == m else nk)
        return first

    return search


@_inline
def _row_keys(a, p, q, nk, keys, lanes, r):
    """Slot ``r`` of ``keys``/``lanes``: row ``a[p, q, :nk]``'s keys, padded to whole lanes, and
    the 8 lanes' maxima.

    The maxima are eight local variables, stored once: kept in ``lanes`` (an array LLVM cannot
    prove apart from ``keys``), every step went through memory and LLVM vectorised the loop
    across groups, with a gather per lane (the top-k ran ~8% slower)."""
    ur = np.uint64(r)
    groups = (nk + _LANES - 1) // _LANES
    _put_keys(a, p, q, nk, keys, ur)
    for j in range(nk, groups * _LANES):
        keys[ur, np.uint64(j)] = _NO_KEY
    m0, m1, m2, m3 = keys[ur, 0], keys[ur, 1], keys[ur, 2], keys[ur, 3]
    m4, m5, m6, m7 = keys[ur, 4], keys[ur, 5], keys[ur, 6], keys[ur, 7]
    for g in range(1, groups):
        b = g * _LANES
        m0 = max(m0, keys[ur, np.uint64(b)])
        m1 = max(m1, keys[ur, np.uint64(b + 1)])
        m2 = max(m2, keys[ur, np.uint64(b + 2)])
        m3 = max(m3, keys[ur, np.uint64(b + 3)])
        m4 = max(m4, keys[ur, np.uint64(b + 4)])
        m5 = max(m5, keys[ur, np.uint64(b + 5)])
        m6 = max(m6, keys[ur, np.uint64(b + 6)])
        m7 = max(m7, keys[ur, np.uint64(b + 7)])
    lanes[ur, 0], lanes[ur, 1], lanes[ur, 2], lanes[ur, 3] = m0, m1, m2, m3
    lanes[ur, 4], lanes[ur, 5], lanes[ur, 6], lanes[ur, 7] = m4, m5, m6, m7


@_inline
def _row_ranks(a, p, q0, nk, k, keys, lanes, index, weight, d):
    """The top ``k`` of rows ``q0 … q0 + _LOCKSTEP − 1`` (keys in slots 0, 1, …) from their lanes.

    The rows go in lockstep: each rank waits on the last (a chain of maxima), and several rows'
    independent chains overlap in the CPU (4 rows: ~4% off the whole kernel against 2; 8 were
    ~6% slower than 2).  Trees, not chains, of maxima for the same reason.
    """
    groups = (nk + _LANES - 1) // _LANES
    for t in range(min(k, nk)):
        for r in range(_LOCKSTEP):
            ur = np.uint64(r)
            m = max(
                max(max(lanes[ur, 0], lanes[ur, 1]), max(lanes[ur, 2], lanes[ur, 3])),
                max(max(lanes[ur, 4], lanes[ur, 5]), max(lanes[ur, 6], lanes[ur, 7])),
            )
            if m < _NONE_BELOW:
                continue  # only NaN/−inf left in this row (or no row: an empty partner)
            j = _key_position(a, keys, r, m, nk)
            index[d, q0 + r, t] = j
            weight[d, q0 + r, t] = a[p, q0 + r, np.uint64(j)]
            if t + 1 == k:
                continue  # the last rank: no lane to search again (~3% of the kernel)
            keys[ur, np.uint64(j)] = _NO_KEY
            lane = j & (_LANES - 1)  # j ≥ 0: no sign fix-up of a modulo
            even, odd = keys[ur, np.uint64(lane)], _NO_KEY
            for g in range(1, groups - 1, 2):
                odd = max(odd, keys[ur, np.uint64(g * _LANES + lane)])
                even = max(even, keys[ur, np.uint64((g + 1) * _LANES + lane)])
            if groups % 2 == 0:
                odd = max(odd, keys[ur, np.uint64((groups - 1) * _LANES + lane)])
            lanes[ur, np.uint64(lane)] = max(even, odd)


@_inline
def _row_topk(a, p, q, nq, nk, keys, lanes, index, weight, d):
    """Row ``q``'s share of the top-k of plane ``p`` (into ``index[d]``/``weight[d]``): −1/NaN,
    its keys now, and the ranks of its ``_LOCKSTEP`` rows together after the last of them (or
    after the plane's last row, the slots past it empty partners)."""
    k = index.shape[2]
    _no_topk(index, weight, d, q, k)
    if k == 0:
        return
    slot = q % _LOCKSTEP
    _row_keys(a, p, q, nk, keys, lanes, slot)
    if q == nq - 1:  # empty partners: every rank of their slots is "none left"
        for r in range(slot + 1, _LOCKSTEP):
            for lane in range(_LANES):
                lanes[r, lane] = _NO_KEY
    # One call site, so one inlined copy of the ranking: a second (for the plane's last rows)
    # cost ~1-3 s more compiling and no speed.
    if slot == _LOCKSTEP - 1 or q == nq - 1:
        _row_ranks(a, p, q - slot, nk, k, keys, lanes, index, weight, d)


@ngjit
def _topk_scratch(K):
    """Per-thread scratch of the top-k, for ``_LOCKSTEP`` rows: keys (padded to whole lanes), lane maxima."""
    padded = max((K + _LANES - 1) // _LANES, 1) * _LANES
    return np.empty((_LOCKSTEP, padded), dtype=np.int64), np.empty((_LOCKSTEP, _LANES), dtype=np.int64)


# --------------------------------------------------------------------------
# The fused kernel.
# --------------------------------------------------------------------------


@ngjit
def _valid(n, Q, K):
    """Valid rows and keys of a plane with length n; an empty block is (0, 0)."""
    nq = min(n, Q)
    nk = min(n, K)
    if nq == 0 or nk == 0:
        return 0, 0
    return nq, nk


@ngjit
def _stats_planes(lo, hi, a, lens, dest, seq, ptr, pair_key, absd, rows, col_sum, index, weight, plane, peak_key, flags):
    """Every statistic of input planes ``lo … hi − 1`` (a piece of a ``parallel_for``), plane ``p``
    into output plane ``dest[p]``, reading each valid row once.

    Rows outer, keys inner, every inner loop over contiguous keys and
    branch-free, so it vectorises.  Per row (256 bytes for K = 64 float32,
    in L1 after its first loop):

    1. in the input's precision, so for float32 in all 8 float32 lanes of AVX2:
       ``lnbuf[k] = ln A[q, k]`` and the max (on the bits, ``_max_bits``);
    2. in float64 (4 lanes): row sum, x·ln x, x·|q−k| (from the ``absd``
       table, no abs/convert), x², and the column sum (load-add-store into
       the float64 scratch ``col``, copied to ``col_sum[d]`` at the end);
    3. the top-k (``_row_topk``: the row's keys, from L1; the ranks of 4 rows at a time);
    4. scalars: the diagonal and its neighbours, the row's repeated-id pairs
       (``pair_key[ptr[s, q] : ptr[s, q + 1]]`` for the plane's sequence
       ``s = seq[d]``, -1 for none), and the running sums of the plane summaries.
    """
    Q = a.shape[1]
    K = a.shape[2]
    k = index.shape[2]
    lnbuf = np.empty(K, dtype=a.dtype)  # scratch of this piece
    col = np.empty(K)
    keys, lanes = _topk_scratch(K)
    square = Q == K
    for p in range(lo, hi):
        d = dest[p]
        n = lens[p]
        nq, nk = _valid(n, Q, K)
        for j in range(nk):
            col[j] = 0.0
        entropy_sum = 0.0
        diag_sum = 0.0
        confidence_sum = 0.0
        distance_sum = 0.0
        total = 0.0
        sq_total = 0.0
        prev = 0.0
        nxt = 0.0
        duplicate = 0.0
        induction = 0.0
        pairs = 0
        s = seq[d]
        largest = -np.inf
        error = 0.0
        for q in range(nq):
            # a[p, q, j], not a row slice: a slice costs a reference count per row
            top_bits = _lowest_bits(a)
            for j in range(nk):
                lnbuf[j] = _ln_native(a[p, q, j])
                top_bits = max(top_bits, _max_bits(a[p, q, j]))
            top = _from_max_bits(top_bits)
            # absd[off + j] == |q - j|.  The max() lets LLVM prove the index is
            # non-negative, dropping Numba's negative-index wraparound select that
            # would stop the loop from vectorising.
            off = max(Q - 1 - q, 0)
            rs = 0.0
            ent = 0.0
            dist = 0.0
            sq = 0.0
            for j in range(nk):
                xd = np.float64(a[p, q, j])
                rs += xd
                sq += xd * xd
                ent += xd * np.float64(lnbuf[j])
                dist += xd * absd[off + j]
                col[j] += xd
            rows[_ROW_SUM, d, q] = rs
            rows[_ENTROPY, d, q] = -ent
            rows[_MAX_WEIGHT, d, q] = top
            rows[_DISTANCE, d, q] = dist
            rows[_SQ_SUM, d, q] = sq
            if square:  # nq == nk: A[q, q] is valid
                diagonal = np.float64(a[p, q, q])
                rows[_DIAG, d, q] = diagonal
                diag_sum += diagonal
                if q > 0:
                    prev += np.float64(a[p, q, q - 1])
                if q + 1 < nk:
                    nxt += np.float64(a[p, q, q + 1])
                if s >= 0:  # every pair has j < q, so j + 1 ≤ q is valid too
                    for i in range(ptr[s, q], ptr[s, q + 1]):
                        j = pair_key[i]
                        duplicate += np.float64(a[p, q, j])
                        induction += np.float64(a[p, q, j + 1])
                    pairs += ptr[s, q + 1] - ptr[s, q]
            else:
                rows[_DIAG, d, q] = np.nan
            entropy_sum -= ent
            confidence_sum += top
            distance_sum += dist
            total += rs
            sq_total += sq
            largest = max(largest, top)
            error = max(error, abs(rs - 1.0))
            _row_topk(a, p, q, nq, nk, keys, lanes, index, weight, d)
        for q in range(nq, Q):
            for r in range(rows.shape[0]):
                rows[r, d, q] = np.nan
            _no_topk(index, weight, d, q, k)
        for j in range(nk):
            col_sum[d, j] = col[j]
        for j in range(nk, K):
            col_sum[d, j] = np.nan

        for i in range(plane.shape[0]):
            plane[i, d] = np.nan
        for i in range(flags.shape[0]):
            flags[i, d] = False
        peak_key[d] = -1
        if nq == 0:
            continue
        fq = np.float64(nq)
        fk = np.float64(nk)
        peak = -np.inf
        for j in range(nk):  # first maximum; NaN never wins
            if col[j] > peak:
                peak = col[j]
                peak_key[d] = j
        peak_incoming = peak if peak_key[d] >= 0 else np.nan
        self_attention = diag_sum / fq if square else np.nan
        diag_share = diag_sum / total if square else np.nan
        plane[_ENTROPY_MEAN, d] = entropy_sum / fq
        if nk > 1:
            plane[_ENTROPY_NORM, d] = entropy_sum / fq / np.log(fk)
        plane[_SELF_ATTENTION, d] = self_attention
        plane[_DIAG_SHARE, d] = diag_share
        plane[_PEAK_INCOMING, d] = peak_incoming
        plane[_CONFIDENCE, d] = confidence_sum / fq
        plane[_DISTANCE_MEAN, d] = distance_sum / fq
        plane[_ROW_SUM_ERROR, d] = error
        if square:
            plane[_PREV_TOKEN, d] = prev / fq
            plane[_NEXT_TOKEN, d] = nxt / fq
            if pairs > 0:
                plane[_DUPLICATE_TOKEN, d] = duplicate / total
                plane[_INDUCTION, d] = induction / total
        plane[_FIRST_TOKEN, d] = col[0] / fq
        plane[_LAST_TOKEN, d] = col[nk - 1] / fq

        if n <= 1:
            continue
        count = fq * fk
        mean = total / count
        std = np.sqrt(max(sq_total / count - mean * mean, 0.0))
        scale = SEED_LENGTH / fk  # the uniform weight 1/nk, as a multiple of the seed's 1/8
        share = peak_incoming / fq
        flags[_UNIFORM, d] = std < UNIFORM_STD * scale
        flags[_DIAGONAL_ONLY, d] = diag_share > DIAGONAL_SHARE
        flags[_DOMINANT_KEY, d] = share > DOMINANT_INCOMING / SEED_LENGTH
        flags[_WEAK, d] = largest < WEAK_MAX * scale
        flags[_CRITICAL_KEY, d] = share > CRITICAL_INCOMING / SEED_LENGTH
        flags[_STRONG_SELF, d] = self_attention > STRONG_SELF * scale


@ngjit
def _topk_planes(lo, hi, a, lens, index, weight):
    Q, K, k = a.shape[1], a.shape[2], index.shape[2]
    keys, lanes = _topk_scratch(K)
    for p in range(lo, hi):
        nq, nk = _valid(lens[p], Q, K)
        for q in range(nq):
            _row_topk(a, p, q, nq, nk, keys, lanes, index, weight, p)
        for q in range(nq, Q):
            _no_topk(index, weight, p, q, k)


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


class PlaneStats(NamedTuple):
    """Per-query and per-key statistics of each plane's valid block; float64, NaN outside it.

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


class Repeats(NamedTuple):
    """Where token ids repeat, for the duplicate-token and induction scores (``repeats``).

    seq   (P,)        int64  each output plane's sequence: a row of ``ptr`` (-1: no ids)
    ptr   (S, Q + 1)  int64  sequence s, query q: its pairs are ``key[ptr[s, q] : ptr[s, q + 1]]``
    key   (M,)        int32  the earlier positions k < q holding the query's id, ascending
    """

    seq: np.ndarray
    ptr: np.ndarray
    key: np.ndarray


def repeats(ids, lead: tuple[int, ...]) -> Repeats:
    """The repeated-id pairs of token ids ``ids`` (..., Q) for planes laid out as ``lead``.

    ``ids``' leading dims broadcast to ``lead`` (e.g. ``(B, 1, 1, Q)`` or ``(B, Q)`` for planes
    ``(B, layer, head)``: one sequence serves all the layers and heads of a sample).  Negative
    ids are "no id" and repeat nothing.  The pairs of a sequence are found once, here, with
    NumPy: a (Q, Q) comparison per sequence, against layers × heads planes of Q × Q weights.
    """
    ids = np.asarray(ids)
    lead = tuple(int(n) for n in lead)
    if ids.ndim < 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"token ids must be an integer array (..., Q), not {ids.dtype} of shape {ids.shape}")
    prefix = ids.shape[:-1]
    if len(prefix) < len(lead):
        prefix = prefix + (1,) * (len(lead) - len(prefix))
    if len(prefix) != len(lead) or any(m not in (1, n) for m, n in zip(prefix, lead)):
        raise ValueError(f"token ids of shape {ids.shape} do not fit planes {lead}")
    Q = ids.shape[-1]
    table = ids.reshape(-1, Q).astype(np.int64)
    S = table.shape[0]
    earlier = np.tri(Q, Q, -1, dtype=bool)  # k < q
    ptr = np.zeros((max(S, 1), Q + 1), dtype=np.int64)
    keys, total = [], 0
    for s in range(S):
        row = table[s]
        ptr[s, 0] = total
        if row.max(initial=-1) < 0 or np.unique(row[row >= 0]).size == np.count_nonzero(row >= 0):
            ptr[s, 1:] = total  # no id repeats: no pair (the usual case of a sequence without ids)
            continue
        same = (row[:, None] == row[None, :]) & earlier & (row >= 0)[:, None]
        qs, ks = np.nonzero(same)  # row-major: by query, then key
        ptr[s, 1:] = total + np.cumsum(np.bincount(qs, minlength=Q))
        keys.append(ks.astype(np.int32))
        total += ks.size
    seq = np.arange(S, dtype=np.int64).reshape(prefix)
    seq = np.ascontiguousarray(np.broadcast_to(seq, lead)).ravel()
    key = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int32)
    return Repeats(seq, ptr, key)


def _no_repeats(planes: int, Q: int) -> Repeats:
    return Repeats(np.full(planes, -1, dtype=np.int64), np.zeros((1, Q + 1), dtype=np.int64), np.zeros(0, dtype=np.int32))


class StatsBuffers(NamedTuple):
    """The fused kernel's outputs for ``P`` planes, laid out so every statistic is contiguous.

    rows         (len(ROW_STATS), P, Q)   the output dtype (float32 or float64)
    col_sum      (P, K)                   the output dtype
    topk_index   (P, Q, k)                int32
    topk_weight  (P, Q, k)                the output dtype
    plane        (len(PLANE_STATS), P)    float64
    peak_key     (P,)                     int32
    flags        (len(FLAGS), P)          bool
    """

    rows: np.ndarray
    col_sum: np.ndarray
    topk_index: np.ndarray
    topk_weight: np.ndarray
    plane: np.ndarray
    peak_key: np.ndarray
    flags: np.ndarray


def empty_buffers(planes: int, Q: int, K: int, k: int, dtype=np.float64) -> StatsBuffers:
    """Uninitialised outputs for ``planes`` planes (the kernel writes every element)."""
    if not 0 <= k <= MAX_TOPK:
        raise ValueError(f"k must be between 0 and {MAX_TOPK}, got {k}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    return StatsBuffers(
        rows=np.empty((len(ROW_STATS), planes, Q), dtype=dtype),
        col_sum=np.empty((planes, K), dtype=dtype),
        topk_index=np.empty((planes, Q, k), dtype=np.int32),
        topk_weight=np.empty((planes, Q, k), dtype=dtype),
        plane=np.empty((len(PLANE_STATS), planes)),
        peak_key=np.empty(planes, dtype=np.int32),
        flags=np.empty((len(FLAGS), planes), dtype=np.bool_),
    )


def _as_planes(a) -> tuple[np.ndarray, tuple[int, ...]]:
    a = np.asarray(a)
    if a.ndim < 2:
        raise ValueError(f"attention must have at least 2 dims (..., Q, K), got shape {a.shape}")
    if a.dtype not in (np.float32, np.float64):
        # float16 (a float16 store) widens exactly to float32; anything else to float64
        a = a.astype(np.float32 if a.dtype == np.float16 else np.float64)
    lead = a.shape[:-2]
    Q, K = a.shape[-2:]
    # C order keeps each row's keys contiguous for the vectorised inner loop;
    # a non-contiguous input is copied once.
    n_planes = int(np.prod(lead, dtype=np.int64))
    planes = np.ascontiguousarray(a).reshape((n_planes, Q, K))
    return planes, lead


def fill(out: StatsBuffers, a, lengths=None, dest=None, *, parallel: bool = True, repeats: Repeats | None = None) -> None:
    """Run the fused kernel on ``a`` (..., Q, K), writing input plane i into output plane ``dest[i]``.

    ``dest`` (None: 0, 1, 2, …) holds distinct plane indices of ``out``, one per plane of
    ``a`` in C order: it lets pieces of a bigger array (e.g. the store chunks of one block)
    write straight into the block's outputs.  ``parallel`` as in :func:`plane_stats`.
    ``repeats`` (from :func:`repeats`, over ``out``'s planes) gives the token ids' repeats for
    ``duplicate_token`` and ``induction``; None: no ids, both NaN.
    """
    planes, lead = _as_planes(a)
    P, Q, K = planes.shape
    P_out = out.peak_key.shape[0]
    if out.rows.shape[2] != Q or out.col_sum.shape[1] != K:
        raise ValueError(f"outputs are for planes of {out.rows.shape[2]}x{out.col_sum.shape[1]}, not {Q}x{K}")
    if dest is None:
        dest = np.arange(P, dtype=np.int64)
    dest = np.asarray(dest, dtype=np.int64).ravel()
    if dest.shape != (P,) or (P and (dest.min() < 0 or dest.max() >= P_out)):
        raise ValueError(f"dest must hold {P} plane indices in [0, {P_out})")
    lens = plane_lengths(lengths, lead, max(Q, K))
    if repeats is None:
        repeats = _no_repeats(P_out, Q)
    if repeats.seq.shape != (P_out,) or repeats.ptr.shape[1] != Q + 1:
        raise ValueError(f"repeats are for {repeats.seq.shape[0]} planes of {repeats.ptr.shape[1] - 1} queries, not {P_out} of {Q}")
    absd = np.abs(np.arange(-(Q - 1), K, dtype=np.float64))
    parallel_for(_stats_planes, P, planes, lens, dest, *repeats, absd, *out, parallel=parallel)


def named(out: StatsBuffers, lead: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The outputs by variable name, shaped ``lead + …`` (views, no copies)."""
    Q, K, k = out.rows.shape[2], out.col_sum.shape[1], out.topk_index.shape[2]
    lead = tuple(lead)
    res = {name: out.rows[i].reshape(lead + (Q,)) for i, name in enumerate(ROW_STATS)}
    res["col_sum"] = out.col_sum.reshape(lead + (K,))
    res["topk_index"] = out.topk_index.reshape(lead + (Q, k))
    res["topk_weight"] = out.topk_weight.reshape(lead + (Q, k))
    plane = {name: out.plane[i].reshape(lead) for i, name in enumerate(PLANE_STATS)}
    for name in ("entropy_mean", "entropy_norm", "self_attention", "diag_share"):
        res[name] = plane.pop(name)
    res["peak_key"] = out.peak_key.reshape(lead)
    res.update(plane)
    res.update({name: out.flags[i].reshape(lead) for i, name in enumerate(FLAGS)})
    return res


def attention_stats(a, k: int = 5, lengths=None, *, parallel: bool = True, dtype=np.float64, ids=None) -> dict[str, np.ndarray]:
    """Every statistic, top-k and flag of every plane of ``a`` (..., Q, K), in one pass.

    Returns arrays by name: ``ROW_STATS`` (..., Q), ``col_sum`` (..., K), ``topk_index``
    int32 and ``topk_weight`` (..., Q, k), ``PLANE_STATS`` float64 and ``peak_key`` int32
    (...), ``FLAGS`` bool (...).  ``dtype`` (float32 or float64) is that of the per-query,
    per-key and top-k weight outputs (they are accumulated in float64 either way).
    ``ids``: token ids (..., Q) whose leading dims broadcast to the planes' (see
    :func:`repeats`), for ``duplicate_token`` and ``induction`` (None: both NaN).
    """
    planes, lead = _as_planes(a)
    P, Q, K = planes.shape
    out = empty_buffers(P, Q, K, int(k), dtype)
    rep = None if ids is None else repeats(ids, lead)
    fill(out, planes, None if lengths is None else plane_lengths(lengths, lead, max(Q, K)), parallel=parallel, repeats=rep)
    return named(out, lead)


def plane_stats(a, lengths=None, *, parallel: bool = True) -> PlaneStats:
    """Row/column sums, entropy, max, diagonal, attention distance and Σ A² per row.

    a:        (..., Q, K) float32 or float64 attention weights.
    lengths:  None or ints whose shape is a prefix of ``a.shape[:-2]``.
    parallel: False runs in the calling thread only (use it inside dask or
              any thread pool, so kernel threads × pool threads never exceed
              the cores).  The same compiled kernel; results are identical.

    Returns a :class:`PlaneStats` of float64 arrays: row statistics
    ``(..., Q)``, ``col_sum`` ``(..., K)``; NaN outside each valid block.
    (The fused kernel without top-k; :func:`attention_stats` gives everything.)
    """
    res = attention_stats(a, 0, lengths, parallel=parallel)
    return PlaneStats(**{name: res[name] for name in PlaneStats._fields})


def topk(a, k: int, lengths=None, *, parallel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest weights of each query row and their key indices.

    Returns ``(index, weight)``: int32 and float64 arrays of shape
    ``(..., Q, k)``, descending by weight, ties to the lower key index.  Rows
    with fewer than ``k`` valid keys are padded with index −1 / weight NaN;
    rows outside the valid block are all −1 / NaN (NaN or −inf weights inside
    it are never selected).  ``k`` must be in [0, 64] (ValueError otherwise);
    ``parallel`` as in :func:`plane_stats`.  The same per-row code as the
    fused kernel, alone.
    """
    k = int(k)
    if not 0 <= k <= MAX_TOPK:
        raise ValueError(f"k must be between 0 and {MAX_TOPK}, got {k}")
    planes, lead = _as_planes(a)
    P, Q, K = planes.shape
    lens = plane_lengths(lengths, lead, max(Q, K))
    index = np.empty((P, Q, k), dtype=np.int32)
    weight = np.empty((P, Q, k), dtype=np.float64)
    parallel_for(_topk_planes, P, planes, lens, index, weight, parallel=parallel)
    return index.reshape(lead + (Q, k)), weight.reshape(lead + (Q, k))
