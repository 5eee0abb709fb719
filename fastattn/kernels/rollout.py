"""Attention rollout (Abnar & Zuidema 2020) of each sample, in float64.

Input ``a`` has shape ``(..., layer, head, Q, K)`` with ``Q == K`` (self-attention);
the leading dims are samples. ``lengths`` (None, or integers whose shape is a prefix of
the leading dims) gives each sample's valid ``n × n`` block; nothing outside it is read.

Per sample and layer ``l``, over the valid block only::

    Ā_l = mean over heads of A_l                 (n × n)
    Â_l = (Ā_l + I) with each row divided by its sum   (= ½Ā_l + ½I when rows sum to 1)
    R_0 = Â_0,   R_l = Â_l · R_{l−1}

``R_l[q, k]`` is how much of the input token ``k`` flows into position ``q`` after layer
``l``; each row of ``R_l`` sums to 1. Outputs:

- ``incoming (..., layer, K)``: ``(1/n) Σ_q R_l[q, k]``, the mean over the valid
  queries of column ``k`` (so it sums to 1 over the keys, whatever the length);
- ``matrix (..., layer, Q, K)``: ``R_l`` itself, only when asked for.

Both are NaN outside the valid block. Samples are independent: in parallel, each thread
takes whole samples (``parallel_for``), each output element has one writer, and the
results are bit-identical to ``parallel=False``.
"""

from __future__ import annotations

import numpy as np

from ._jit import ngjit, parallel_for, plane_lengths

__all__ = ["rollout"]


@ngjit
def _rollout_sample(a, s, n, keep, incoming, matrix):
    L = a.shape[1]
    H = a.shape[2]
    Q = a.shape[3]
    m = min(n, Q)
    for l in range(L):
        for k in range(Q):
            incoming[s, l, k] = np.nan
        if keep:
            for q in range(Q):
                for k in range(Q):
                    matrix[s, l, q, k] = np.nan
    if m == 0:
        return
    hat = np.empty((m, m))
    r = np.empty((m, m))
    t = np.empty((m, m))
    for l in range(L):
        # Ā_l + I, heads summed first (contiguous rows), then renormalised per row.
        for q in range(m):
            for k in range(m):
                hat[q, k] = 0.0
        for h in range(H):
            for q in range(m):
                for k in range(m):
                    hat[q, k] += np.float64(a[s, l, h, q, k])
        for q in range(m):
            total = 0.0
            for k in range(m):
                v = hat[q, k] / H
                if k == q:
                    v += 1.0
                hat[q, k] = v
                total += v
            for k in range(m):
                hat[q, k] /= total
        if l == 0:
            for q in range(m):
                for k in range(m):
                    r[q, k] = hat[q, k]
        else:
            # t = hat · r, rows of r streamed (i-j-k order vectorises the inner loop)
            for q in range(m):
                for k in range(m):
                    t[q, k] = 0.0
                for j in range(m):
                    w = hat[q, j]
                    for k in range(m):
                        t[q, k] += w * r[j, k]
            for q in range(m):
                for k in range(m):
                    r[q, k] = t[q, k]
        for k in range(m):
            incoming[s, l, k] = 0.0
        for q in range(m):
            for k in range(m):
                incoming[s, l, k] += r[q, k]
        for k in range(m):
            incoming[s, l, k] /= m
        if keep:
            for q in range(m):
                for k in range(m):
                    matrix[s, l, q, k] = r[q, k]


@ngjit
def _rollout_samples(lo, hi, a, lens, keep, incoming, matrix):
    for s in range(lo, hi):
        _rollout_sample(a, s, lens[s], keep, incoming, matrix)


def rollout(a, lengths=None, *, keep_matrix: bool = False, parallel: bool = True):
    """Attention rollout of every sample: ``(incoming, matrix)``, float64.

    a:           (..., layer, head, Q, Q) float32 or float64 attention weights.
    lengths:     None (whole planes valid) or ints whose shape is a prefix of the leading dims.
    keep_matrix: also return the rollout matrices ``(..., layer, Q, Q)`` (else None).
    parallel:    False runs in the calling thread only (inside dask or a thread pool).
    """
    a = np.asarray(a)
    if a.ndim < 4:
        raise ValueError(f"attention must have dims (..., layer, head, query, key), got shape {a.shape}")
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"rollout needs self-attention (query == key), got {a.shape[-2]} x {a.shape[-1]}")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    lead = a.shape[:-4]
    L, H, Q, _ = a.shape[-4:]
    n = int(np.prod(lead, dtype=np.int64))
    samples = np.ascontiguousarray(a).reshape((n, L, H, Q, Q))
    lens = plane_lengths(lengths, lead, Q)
    incoming = np.empty((n, L, Q))
    matrix = np.empty((n, L, Q, Q) if keep_matrix else (1, 1, 1, 1))
    if n and L and H:
        parallel_for(_rollout_samples, n, samples, lens, keep_matrix, incoming, matrix, parallel=parallel)
    elif n:
        incoming[:] = np.nan
        matrix[:] = np.nan
    return incoming.reshape(lead + (L, Q)), matrix.reshape(lead + (L, Q, Q)) if keep_matrix else None
