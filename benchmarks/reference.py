"""The NumPy reference of fastattn's statistics and attention weights, once, for tests and benchmarks.

The formulas (`ROWS`, `col_sum_of`) are ordinary NumPy over the last two axes of any array
of planes. The tests apply them in float64 to each plane's valid block (`row_sum`, …,
`summaries`: obviously right, not fast: loop over planes, slice each plane's valid block,
write into a NaN-filled output); the benchmarks time the same formulas over whole chunks of
float32 planes (`numpy_plane_stats`, `numpy_topk`: a fair NumPy contender, accumulating in
float64). NumPy only: the benchmarks run without the test dependencies. Conventions, as in
the kernels:

- a plane with length L has the valid block A[:min(L, Q), :min(L, K)]; a block
  with no rows or no keys is empty and every output of that plane is NaN;
- ``lengths`` (or None = every plane fully valid) has a shape that is a prefix
  of the leading dims and applies to every plane under that prefix.
"""

from __future__ import annotations

import numpy as np


def plane_length(lengths, index: tuple[int, ...]) -> int | None:
    """Length of the plane at leading ``index`` (None means the whole plane)."""
    if lengths is None:
        return None
    lengths = np.asarray(lengths)
    return int(lengths[index[: lengths.ndim]])


def valid_block(Q: int, K: int, n: int | None) -> tuple[int, int]:
    nq = Q if n is None else min(n, Q)
    nk = K if n is None else min(n, K)
    if nq == 0 or nk == 0:
        return 0, 0
    return nq, nk


def _planes(a, lengths):
    """Yield (leading index, float64 valid block) for every plane of ``a``."""
    a = np.asarray(a)
    Q, K = a.shape[-2:]
    for index in np.ndindex(*a.shape[:-2]):
        nq, nk = valid_block(Q, K, plane_length(lengths, index))
        yield index, a[index][:nq, :nk].astype(np.float64)


def _row_stat(a, lengths, fn):
    """Apply ``fn(block) -> (nq,)`` to each plane; NaN outside the valid rows."""
    a = np.asarray(a)
    out = np.full(a.shape[:-1], np.nan)
    for index, block in _planes(a, lengths):
        if block.size:
            out[index][: block.shape[0]] = fn(block)
    return out


# ---------------------------------------------------------------- the formulas
# Each takes planes `b (..., Q, K)` of any float dtype and sums in float64.


