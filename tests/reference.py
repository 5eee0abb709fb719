"""Plain float64 NumPy references for fastattn.kernels.

Written to be obviously right, not fast: loop over planes, slice each plane's
valid block, compute one statistic with ordinary NumPy, write it into a
NaN-filled output.  Conventions, as in the kernels:

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


# ---------------------------------------------------------------- statistics


def row_sum(a, lengths=None):
    return _row_stat(a, lengths, lambda b: b.sum(axis=1))


def col_sum(a, lengths=None):
    a = np.asarray(a)
    out = np.full(a.shape[:-2] + a.shape[-1:], np.nan)
    for index, block in _planes(a, lengths):
        if block.size:
            out[index][: block.shape[1]] = block.sum(axis=0)
    return out


def entropy(a, lengths=None):
    def fn(b):
        safe = np.where(b > 0, b, 1.0)  # 0·log 0 = 0: log(1) = 0 where b == 0
        return -np.sum(np.where(b > 0, b * np.log(safe), 0.0), axis=1)

    return _row_stat(a, lengths, fn)


def max_weight(a, lengths=None):
    return _row_stat(a, lengths, lambda b: b.max(axis=1))


def diag(a, lengths=None):
    a = np.asarray(a)
    if a.shape[-2] != a.shape[-1]:
        return np.full(a.shape[:-1], np.nan)
    return _row_stat(a, lengths, lambda b: np.diagonal(b).copy())


def distance(a, lengths=None):
    def fn(b):
        q = np.arange(b.shape[0])[:, None]
        k = np.arange(b.shape[1])[None, :]
        return np.sum(b * np.abs(q - k), axis=1)

    return _row_stat(a, lengths, fn)


def sq_sum(a, lengths=None):
    return _row_stat(a, lengths, lambda b: np.sum(b * b, axis=1))


def topk(a, k, lengths=None):
    """(index int32, weight float64) of shape (..., Q, k): stable argsort of −w."""
    a = np.asarray(a)
    Q = a.shape[-2]
    index = np.full(a.shape[:-2] + (Q, k), -1, dtype=np.int32)
    weight = np.full(a.shape[:-2] + (Q, k), np.nan)
    for lead, block in _planes(a, lengths):
        if not block.size:
            continue
        order = np.argsort(-block, axis=1, kind="stable")[:, :k]
        m = order.shape[1]
        index[lead][: block.shape[0], :m] = order
        weight[lead][: block.shape[0], :m] = np.take_along_axis(block, order, axis=1)
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
    logs = np.log(np.where(block > 0, block, 1.0))
    entropy = -(block * logs).sum(axis=1)
    col = block.sum(axis=0)
    rows = block.sum(axis=1)
    distance = (block * np.abs(np.arange(nq)[:, None] - np.arange(nk)[None, :])).sum(axis=1)
    out["entropy_mean"] = entropy.mean()
    out["entropy_norm"] = entropy.mean() / np.log(nk) if nk > 1 else np.nan
    out["peak_key"] = int(np.argmax(col))
    out["peak_incoming"] = col.max()
    out["confidence"] = block.max(axis=1).mean()
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
