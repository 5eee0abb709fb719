"""Jensen–Shannon divergence between every pair of heads, and its 2-D embeddings (MDS)."""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from ..choices import JS_WEIGHTS, MDS_METHODS, check_choice
from ..errors import FastattnError
from ..kernels import divergence as _divergence
from .common import DEFAULT_EPS, HEAD_DIMS, _attention_and_length, _labels, _whole_samples


def _js_block(attention, lengths, eps, parallel):
    *lead, L, H, Q, K = attention.shape
    flat = attention.reshape((-1, L * H, Q, K))
    out = _divergence.pairwise_js(flat, np.asarray(lengths).reshape(-1), eps=eps, parallel=parallel)
    return out.reshape(tuple(lead) + (L * H, L * H))


def head_similarity(ds: xr.Dataset, eps: float = DEFAULT_EPS, per_batch: bool = False,
                    weight: str = "sample") -> xr.Dataset:
    """Jensen–Shannon divergence between every pair of heads (all layers), lazily.

    Each valid query row is smoothed first, `p' = (1 − ε)·p + ε/n` (n: the sample's
    valid keys), then `JS(p', r') = ½KL(p'‖m) + ½KL(r'‖m)`, `m = ½(p' + r')`, natural log
    (0 ≤ JS ≤ ln 2), and averaged over a sample's valid queries. The corpus average over
    samples is `weight="sample"`: each sample weighs the same; `weight="token"`: each
    sample weighs its number of valid queries, so every query token weighs the same, as in
    Clark et al. 2019 (`head_distances.py` sums the divergence over all tokens of all
    documents). Returns a Dataset with `js (head_a, head_b)` (symmetric, zero diagonal; flat
    head index `layer * heads + head`), the coordinates `a_layer, a_head, b_layer, b_head,
    a_label, b_label` ("L{layer}H{head}"), and `js_batch (batch, head_a, head_b)` (each
    sample's own mean) when `per_batch`.
    """
    check_choice("weight", weight, JS_WEIGHTS)
    attention, length = _attention_and_length(ds)
    attention, lazy = _whole_samples(attention)
    layers, heads = attention.sizes["layer"], attention.sizes["head"]
    n = layers * heads
    per = xr.apply_ufunc(
        _js_block,
        attention,
        length,
        kwargs={"eps": float(eps), "parallel": not lazy},
        input_core_dims=[list(HEAD_DIMS), []],
        output_core_dims=[["head_a", "head_b"]],
        output_dtypes=[np.float64],
        dask="parallelized",
        dask_gufunc_kwargs={"output_sizes": {"head_a": n, "head_b": n}},
    )
    index = np.arange(n)
    coords = {
        "head_a": index,
        "head_b": index,
        "a_layer": ("head_a", index // heads),
        "a_head": ("head_a", index % heads),
        "b_layer": ("head_b", index // heads),
        "b_head": ("head_b", index % heads),
        "a_label": ("head_a", _labels(layers, heads)),
        "b_label": ("head_b", _labels(layers, heads)),
    }
    per = per.assign_coords(coords)
    if weight == "token":  # a sample's weight: its valid queries (0 for an empty one, whose js is NaN)
        tokens = np.minimum(length, attention.sizes["query"]).astype(np.float64)
        out = xr.Dataset({"js": per.weighted(tokens).mean("batch", skipna=True)})
    else:
        out = xr.Dataset({"js": per.mean("batch", skipna=True)})
    if per_batch:
        out["js_batch"] = per
    out.attrs = {"eps": float(eps), "layers": layers, "heads": heads, "log": "natural", "weight": weight}
    return out


def _js_matrix(similarity) -> np.ndarray:
    if isinstance(similarity, xr.Dataset):
        similarity = similarity["js"]
    m = np.asarray(getattr(similarity, "values", similarity), dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"need a square divergence matrix, got shape {m.shape}")
    return m


#: Clark et al. 2019's `sklearn.manifold.MDS` settings (General_Analysis.ipynb), with a fixed seed.
SMACOF_SETTINGS = {"n_init": 5, "max_iter": 1000, "eps": 1e-10, "random_state": 0}


def mds_dissimilarity(similarity, method: str = "classical") -> np.ndarray:
    """The distances each MDS method tries to keep: `sqrt(JS)` for classical MDS (a metric:
    the classical construction needs squared Euclidean-like distances), `JS` itself for
    SMACOF, as Clark et al. 2019 pass the divergences to `sklearn.manifold.MDS`."""
    check_choice("method", method, MDS_METHODS)
    js = _js_matrix(similarity)
    js = np.clip(np.nan_to_num(0.5 * (js + js.T), nan=0.0), 0.0, None)
    return np.sqrt(js) if method == "classical" else js


def _sign_axes(coords: np.ndarray) -> np.ndarray:
    """Each axis signed so that its largest-magnitude coordinate is positive (deterministic)."""
    for c in range(coords.shape[1]):
        if coords.size and coords[np.argmax(np.abs(coords[:, c])), c] < 0:
            coords[:, c] = -coords[:, c]
    return coords


def mds(similarity, dims: int = 2, method: str = "classical") -> np.ndarray:
    """A `(heads, dims)` embedding of the heads whose distances approximate `mds_dissimilarity`.

    `method="classical"` (Torgerson): `B = −½ J D² J` with `D² = JS` (the squared distance
    is JS, the distance `sqrt(JS)`) and `J = I − 11ᵀ/N`; the coordinates are the top `dims`
    eigenvectors of `B` scaled by `sqrt(max(λ, 0))`. Exact and instant, but it fits the
    inner products, not the distances.

    `method="smacof"`: metric MDS by stress majorisation (SMACOF) of the distances `JS`,
    `sklearn.manifold.smacof` with Clark et al. 2019's settings (`SMACOF_SETTINGS`: best of
    5 random starts, up to 1,000 iterations, eps 1e-10) and a fixed seed. It minimises
    the stress directly; needs scikit-learn (`pip install 'fastattn[compat]'`).

    Each axis is signed so that its largest-magnitude coordinate is positive. `stress`
    measures how well either keeps its distances.
    """
    delta = mds_dissimilarity(similarity, method)
    n = delta.shape[0]
    if method == "smacof":
        try:
            from sklearn.manifold import smacof
        except ImportError:
            raise FastattnError(
                "metric MDS (method='smacof') needs scikit-learn: pip install 'fastattn[compat]'"
            ) from None
        if n < 2:
            return np.zeros((n, dims))
        coords, _ = smacof(delta, metric=True, n_components=dims, normalized_stress=False, **SMACOF_SETTINGS)
        return _sign_axes(np.asarray(coords, dtype=np.float64))
    j = np.eye(n) - 1.0 / n
    b = -0.5 * j @ (delta * delta) @ j
    values, vectors = np.linalg.eigh(b)
    order = np.argsort(values)[::-1][:dims]
    coords = _sign_axes(vectors[:, order] * np.sqrt(np.clip(values[order], 0.0, None)))
    if coords.shape[1] < dims:
        coords = np.hstack([coords, np.zeros((n, dims - coords.shape[1]))])
    return coords


def stress(similarity, coords: np.ndarray, method: str = "classical") -> float:
    """Kruskal's stress-1 of an embedding against the distances `method` keeps:
    `sqrt(Σ_{i<j} (‖x_i − x_j‖ − δ_ij)² / Σ_{i<j} δ_ij²)` (0: every distance kept; NaN
    with fewer than two heads or all δ = 0)."""
    delta = mds_dissimilarity(similarity, method)
    x = np.asarray(coords, dtype=np.float64)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    upper = np.triu_indices(len(delta), 1)
    total = float((delta[upper] ** 2).sum())
    return math.sqrt(float(((d - delta)[upper] ** 2).sum()) / total) if total > 0 else math.nan


def similarity_table(similarity: xr.Dataset, coords: np.ndarray | None = None) -> list[dict]:
    """One dict per head: its label, MDS coordinates (`coords`, default the classical
    `mds`), and its nearest other head by JS."""
    js = _js_matrix(similarity)
    layers, heads = similarity.attrs["layers"], similarity.attrs["heads"]
    labels = _labels(layers, heads)
    xy = mds(similarity) if coords is None else np.asarray(coords)
    rows = []
    for i, label in enumerate(labels):
        others = np.where(np.arange(len(labels)) == i, np.inf, js[i])
        j = int(np.argmin(others)) if len(labels) > 1 else i
        rows.append({
            "layer": i // heads, "head": i % heads, "label": label,
            "x": float(xy[i, 0]), "y": float(xy[i, 1]),
            "nearest": labels[j], "nearest_js": float(others[j]) if len(labels) > 1 else None,
            "mean_js": float(np.delete(js[i], i).mean()) if len(labels) > 1 else None,
        })
    return rows
