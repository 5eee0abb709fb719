"""Jensen–Shannon divergence between every pair of heads, one sample at a time.

Input ``a`` has shape ``(sample, head, Q, K)`` where ``head`` is the flat index of all
heads of all layers (``layer * heads + head``). ``lengths`` (None or ``(sample,)``
ints) gives each sample's valid block; nothing outside it is read.

For each sample, valid query ``q`` (``q < min(n, Q)``) and pair of heads ``i, j``, the
row distributions over the ``n_k = min(n, K)`` valid keys are first smoothed with a
small uniform part (Clark et al. 2019), so no weight is zero::

    p' = (1 − ε)·p + ε / n_k

    JS(p', r') = ½ KL(p' ‖ m) + ½ KL(r' ‖ m),   m = ½(p' + r')
               = Σ_k [ ½ p' ln p' + ½ r' ln r' − m ln m ]     (natural log, 0 ≤ JS ≤ ln 2)

Each term of the last sum is ≥ 0 (convexity of x ln x), so small divergences keep
their relative precision, and identical rows give exactly 0. The output is the mean
over the valid queries: ``out[s, i, j]`` (symmetric, zero diagonal, NaN for a sample
with no valid query).

Samples are independent: in parallel each thread takes whole samples (``parallel_for``),
each sample's matrix has one writer, results equal ``parallel=False``.
"""

from __future__ import annotations

import numpy as np

from ._jit import ngjit, parallel_for, plane_lengths

try:  # the vectorisable float64 log of the statistics kernel (~1.8x faster here than libm's)
    from .stats import _ln as _log
except ImportError:  # pragma: no cover - the statistics kernel changed; libm is as exact
    _log = np.log

__all__ = ["pairwise_js", "DEFAULT_EPS"]

#: Weight of the uniform distribution mixed into every row before the divergence.
DEFAULT_EPS = 1e-3


@ngjit
def _js_sample(a, s, n, eps, out):
    N = a.shape[1]
    Q = a.shape[2]
    K = a.shape[3]
    nq = min(n, Q)
    nk = min(n, K)
    for i in range(N):
        for j in range(N):
            out[s, i, j] = 0.0 if nq > 0 and nk > 0 else np.nan
    if nq == 0 or nk == 0:
        return
    p = np.empty((N, nk))
    plnp = np.empty((N, nk))
    floor = eps / nk
    keep = 1.0 - eps
    smooth = floor > 0.0
    for q in range(nq):
        for i in range(N):
            for k in range(nk):
                x = keep * np.float64(a[s, i, q, k]) + floor
                p[i, k] = x
                plnp[i, k] = 0.5 * x * _log(x) if x > 0.0 else 0.0
        for i in range(N):
            for j in range(i + 1, N):
                acc = 0.0
                if smooth:  # every m > 0: a branch-free loop
                    for k in range(nk):
                        m = 0.5 * (p[i, k] + p[j, k])
                        acc += plnp[i, k] + plnp[j, k] - m * _log(m)
                else:
                    for k in range(nk):
                        m = 0.5 * (p[i, k] + p[j, k])
                        mlnm = m * _log(m) if m > 0.0 else 0.0
                        acc += plnp[i, k] + plnp[j, k] - mlnm
                out[s, i, j] += acc
    for i in range(N):
        for j in range(i + 1, N):
            v = out[s, i, j] / nq
            out[s, i, j] = v
            out[s, j, i] = v


@ngjit
def _js_samples(lo, hi, a, lens, eps, out):
    for s in range(lo, hi):
        _js_sample(a, s, lens[s], eps, out)


def pairwise_js(a, lengths=None, *, eps: float = DEFAULT_EPS, parallel: bool = True) -> np.ndarray:
    """Mean over valid queries of the JS divergence between every pair of heads.

    a:        (sample, head, Q, K) float32 or float64, heads flattened over layers.
    lengths:  None (whole planes valid) or (sample,) ints.
    eps:      weight of the uniform part mixed into every row, in [0, 1).
    Returns (sample, head, head) float64.
    """
    a = np.asarray(a)
    if a.ndim != 4:
        raise ValueError(f"attention must have dims (sample, head, query, key), got shape {a.shape}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), not {eps}")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    a = np.ascontiguousarray(a)
    S, N, Q, K = a.shape
    lens = plane_lengths(lengths, (S,), max(Q, K))
    out = np.empty((S, N, N))
    parallel_for(_js_samples, S, a, lens, float(eps), out, parallel=parallel)
    return out