def _entropy_rows(b):
    """−Σ_k b ln b, natural log, 0·ln 0 = 0 (the NaN of 0·ln 0 is replaced), no epsilon."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(b > 0, b * np.log(b), 0)
    return -terms.sum(axis=-1, dtype=np.float64)


def _distance_rows(b):
    """Σ_k b·|q − k|, the mean attention distance."""
    Q, K = b.shape[-2:]
    return (b * np.abs(np.subtract.outer(np.arange(Q), np.arange(K))).astype(b.dtype)).sum(axis=-1, dtype=np.float64)


#: Per-query statistics: planes (..., Q, K) -> (..., Q), float64.
ROWS = {
    "row_sum": lambda b: b.sum(axis=-1, dtype=np.float64),
    "entropy": _entropy_rows,
    "max_weight": lambda b: b.max(axis=-1).astype(np.float64),
    "diag": lambda b: np.diagonal(b, axis1=-2, axis2=-1).astype(np.float64),
    "distance": _distance_rows,
    "sq_sum": lambda b: (b * b).sum(axis=-1, dtype=np.float64),
}


def col_sum_of(b):
    """Σ_q b: the incoming attention of each key, (..., Q, K) -> (..., K), float64."""
    return b.sum(axis=-2, dtype=np.float64)


def topk_of(b, k: int):
    """The `k` largest weights of each row and their keys, (..., Q, k): a stable argsort of −w
    (descending, ties to the lower key index); (int32 index, float64 weight)."""
    order = np.argsort(-b, axis=-1, kind="stable")[..., :k]
    return order.astype(np.int32), np.take_along_axis(b, order, axis=-1).astype(np.float64)


# ---------------------------------------------------------------- per plane, with lengths (the tests)


def row_sum(a, lengths=None):
    return _row_stat(a, lengths, ROWS["row_sum"])


def col_sum(a, lengths=None):
    a = np.asarray(a)
    out = np.full(a.shape[:-2] + a.shape[-1:], np.nan)
    for index, block in _planes(a, lengths):
        if block.size:
            out[index][: block.shape[1]] = col_sum_of(block)
    return out


def entropy(a, lengths=None):
    return _row_stat(a, lengths, ROWS["entropy"])


def max_weight(a, lengths=None):
    return _row_stat(a, lengths, ROWS["max_weight"])


def diag(a, lengths=None):
    a = np.asarray(a)
    if a.shape[-2] != a.shape[-1]:
        return np.full(a.shape[:-1], np.nan)
    return _row_stat(a, lengths, ROWS["diag"])


def distance(a, lengths=None):
    return _row_stat(a, lengths, ROWS["distance"])


def sq_sum(a, lengths=None):
    return _row_stat(a, lengths, ROWS["sq_sum"])


def topk(a, k, lengths=None):
    """(index int32, weight float64) of shape (..., Q, k): stable argsort of −w."""
    a = np.asarray(a)
    Q = a.shape[-2]
    index = np.full(a.shape[:-2] + (Q, k), -1, dtype=np.int32)
    weight = np.full(a.shape[:-2] + (Q, k), np.nan)
    for lead, block in _planes(a, lengths):
        if not block.size:
            continue
        order, top = topk_of(block, k)
        m = order.shape[1]
        index[lead][: block.shape[0], :m] = order
        weight[lead][: block.shape[0], :m] = top
    return index, weight


def plane_summary(block, n: int, square: bool) -> dict:
    """Every per-plane summary and flag of one plane's float64 valid block, plainly.

    ``n`` is the plane's length (clipped to max(Q, K)), ``square`` whether Q == K.  Formulas as
    in fastattn.kernels.stats' docstring: means over the valid queries, NaN where undefined,
    peak_key −1 and every flag False for an empty plane, flags False for lengths ≤ 1.
    """
    out = {name: np.nan for name in PLANE_STATS}
    out["peak_key"] = -1
    out.update({flag: False for flag in FLAGS})
    if not block.size:
        return out
    nq, nk = block.shape
    entropy = ROWS["entropy"](block)
    col = col_sum_of(block)
    rows = ROWS["row_sum"](block)
    distance = ROWS["distance"](block)
    out["entropy_mean"] = entropy.mean()
    out["entropy_norm"] = entropy.mean() / np.log(nk) if nk > 1 else np.nan
    out["peak_key"] = int(np.argmax(col))
    out["peak_incoming"] = col.max()
    out["confidence"] = ROWS["max_weight"](block).mean()
    out["distance_mean"] = distance.mean()
    out["row_sum_error"] = np.abs(rows - 1.0).max()
    out["first_token"] = col[0] / nq
    out["last_token"] = col[nk - 1] / nq
    if square:
        diagonal = np.diagonal(block)
        out["self_attention"] = diagonal.mean()
        with np.errstate(invalid="ignore", divide="ignore"):  # a block of zeros: 0/0 is NaN
            out["diag_share"] = diagonal.sum() / block.sum()
        out["prev_token"] = sum(block[q, q - 1] for q in range(1, n)) / n
        out["next_token"] = sum(block[q, q + 1] for q in range(0, n - 1)) / n
    if n > 1:
        scale = 8.0 / nk  # the uniform weight 1/nk over the seed's 1/8
        share = col.max() / nq
        out["uniform"] = bool(block.std() < 0.01 * scale)
        out["diagonal_only"] = bool(out["diag_share"] > 0.8)
        out["dominant_key"] = bool(share > 3.0 / 8)
        out["weak"] = bool(block.max() < 0.15 * scale)
        out["critical_key"] = bool(share > 1.5 / 8)
        out["strong_self"] = bool(out["self_attention"] > 0.15 * scale)
    return out


PLANE_STATS = (
    "entropy_mean", "entropy_norm", "self_attention", "diag_share", "peak_incoming", "confidence",
    "distance_mean", "row_sum_error", "prev_token", "next_token", "first_token", "last_token",
    "duplicate_token", "induction",  # NaN here: these need token ids (tests/test_induction.py)
)
FLAGS = ("uniform", "diagonal_only", "dominant_key", "weak", "critical_key", "strong_self")


def summaries(a, lengths=None) -> dict:
    """``plane_summary`` of every plane: arrays of the leading shape, by name."""
    a = np.asarray(a)
    Q, K = a.shape[-2:]
    lead = a.shape[:-2]
    out = {name: np.full(lead, np.nan) for name in PLANE_STATS}
    out["peak_key"] = np.full(lead, -1, dtype=np.int32)
    out.update({flag: np.zeros(lead, dtype=bool) for flag in FLAGS})
    for index, block in _planes(a, lengths):
        n = plane_length(lengths, index)
        n = max(Q, K) if n is None else min(n, max(Q, K))
        for name, value in plane_summary(block, n, Q == K).items():
            out[name][index] = value
    return out


STATISTICS = {
    "row_sum": row_sum,
    "col_sum": col_sum,
    "entropy": entropy,
    "max_weight": max_weight,
    "diag": diag,
    "distance": distance,
    "sq_sum": sq_sum,
}


# ---------------------------------------------------------------- whole arrays (the benchmarks)

#: Samples per chunk of `numpy_plane_stats` and `numpy_topk` (~19 MB of MiniLM-sized float32
#: planes), so their temporaries stay small: a stronger contender than whole-array temporaries.
CHUNK = 16


def numpy_plane_stats(a: np.ndarray, chunk: int = CHUNK) -> dict[str, np.ndarray]:
    """Every per-query statistic and `col_sum` of full planes (no lengths), in NumPy over
    chunks of `chunk` samples; logs in the input's precision, sums in float64."""
    out = {name: [] for name in (*ROWS, "col_sum")}
    for i in range(0, a.shape[0], chunk):
        c = a[i : i + chunk]
        for name, formula in ROWS.items():
            out[name].append(formula(c))
        out["col_sum"].append(col_sum_of(c))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def numpy_topk(a: np.ndarray, k: int, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """`topk_of` over chunks of `chunk` samples (int32 index, float64 weight)."""
    parts = [topk_of(a[i : i + chunk], k) for i in range(0, a.shape[0], chunk)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def fill_outside_valid(a, lengths, value=np.nan):
    """A copy of ``a`` with everything outside each plane's valid block set to ``value``."""
    a = np.array(a, copy=True)
    Q, K = a.shape[-2:]
    for index in np.ndindex(*a.shape[:-2]):
        nq, nk = valid_block(Q, K, plane_length(lengths, index))
        plane = a[index]
        plane[nq:, :] = value
        plane[:, nk:] = value
    return a


# ---------------------------------------------------------------- attention


def attention_weights(q, k, scale=None, causal=False, lengths=None):
    """softmax(q·kᵀ·scale) per plane in float64; masked weights 0, fully masked rows 0."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    Q, d = q.shape[-2:]
    K = k.shape[-2]
    if scale is None:
        scale = 1.0 / np.sqrt(d)
    out = np.zeros(q.shape[:-2] + (Q, K))
    for index in np.ndindex(*q.shape[:-2]):
        n = plane_length(lengths, index)
        n = max(Q, K) if n is None else n
        scores = (q[index] @ k[index].T) * scale
        i = np.arange(Q)[:, None]
        j = np.arange(K)[None, :]
        masked = (j >= n) | (i >= n)
        if causal:
            masked |= j > i
        scores = np.where(masked, -np.inf, scores)
        for row in range(Q):
            if np.all(masked[row]):
                continue  # fully masked: stays 0
            s = scores[row]
            e = np.exp(s - s.max())
            out[index][row] = e / e.sum()
    return out


def sdpa(q, k, v, scale=None, causal=False, lengths=None):
    w = attention_weights(q, k, scale=scale, causal=causal, lengths=lengths)
    return w @ np.asarray(v, dtype=np.float64)
