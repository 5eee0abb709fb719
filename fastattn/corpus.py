"""Corpus-level analyses: rollout, head similarity, comparing stores, head roles, streaming summaries.

Every function takes xarray Datasets (a store from `open_store`, statistics from
`compute_stats`/`open_stats`) or a store path, stays lazy through dask where the data is
large, and never prints. Formulas (natural log throughout) are in docs/corpus.md.

- `rollout(ds, keep_matrix=False)`: attention rollout (Abnar & Zuidema 2020) per sample;
  `write_rollout(store)` / `open_rollout(store)` keep it in the store's `rollout` group.
- `head_similarity(ds, eps=1e-3, weight="sample"|"token")`: Jensen–Shannon divergence
  between every pair of heads, `mds(similarity, method="classical"|"smacof")` a 2-D
  embedding and `stress` its fit, `head_map(similarity, stats)` a figure.
- `compare(a, b, match="position")`: what changed per head between two stores,
  `ranked_changes(cmp)` the heads that changed most, `compare_map(cmp)` a heatmap.
- `head_roles(stats)`: a role per head from per-batch rules (`ROLE_RULES`) on the attention
  mass, with the share of batches supporting it; `batch_roles(stats)` the per-batch labels.
- `corpus_stats(store, entropy_smoothing=1e-4)`: the statistics these analyses read, with
  Clark et al. 2019's smoothed entropy on request (`smoothed_entropy`).
- `streaming_summary(store)`: per-head moments and histograms in one chunked pass,
  with mergeable accumulators (`Moments`, `SummaryAccumulator`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from .errors import FastattnError
from .kernels import divergence as _divergence
from .kernels import rollout as _rollout
from .summary import POSITION_MASS, SINK_SHARE

HEAD_DIMS = ("layer", "head", "query", "key")
DEFAULT_EPS = _divergence.DEFAULT_EPS
LN2 = math.log(2.0)


def _attention_and_length(ds: xr.Dataset | xr.DataArray):
    attention = ds if isinstance(ds, xr.DataArray) else ds["attention"]
    length = ds["length"] if isinstance(ds, xr.Dataset) and "length" in ds else None
    if length is None:
        full = max(attention.sizes["query"], attention.sizes["key"])
        length = xr.DataArray(np.full(attention.sizes["batch"], full, dtype=np.int64), dims="batch")
    return attention, length.astype(np.int64)


def _whole_samples(attention: xr.DataArray) -> tuple[xr.DataArray, bool]:
    """Every layer, head, query and key of a sample in one chunk (kernels need whole samples)."""
    lazy = attention.chunks is not None
    if lazy:
        attention = attention.chunk({d: -1 for d in HEAD_DIMS})
    return attention, lazy


def _labels(layers: int, heads: int) -> list[str]:
    return [f"L{layer}H{head}" for layer in range(layers) for head in range(heads)]


# ---------------------------------------------------------------- rollout


def _rollout_block(attention, lengths, keep, parallel):
    incoming, matrix = _rollout.rollout(attention, lengths, keep_matrix=keep, parallel=parallel)
    return (incoming, matrix) if keep else incoming


def rollout(ds: xr.Dataset, keep_matrix: bool = False) -> xr.Dataset:
    """Attention rollout of every sample, lazily (one kernel call per dask chunk).

    Per sample, over its valid `n × n` block: `Â_l = (mean_h A_l + I)` with rows
    renormalised, `R_0 = Â_0`, `R_l = Â_l · R_{l−1}`. Returns a Dataset with

    - `rollout_incoming (batch, layer, key)`: the mean over the valid queries of each
      column of `R_l`, `(1/n) Σ_q R_l[q, k]` (sums to 1 over the keys);
    - `rollout (batch, layer, query, key)`: `R_l` itself, when `keep_matrix`;
    - `length (batch)`.

    float64, NaN outside each sample's valid block. Needs self-attention (query == key).
    """
    attention, length = _attention_and_length(ds)
    if attention.sizes["query"] != attention.sizes["key"]:
        raise FastattnError("rollout needs self-attention: this store holds cross-attention (query != key)")
    attention, lazy = _whole_samples(attention)
    out_dims = [["layer", "key"]] + ([["layer", "query", "key"]] if keep_matrix else [])
    result = xr.apply_ufunc(
        _rollout_block,
        attention,
        length,
        kwargs={"keep": keep_matrix, "parallel": not lazy},
        input_core_dims=[list(HEAD_DIMS), []],
        output_core_dims=out_dims,
        output_dtypes=[np.float64] * len(out_dims),
        dask="parallelized",
    )
    out = xr.Dataset()
    if keep_matrix:
        out["rollout_incoming"], out["rollout"] = result
    else:
        out["rollout_incoming"] = result
    out["length"] = length.astype(np.int32)
    out.attrs = {"method": "rollout (Abnar & Zuidema 2020): heads averaged, residual added, rows renormalised"}
    return out


def write_rollout(location, *, keep_matrix: bool = False, jobs: int | None = None,
                  storage_options: dict | None = None) -> dict:
    """Compute the rollout of every committed batch and write it to the store's `rollout` group.

    The group is rewritten whole (`rollout_incoming` float64, `rollout` float32 with
    `keep_matrix`), under the store's lock; its commit record (`store.schema.ROLLOUT`: the
    attribute `fastattn_rollout` with batches and keep_matrix) is written last, so
    `open_rollout` never reads a half-written group. Returns `{"batches": n, "keep_matrix": bool}`.
    """
    import dask

    from . import store

    spec = store.schema.ROLLOUT
    loc = store.as_location(location, storage_options)
    store.check_store(loc)  # before the lock, which would create a missing store's folder
    with store.writing_derived(loc, spec) as manifest:
        r = rollout(store.open_store(loc), keep_matrix=keep_matrix)
        if keep_matrix:
            r["rollout"] = r["rollout"].astype(np.float32)
        for var in r.variables.values():
            var.encoding = {}
        with dask.config.set(scheduler="threads", num_workers=jobs):
            r.to_zarr(loc.zarr_store(), group=spec.name, mode="w", consolidated=False)
        store.commit_derived(loc, manifest, spec, manifest.committed, keep_matrix=keep_matrix)
    return {"batches": manifest.committed, "keep_matrix": keep_matrix}


def open_rollout(location, *, storage_options: dict | None = None) -> xr.Dataset:
    """The rollout written by `write_rollout` (lazily); a StoreError if there is none or it is stale."""
    from . import store

    return store.open_derived(store.as_location(location, storage_options), store.schema.ROLLOUT)


def rollout_summary(r: xr.Dataset) -> list[dict]:
    """Per layer, the mean over samples of the rollout share of the first key ([CLS]), of
    the last valid key ([SEP]) and of the rest, and the key most often receiving the most.
    Reduced lazily (one pass), so it works on a rollout of any size."""
    import dask

    incoming = r["rollout_incoming"]
    length = r["length"].astype(np.int64)
    valid = length > 0
    key = xr.DataArray(np.arange(incoming.sizes["key"]), dims="key")
    first = incoming.isel(key=0, drop=True)
    last = xr.where((key == length - 1) & (length > 1), incoming, 0.0).sum("key")
    top = incoming.fillna(-np.inf).argmax("key")
    counts = (top == xr.DataArray(np.arange(incoming.sizes["key"]), dims="top")).where(valid, False).sum("batch")
    first, last, counts, samples = dask.compute(
        first.where(valid).mean("batch"), last.where(valid).mean("batch"), counts.transpose("layer", "top"), valid.sum()
    )
    samples = int(samples)
    rows = []
    for layer in range(incoming.sizes["layer"]):
        c = np.asarray(counts.values[layer])
        f = float(first.values[layer]) if samples else None
        t = float(last.values[layer]) if samples else None
        rows.append({
            "layer": layer,
            "first_key": f,
            "last_key": t,
            "other_keys": (1.0 - f - t) if samples else None,
            "top_key": int(np.argmax(c)),
            "top_key_share": float(c.max() / samples) if samples else 0.0,
            "samples": samples,
        })
    return rows


# ---------------------------------------------------------------- head similarity


def _js_block(attention, lengths, eps, parallel):
    *lead, L, H, Q, K = attention.shape
    flat = attention.reshape((-1, L * H, Q, K))
    out = _divergence.pairwise_js(flat, np.asarray(lengths).reshape(-1), eps=eps, parallel=parallel)
    return out.reshape(tuple(lead) + (L * H, L * H))


JS_WEIGHTS = ("sample", "token")


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
    if weight not in JS_WEIGHTS:
        raise FastattnError(f"weight must be one of {', '.join(JS_WEIGHTS)}, not '{weight}'")
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


MDS_METHODS = ("classical", "smacof")
#: Clark et al. 2019's `sklearn.manifold.MDS` settings (General_Analysis.ipynb), with a fixed seed.
SMACOF_SETTINGS = {"n_init": 5, "max_iter": 1000, "eps": 1e-10, "random_state": 0}


def _check_mds_method(method: str) -> None:
    if method not in MDS_METHODS:
        raise FastattnError(f"method must be one of {', '.join(MDS_METHODS)}, not '{method}'")


def mds_dissimilarity(similarity, method: str = "classical") -> np.ndarray:
    """The distances each MDS method tries to keep: `sqrt(JS)` for classical MDS (a metric:
    the classical construction needs squared Euclidean-like distances), `JS` itself for
    SMACOF, as Clark et al. 2019 pass the divergences to `sklearn.manifold.MDS`."""
    _check_mds_method(method)
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


def _mean_entropy(stats, layers: int, heads: int) -> np.ndarray | None:
    if stats is None:
        return None
    if isinstance(stats, xr.Dataset):
        if "entropy_mean" not in stats:
            return None
        values = stats["entropy_mean"]
        if "batch" in values.dims:
            values = values.mean("batch")
        values = values.transpose("layer", "head").values
    else:
        values = stats
    values = np.asarray(values, dtype=np.float64)
    return values.reshape(layers * heads) if values.size == layers * heads else None


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


def head_map(similarity: xr.Dataset, stats: xr.Dataset | None = None, *, labels: bool = True,
             method: str = "classical", coords: np.ndarray | None = None):
    """Scatter of the heads' MDS embedding (`coords`, else `mds(similarity, method=method)`):
    colour = layer (colour bar), marker size = mean entropy over the corpus (when `stats` has
    `entropy_mean`), each labelled "L{layer}H{head}"; the title gives the method and its
    stress. Returns a matplotlib Figure (never shown)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm

    from .plot import new_figure

    layers, heads = similarity.attrs["layers"], similarity.attrs["heads"]
    xy = mds(similarity, method=method) if coords is None else np.asarray(coords, dtype=np.float64)
    what = "classical MDS of sqrt JS" if method == "classical" else "metric MDS (SMACOF) of JS"
    entropy = _mean_entropy(stats, layers, heads)
    if entropy is not None and np.isfinite(entropy).any():
        top = np.nanmax(entropy) or 1.0
        sizes = 20.0 + 220.0 * np.nan_to_num(entropy / top, nan=0.0)
    else:
        sizes = np.full(layers * heads, 60.0)
    layer_of = np.arange(layers * heads) // heads
    cmap = colormaps["viridis"].resampled(max(layers, 1))
    norm = BoundaryNorm(np.arange(layers + 1) - 0.5, cmap.N)
    fig = new_figure((8.5, 7.0))
    ax = fig.subplots()
    ax.scatter(xy[:, 0], xy[:, 1], c=layer_of, cmap=cmap, norm=norm, s=sizes, alpha=0.8, edgecolors="black", linewidths=0.4)
    if labels:
        for i, label in enumerate(_labels(layers, heads)):
            ax.annotate(label, xy[i], fontsize=6.5, xytext=(3, 3), textcoords="offset points")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, ticks=np.arange(layers))
    bar.set_label("Layer")
    ax.set_xlabel("MDS 1")
    ax.set_ylabel("MDS 2")
    size_note = "marker size: mean entropy" if entropy is not None else "marker size: constant (no statistics)"
    ax.set_title(
        f"Heads by Jensen–Shannon divergence ({what}, stress-1 {stress(similarity, xy, method):.3f},"
        f" ε = {similarity.attrs.get('eps', DEFAULT_EPS):g})\n"
        f"colour: layer; {size_note}",
        fontsize=10,
    )
    ax.set_aspect("equal", adjustable="datalim")
    return fig


# ---------------------------------------------------------------- statistics of a store


def _entropy_block(attention, lengths, smoothing):
    a = np.asarray(attention, dtype=np.float64)
    Q, K = a.shape[-2:]
    n = np.broadcast_to(np.asarray(lengths, dtype=np.int64), a.shape[:-2])
    nq, nk = np.minimum(n, Q), np.minimum(n, K)
    valid = (np.arange(Q)[:, None] < nq[..., None, None]) & (np.arange(K) < nk[..., None, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(valid, (1.0 - smoothing) * a + smoothing / np.maximum(nk, 1)[..., None, None], 1.0)
        h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1).sum(-1)  # 1·ln 1 = 0 outside
        mean = np.where(nq > 0, h / np.maximum(nq, 1), np.nan)
        norm = np.where(nk > 1, mean / np.log(np.maximum(nk, 2)), np.nan)
    return mean, norm


def smoothed_entropy(ds: xr.Dataset, smoothing: float) -> xr.Dataset:
    """`entropy_mean` and `entropy_norm` (batch, layer, head) of every plane after mixing a
    little uniform attention into each valid row, lazily from the attention:

    `p' = (1 − s)·p + s/n`, `entropy_mean = (1/n) Σ_q −Σ_k p'[q,k] ln p'[q,k]`,
    `entropy_norm = entropy_mean / ln n` (n: the sample's valid length). Clark et al. 2019
    use s = 1e-4 (`0.9999·A + 1e-4/n`, "to avoid NaNs"); a one-hot row gains about
    `s·(1 + ln(n/s))` nats (0.0013 at n = 32), tens of percent of a near-one-hot head's
    entropy. s = 0 gives the exact entropy of the statistics (0·ln 0 = 0). Reads every
    attention weight.
    """
    if not 0.0 <= smoothing < 1.0:
        raise FastattnError(f"entropy_smoothing must be in [0, 1), not {smoothing}")
    attention, length = _attention_and_length(ds)
    if attention.chunks is not None:
        attention = attention.chunk({"query": -1, "key": -1})
    mean, norm = xr.apply_ufunc(
        _entropy_block,
        attention,
        length,
        kwargs={"smoothing": float(smoothing)},
        input_core_dims=[["query", "key"], []],
        output_core_dims=[[], []],
        output_dtypes=[np.float64, np.float64],
        dask="parallelized",
    )
    out = xr.Dataset({"entropy_mean": mean, "entropy_norm": norm}).transpose("batch", "layer", "head")
    out.attrs = {"entropy_smoothing": float(smoothing)}
    return out


def corpus_stats(source, *, k: int = 5, entropy_smoothing: float = 0.0) -> xr.Dataset:
    """The per-plane statistics of a store path or Dataset, with `source`/`source_index`
    when known: a store's committed `stats` group when it covers every batch, else
    computed lazily (nothing is written). A Dataset that already holds statistics is
    returned as it is.

    `entropy_smoothing` s > 0 replaces `entropy_mean` and `entropy_norm` by those of the
    smoothed rows (`smoothed_entropy`, Clark et al. 2019: s = 1e-4), computed from the
    attention, so it needs a store or a Dataset with `attention`; every analysis that
    reads entropy from these statistics (roles, compare, the head map, summaries) then
    reports Clark's entropy. `attrs["entropy_smoothing"]` records s.
    """
    from . import store
    from .stats import compute_stats

    if not 0.0 <= entropy_smoothing < 1.0:
        raise FastattnError(f"entropy_smoothing must be in [0, 1), not {entropy_smoothing}")
    if isinstance(source, xr.Dataset) and "entropy_mean" in source:
        if not entropy_smoothing:
            return source
        if "attention" not in source:
            raise FastattnError("entropy_smoothing needs the attention: pass the store, not its statistics")
        ds, st = source, source
    elif isinstance(source, (str, os.PathLike, store.Location)):
        loc = store.as_location(source)
        manifest = store.require_batches(loc, store.check_store(loc))
        if entropy_smoothing:
            store.require_maps(loc, manifest)  # smoothed entropy is computed from the maps
        ds = store.open_store(loc, attention=not manifest.stats_only)
        if manifest.stats_committed == manifest.committed and manifest.committed:
            from .stats import open_stats

            st = open_stats(loc)
        else:
            st = compute_stats(ds, k=k)
    elif isinstance(source, xr.Dataset):
        ds = source
        if not ds.sizes.get("batch", 1):
            raise FastattnError(f"{ds.attrs.get('store', 'the dataset')}: no batches to analyse")
        st = compute_stats(ds, k=k)
    else:
        raise TypeError(f"need a store path or an xarray Dataset, not {type(source).__name__}")
    extra = {name: ds[name] for name in ("source", "source_index", "length") if name in ds and name not in st}
    st = st.assign(extra) if extra else st
    if entropy_smoothing:
        smoothed = smoothed_entropy(ds, entropy_smoothing)
        st = st.assign(entropy_mean=smoothed["entropy_mean"], entropy_norm=smoothed["entropy_norm"])
    st.attrs.setdefault("store", ds.attrs.get("store"))
    st.attrs["entropy_smoothing"] = float(entropy_smoothing)
    return st


# ---------------------------------------------------------------- comparing two stores

COMPARE_MATCHES = ("position", "source")


def match_batches(a: xr.Dataset, b: xr.Dataset, match: str = "position") -> tuple[np.ndarray, np.ndarray]:
    """Indices `(ia, ib)` of the batches paired between `a` and `b`.

    "position": the common prefix, batch i with batch i. "source": equal `(source,
    source_index)` (the same sample of the same dump file), in `a`'s order.
    """
    if match == "position":
        n = min(a.sizes["batch"], b.sizes["batch"])
        return np.arange(n), np.arange(n)
    if match == "source":
        for name, ds in (("first", a), ("second", b)):
            if "source" not in ds or "source_index" not in ds:
                raise FastattnError(f"'source': the {name} dataset has no source/source_index", parameter="match")
        key_b: dict = {}
        for i, key in enumerate(zip(np.asarray(b["source"].values).tolist(), np.asarray(b["source_index"].values).tolist())):
            key_b.setdefault(key, i)
        pairs = []
        seen = set()
        for i, key in enumerate(zip(np.asarray(a["source"].values).tolist(), np.asarray(a["source_index"].values).tolist())):
            if key in key_b and key not in seen:
                seen.add(key)
                pairs.append((i, key_b[key]))
        ia = np.array([p[0] for p in pairs], dtype=np.int64)
        ib = np.array([p[1] for p in pairs], dtype=np.int64)
        return ia, ib
    raise FastattnError(f"match must be one of {', '.join(COMPARE_MATCHES)}, not '{match}'")


def js_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """JS divergence (natural log) of distributions along `axis`; 0·ln 0 = 0, no smoothing."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        tp = np.where(p > 0, p * np.log(p / np.where(m > 0, m, 1.0)), 0.0)
        tq = np.where(q > 0, q * np.log(q / np.where(m > 0, m, 1.0)), 0.0)
    return 0.5 * (tp.sum(axis) + tq.sum(axis))


def _normalise(x: np.ndarray, axis: int = -1) -> np.ndarray:
    total = x.sum(axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, x / np.where(total > 0, total, 1.0), 0.0)


def compare_stats(sa: xr.Dataset, sb: xr.Dataset) -> xr.Dataset:
    """The numeric core of `compare`: statistics of matched batches (same batch count, batch
    i of `sa` paired with batch i of `sb`) → per (layer, head) changes; see `compare`."""
    if sa.sizes["batch"] != sb.sizes["batch"]:
        raise ValueError("compare_stats needs matched batches (the same count on both sides)")
    if (sa.sizes["layer"], sa.sizes["head"]) != (sb.sizes["layer"], sb.sizes["head"]):
        raise FastattnError(
            f"the stores have different shapes: {sa.sizes['layer']}x{sa.sizes['head']}"
            f" and {sb.sizes['layer']}x{sb.sizes['head']} (layers x heads)"
        )
    n = sa.sizes["batch"]
    keys = max(sa.sizes["key"], sb.sizes["key"])
    out = xr.Dataset(coords={"layer": np.arange(sa.sizes["layer"]), "head": np.arange(sa.sizes["head"])})

    names = ["entropy_mean", "entropy_norm", "self_attention"]

    def reductions(st):  # lazy: both stores are reduced in one dask pass
        red = st[names].mean("batch", skipna=True)
        red["peak_counts"] = (st["peak_key"] == xr.DataArray(np.arange(keys), dims="peak")).sum("batch")
        red["incoming"] = st["col_sum"].fillna(0.0).astype(np.float64).sum("batch")
        return red.transpose("layer", "head", ...)

    import dask

    ra, rb = dask.compute(reductions(sa), reductions(sb))

    def parts(red):
        means = {name: np.asarray(red[name].values, dtype=np.float64) for name in names}
        total = np.asarray(red["incoming"].values)
        padded = np.zeros(total.shape[:2] + (keys,))
        padded[..., : total.shape[-1]] = total
        peaks = _normalise(np.asarray(red["peak_counts"].values, dtype=np.float64))
        return means, peaks, _normalise(padded)

    (ma, ha, ia), (mb, hb, ib) = parts(ra), parts(rb)
    dims = ("layer", "head")
    out["entropy_a"] = dims, ma["entropy_mean"]
    out["entropy_b"] = dims, mb["entropy_mean"]
    out["d_entropy"] = dims, mb["entropy_mean"] - ma["entropy_mean"]
    out["d_entropy_norm"] = dims, mb["entropy_norm"] - ma["entropy_norm"]
    out["self_a"] = dims, ma["self_attention"]
    out["self_b"] = dims, mb["self_attention"]
    out["d_self"] = dims, mb["self_attention"] - ma["self_attention"]
    out["peak_tv"] = dims, 0.5 * np.abs(ha - hb).sum(-1)
    out["incoming_js"] = dims, js_divergence(ia, ib)
    score = (
        np.nan_to_num(np.abs(out["d_entropy_norm"].values))
        + np.nan_to_num(np.abs(out["d_self"].values))
        + out["peak_tv"].values
        + out["incoming_js"].values / LN2
    )
    out["score"] = dims, score
    out.attrs = {"batches": n}
    return out


def compare(a, b, match: str = "position", *, entropy_smoothing: float = 0.0) -> xr.Dataset:
    """What changed per (layer, head) from store `a` to store `b` (paths or Datasets).

    Batches are paired by `match_batches` ("position" or "source"). Over the matched
    batches, per (layer, head):

    - `d_entropy` = mean entropy(b) − mean entropy(a) (nats; also `d_entropy_norm`);
    - `d_self` = mean self-attention(b) − (a);
    - `peak_tv` = total variation ½Σ_k |h_a(k) − h_b(k)| between the histograms of the
      peak key (the key with the most incoming attention) over the batches;
    - `incoming_js` = JS divergence (natural log) between the mean incoming attention
      `Σ_batches col_sum` normalised to sum to 1 (keys past a sample's length count 0);
    - `score` = |d_entropy_norm| + |d_self| + peak_tv + incoming_js / ln 2: four terms
      each in [0, 1], so 0 ≤ score ≤ 4; `ranked_changes` sorts by it.

    `entropy_smoothing` > 0: the entropies are Clark et al. 2019's, of smoothed rows
    (`corpus_stats`).
    """
    sa = corpus_stats(a, entropy_smoothing=entropy_smoothing)
    sb = corpus_stats(b, entropy_smoothing=entropy_smoothing)
    ia, ib = match_batches(sa, sb, match)
    if len(ia) == 0:
        raise FastattnError(f"no batches match between the two stores (match={match})")
    keep = [v for v in ("entropy_mean", "entropy_norm", "self_attention", "peak_key", "col_sum") if v in sa]
    ma = sa[keep].isel(batch=ia).assign_coords(batch=np.arange(len(ia)))
    mb = sb[keep].isel(batch=ib).assign_coords(batch=np.arange(len(ib)))
    out = compare_stats(ma, mb)
    out.attrs.update({
        "match": match,
        "batches_a": int(sa.sizes["batch"]),
        "batches_b": int(sb.sizes["batch"]),
        "a": str(sa.attrs.get("store") or ""),
        "b": str(sb.attrs.get("store") or ""),
        "entropy_smoothing": float(entropy_smoothing),
    })
    return out


CHANGE_FIELDS = ("d_entropy", "d_entropy_norm", "d_self", "peak_tv", "incoming_js", "score")


def ranked_changes(cmp: xr.Dataset, top: int | None = None) -> list[dict]:
    """The heads by descending `score` (ties: by layer, then head), as plain dicts."""
    rows = []
    for layer in range(cmp.sizes["layer"]):
        for head in range(cmp.sizes["head"]):
            row = {"layer": layer, "head": head, "label": f"L{layer}H{head}"}
            for name in ("entropy_a", "entropy_b", "self_a", "self_b", *CHANGE_FIELDS):
                value = float(cmp[name].values[layer, head])
                row[name] = None if math.isnan(value) else value
            rows.append(row)
    rows.sort(key=lambda r: (-(r["score"] or 0.0), r["layer"], r["head"]))
    return rows[:top] if top is not None else rows


def compare_map(cmp: xr.Dataset, value: str = "score"):
    """Layer × head heatmap of one change (default `score`), each cell annotated."""
    from .plot import new_figure

    data = np.asarray(cmp[value].transpose("layer", "head").values, dtype=np.float64)
    layers, heads = data.shape
    signed = value.startswith("d_")
    fig = new_figure((min(22.0, max(8.0, 0.6 * heads + 4)), min(16.0, max(3.0, 0.5 * layers + 2))))
    ax = fig.subplots()
    if signed:
        bound = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 0.0
        bound = bound or 1.0
        image = ax.imshow(data, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    else:
        top = float(np.nanmax(data)) if np.isfinite(data).any() else 0.0
        image = ax.imshow(data, cmap="magma_r", vmin=0.0, vmax=top or 1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=value)
    ax.set_xticks(np.arange(heads))
    ax.set_yticks(np.arange(layers))
    ax.set_xlabel("Head")
    ax.set_ylabel("Layer")
    if layers * heads <= 400:
        for layer in range(layers):
            for head in range(heads):
                ax.text(head, layer, f"{data[layer, head]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(
        f"Change per head ({value}) over {cmp.attrs.get('batches', '?')} matched batches"
        f" (match: {cmp.attrs.get('match', '?')})",
        fontsize=10,
    )
    return fig


# ---------------------------------------------------------------- head roles

#: Per-batch rules, in priority order: a batch's label is the first rule that holds.
ROLE_RULES = (
    "previous-token",  # attention mass on key q − 1: prev_token = Σ_{q≥1} A[q,q−1] / n ≥ POSITION_MASS
    "next-token",      # next_token = Σ_{q≤n−2} A[q,q+1] / n ≥ POSITION_MASS
    "self",            # self_attention = Σ_q A[q,q] / n ≥ POSITION_MASS
    "first-token",     # key 0 receives at least SINK_SHARE of all attention (first_token = col_sum[0] / n)
    "last-token",      # key n − 1 receives at least SINK_SHARE of all attention (last_token)
    "single-key",      # some other key receives at least SINK_SHARE of all attention (peak_incoming / n)
    "local",           # mean attention distance ≤ min(LOCAL_DISTANCE, n / 8) tokens
    "broad",           # normalised entropy ≥ BROAD_ENTROPY
)
ROLES = ROLE_RULES + ("mixed",)
#: POSITION_MASS: share of all attention on the previous / next / same position that makes a
#: positional head: Clark et al. 2019's POSITION_THRESHOLD. Each row gives at most 1 to the
#: three together, so at most one of the three rules holds above 0.5; a perfect previous-token
#: head of length n scores (n − 1)/n, 0.75 at MIN_LENGTH. SINK_SHARE: share on one key.
#: Both are imported from `fastattn.summary`, whose findings (`fastattn stats`) test the same.
LOCAL_DISTANCE = 2.0
BROAD_ENTROPY = 0.85
#: A head gets a role when that label holds in at least this share of its batches.
ROLE_SHARE = 0.5
#: Samples shorter than this are not classified (every rule is trivial there).
MIN_LENGTH = 4

#: The attention-mass scores the positional and key rules test (statistics of the fused pass).
MASS_EVIDENCE = ("prev_token", "next_token", "self_attention", "first_token", "last_token")
#: Shares of the valid queries whose top key (argmax) is q − 1, q + 1, q: Voita et al.
#: 2019's positional evidence, reported beside the mass, not tested by the rules.
ARGMAX_EVIDENCE = ("prev_argmax", "next_argmax", "self_argmax")
EVIDENCE = (*MASS_EVIDENCE, "peak", *ARGMAX_EVIDENCE, "distance", "entropy")
ROLE_INPUTS = ("topk_index", *MASS_EVIDENCE, "peak_incoming", "distance_mean", "entropy_norm")


def evidence_arrays(top, planes, length=None) -> dict:
    """The numbers the role rules test, and the argmax shares, from plain arrays (see
    `role_evidence`).

    top (batch, layer, head, query): top key per query (−1 outside the valid rows);
    planes: a mapping with the per-plane statistics `ROLE_INPUTS[1:]`, each (batch, layer,
    head); length (batch,) or None (then each plane's count of valid rows). Returns
    float64 arrays of (batch, layer, head), and `length` as int64.
    """
    top = np.asarray(top)
    valid = top >= 0
    shape = top.shape[:3]
    if length is None:
        n = valid.sum(axis=-1).astype(np.int64)
    else:
        n = np.broadcast_to(np.asarray(length, dtype=np.int64).reshape((-1, 1, 1)), shape).copy()
    q = np.arange(top.shape[-1])

    def share(hit, among):
        count = among.sum(axis=-1)
        return np.where(count > 0, (hit & among).sum(axis=-1) / np.maximum(count, 1), np.nan)

    def plane(name):
        return np.asarray(planes[name], dtype=np.float64)

    out = {name: plane(name) for name in MASS_EVIDENCE}
    out["peak"] = plane("peak_incoming") / np.where(n > 0, n, np.nan)
    out["prev_argmax"] = share(top == q - 1, valid & (q >= 1))
    out["next_argmax"] = share(top == q + 1, valid & (q <= n[..., None] - 2))
    out["self_argmax"] = share(top == q, valid)
    out["distance"] = plane("distance_mean")
    out["entropy"] = plane("entropy_norm")
    out["length"] = n
    return out


def _evidence_blocks(stats: xr.Dataset, batch_chunk: int | None = None):
    """Yield the evidence (dict of numpy arrays) of consecutive blocks of batches; each
    block of statistics is loaded (or computed) once, then reduced with NumPy."""
    names = list(ROLE_INPUTS) + (["length"] if "length" in stats else [])
    view = stats[names].transpose("batch", "layer", "head", ...)
    n = stats.sizes["batch"]
    step = _batch_step(stats, names, batch_chunk)
    for start in range(0, n, step):
        block = view.isel(batch=slice(start, min(n, start + step))).compute()
        yield evidence_arrays(
            block["topk_index"].isel(rank=0).transpose("batch", "layer", "head", "query").values,
            {name: block[name].values for name in ROLE_INPUTS[1:]},
            block["length"].values if "length" in block else None,
        )


def role_evidence(stats: xr.Dataset, *, batch_chunk: int | None = None) -> xr.Dataset:
    """Per (batch, layer, head), in memory: the numbers the role rules test, and more.

    From the statistics only (never the attention): the attention mass `prev_token,
    next_token, self_attention` (share of all attention on key q − 1 / q + 1 / q, as in
    Clark et al. 2019 and TransformerLens), `first_token, last_token, peak` (share on key 0
    / key n − 1 / the most attended key), `distance` = `distance_mean`, `entropy` =
    `entropy_norm`; beside them the argmax evidence `prev_argmax, next_argmax,
    self_argmax` (share of the valid queries whose top key, `topk_index` rank 0, is q − 1
    among q ≥ 1 / q + 1 among q ≤ n − 2 / q); `length`. Computed a block of batches at a
    time.
    """
    parts = list(_evidence_blocks(stats, batch_chunk))
    dims = ("batch", "layer", "head")
    if not parts:
        shape = (0, stats.sizes["layer"], stats.sizes["head"])
        return xr.Dataset({name: (dims, np.zeros(shape)) for name in (*EVIDENCE, "length")})
    return xr.Dataset({name: (dims, np.concatenate([p[name] for p in parts])) for name in parts[0]})


def _rule_holds(ev: dict) -> dict:
    """Per-batch truth of every rule (numpy arrays of the evidence → booleans)."""
    n = ev["length"]
    with np.errstate(invalid="ignore"):  # NaN (cross-attention, empty planes) holds no rule
        return {
            "previous-token": ev["prev_token"] >= POSITION_MASS,
            "next-token": ev["next_token"] >= POSITION_MASS,
            "self": ev["self_attention"] >= POSITION_MASS,
            "first-token": ev["first_token"] >= SINK_SHARE,
            "last-token": ev["last_token"] >= SINK_SHARE,
            "single-key": ev["peak"] >= SINK_SHARE,
            "local": ev["distance"] <= np.minimum(LOCAL_DISTANCE, n / 8.0),
            "broad": ev["entropy"] >= BROAD_ENTROPY,
        }


#: Bytes of statistics one block of a chunked pass may load (a whole number of stored chunks).
BLOCK_BYTES = 32 << 20


def _batch_step(stats: xr.Dataset, names, batch_chunk: int | None) -> int:
    """Batches per block: `batch_chunk` when given, else as many whole stored chunks (along
    batch) as fit in BLOCK_BYTES of the variables `names` (at least one chunk)."""
    if batch_chunk is not None:
        return max(1, int(batch_chunk))
    names = [names] if isinstance(names, str) else list(names)
    per_batch = sum(stats[v].dtype.itemsize * stats[v].size // max(1, stats.sizes["batch"]) for v in names)
    chunks = stats[names[0]].chunks
    chunk = int(max(chunks[stats[names[0]].dims.index("batch")])) if chunks else 1
    return max(chunk, chunk * (BLOCK_BYTES // max(1, per_batch * chunk)))


def _role_blocks(stats: xr.Dataset, batch_chunk: int | None = None):
    """Yield `(evidence arrays, labels)` for consecutive blocks of batches: the evidence as
    `(batch, layer, head)` arrays, the labels as in `batch_roles`."""
    for arrays in _evidence_blocks(stats, batch_chunk):
        holds = _rule_holds(arrays)
        label = np.full(arrays["length"].shape, -1, dtype=np.int16)
        for i in range(len(ROLE_RULES) - 1, -1, -1):  # the lowest index wins
            label[np.asarray(holds[ROLE_RULES[i]], dtype=bool)] = i
        label[arrays["length"] < MIN_LENGTH] = -2
        yield arrays, label


def batch_roles(stats: xr.Dataset, *, batch_chunk: int | None = None) -> xr.DataArray:
    """The per-batch label of every (batch, layer, head), in memory: the index into
    `ROLE_RULES` of the first rule that holds, −1 when none holds, −2 for samples shorter
    than MIN_LENGTH (not classified)."""
    labels = [label for _, label in _role_blocks(stats, batch_chunk)]
    shape = (0, stats.sizes["layer"], stats.sizes["head"])
    data = np.concatenate(labels) if labels else np.zeros(shape, dtype=np.int16)
    return xr.DataArray(data, dims=("batch", "layer", "head"), attrs={"rules": list(ROLE_RULES)})


def head_roles(stats: xr.Dataset, *, share: float = ROLE_SHARE, batch_chunk: int | None = None) -> list[dict]:
    """The role of every (layer, head), one dict each, from the statistics of a corpus.

    Each batch gets the first rule of `ROLE_RULES` that holds (see `batch_roles`); a head's
    role is its most common batch label if that holds in at least `share` of the batches
    (of length ≥ MIN_LENGTH), else "mixed". Dict keys: `layer, head, label` ("L0H2"),
    `role`, `support` (share of batches with that label; for "mixed" the largest share),
    `batches`, `shares` ({rule: share} of every rule that labels any batch), and the mean
    over those batches of each `EVIDENCE`: the attention mass `prev_token, next_token,
    self_attention, first_token, last_token, peak`, the argmax shares `prev_argmax,
    next_argmax, self_argmax`, `distance`, `entropy` (see `role_evidence`). One pass, a
    block of batches at a time: memory does not grow with the corpus.
    """
    layers, heads = stats.sizes["layer"], stats.sizes["head"]
    counts = np.zeros((layers, heads, len(ROLE_RULES)), dtype=np.int64)
    total = np.zeros((layers, heads), dtype=np.int64)
    sums = {name: np.zeros((layers, heads)) for name in EVIDENCE}
    seen = {name: np.zeros((layers, heads), dtype=np.int64) for name in EVIDENCE}
    for arrays, label in _role_blocks(stats, batch_chunk):
        classified = label != -2
        total += classified.sum(axis=0)
        for i in range(len(ROLE_RULES)):
            counts[..., i] += (label == i).sum(axis=0)
        for name in EVIDENCE:
            ok = classified & ~np.isnan(arrays[name])
            sums[name] += np.where(ok, arrays[name], 0.0).sum(axis=0)
            seen[name] += ok.sum(axis=0)
    rows = []
    for layer in range(layers):
        for head in range(heads):
            c, t = counts[layer, head], int(total[layer, head])
            shares = {ROLE_RULES[i]: float(c[i] / t) for i in range(len(ROLE_RULES)) if c[i]}
            best = int(np.argmax(c))  # ties: the earlier rule
            best_share = float(c[best] / t) if t else 0.0
            role = ROLE_RULES[best] if c[best] and best_share >= share else "mixed"
            row = {
                "layer": layer, "head": head, "label": f"L{layer}H{head}",
                "role": role, "support": best_share, "batches": t, "shares": shares,
            }
            for name in EVIDENCE:
                k = seen[name][layer, head]
                row[name] = float(sums[name][layer, head] / k) if k else None
            rows.append(row)
    return rows


# ---------------------------------------------------------------- streaming summaries


@dataclass
class Moments:
    """Count, mean and M2 (sum of squared deviations) per cell; mergeable (Chan et al. 1979).

    Merging `a` and `b`: `n = n_a + n_b`, `δ = mean_b − mean_a`,
    `mean = mean_a + δ·n_b/n`, `M2 = M2_a + M2_b + δ²·n_a·n_b/n`. NaN values are skipped.
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, shape) -> Moments:
        return cls(np.zeros(shape, dtype=np.int64), np.zeros(shape), np.zeros(shape))

    @classmethod
    def of(cls, values: np.ndarray, axis: int = 0) -> Moments:
        """The moments of one block along `axis` (two-pass within the block)."""
        x = np.asarray(values, dtype=np.float64)
        ok = ~np.isnan(x)
        count = ok.sum(axis)
        total = np.where(ok, x, 0.0).sum(axis)
        mean = np.divide(total, count, out=np.zeros(count.shape), where=count > 0)
        dev = np.where(ok, x - np.expand_dims(mean, axis), 0.0)
        return cls(count.astype(np.int64), mean, (dev * dev).sum(axis))

    def merge(self, other: Moments) -> Moments:
        n = self.count + other.count
        delta = other.mean - self.mean
        safe = np.where(n > 0, n, 1)
        mean = np.where(n > 0, self.mean + delta * other.count / safe, 0.0)
        m2 = self.m2 + other.m2 + np.where(n > 0, delta * delta * self.count * other.count / safe, 0.0)
        return Moments(n, mean, m2)

    @property
    def variance(self) -> np.ndarray:
        """Population variance M2 / n (NaN where n = 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.count > 0, self.m2 / np.where(self.count > 0, self.count, 1), np.nan)

    @property
    def mean_or_nan(self) -> np.ndarray:
        return np.where(self.count > 0, self.mean, np.nan)


def histogram_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per cell of `values (batch, *cell)` in the bins `edges` (like np.histogram:
    half-open bins, the last one closed; values outside the edges and NaN are dropped)."""
    x = np.asarray(values, dtype=np.float64)
    bins = len(edges) - 1
    cells = int(np.prod(x.shape[1:], dtype=np.int64))
    flat = x.reshape(x.shape[0], cells)
    ok = ~np.isnan(flat) & (flat >= edges[0]) & (flat <= edges[-1])
    index = np.searchsorted(edges, np.where(ok, flat, edges[0]), side="right") - 1
    index = np.clip(index, 0, bins - 1)
    target = (np.arange(cells)[None, :] * bins + index)[ok]
    counts = np.bincount(target, minlength=cells * bins)
    return counts.reshape(x.shape[1:] + (bins,))


@dataclass
class SummaryAccumulator:
    """Everything `streaming_summary` keeps: per (layer, head) moments of entropy (nats),
    normalised entropy and peak key, and histograms of normalised entropy and peak key.
    `update(block)` adds a block of batches; `merge(other)` combines two accumulators
    (for chunks summarised separately, e.g. on several workers)."""

    entropy_edges: np.ndarray
    keys: int
    entropy: Moments | None = None
    entropy_norm: Moments | None = None
    peak_key: Moments | None = None
    entropy_hist: np.ndarray | None = None
    peak_hist: np.ndarray | None = None
    batches: int = 0
    shape: tuple = field(default=())

    def _init(self, shape) -> None:
        self.shape = tuple(shape)
        self.entropy = Moments.empty(shape)
        self.entropy_norm = Moments.empty(shape)
        self.peak_key = Moments.empty(shape)
        self.entropy_hist = np.zeros(self.shape + (len(self.entropy_edges) - 1,), dtype=np.int64)
        self.peak_hist = np.zeros(self.shape + (self.keys,), dtype=np.int64)

    def update(self, entropy: np.ndarray, entropy_norm: np.ndarray, peak_key: np.ndarray) -> SummaryAccumulator:
        """Add a block of `(batch, layer, head)` values (peak keys < 0 are skipped)."""
        if self.entropy is None:
            self._init(np.shape(entropy)[1:])
        peak = np.asarray(peak_key)
        peak_f = np.where(peak >= 0, peak, np.nan).astype(np.float64)
        self.entropy = self.entropy.merge(Moments.of(entropy))
        self.entropy_norm = self.entropy_norm.merge(Moments.of(entropy_norm))
        self.peak_key = self.peak_key.merge(Moments.of(peak_f))
        self.entropy_hist += histogram_counts(entropy_norm, self.entropy_edges)
        self.peak_hist += histogram_counts(peak_f, np.arange(self.keys + 1, dtype=np.float64) - 0.5)
        self.batches += int(np.shape(entropy)[0])
        return self

    def merge(self, other: SummaryAccumulator) -> SummaryAccumulator:
        if other.entropy is None:
            return self
        if self.entropy is None:
            return other
        out = SummaryAccumulator(self.entropy_edges, self.keys)
        out.shape = self.shape
        out.entropy = self.entropy.merge(other.entropy)
        out.entropy_norm = self.entropy_norm.merge(other.entropy_norm)
        out.peak_key = self.peak_key.merge(other.peak_key)
        out.entropy_hist = self.entropy_hist + other.entropy_hist
        out.peak_hist = self.peak_hist + other.peak_hist
        out.batches = self.batches + other.batches
        return out

    def result(self) -> xr.Dataset:
        if self.entropy is None:
            raise FastattnError("nothing to summarise: no batches")
        dims = ("layer", "head")
        centres = 0.5 * (self.entropy_edges[:-1] + self.entropy_edges[1:])
        return xr.Dataset(
            {
                "count": (dims, self.entropy_norm.count),
                "entropy_mean": (dims, self.entropy.mean_or_nan),
                "entropy_var": (dims, self.entropy.variance),
                "entropy_norm_mean": (dims, self.entropy_norm.mean_or_nan),
                "entropy_norm_var": (dims, self.entropy_norm.variance),
                "peak_key_mean": (dims, self.peak_key.mean_or_nan),
                "peak_key_var": (dims, self.peak_key.variance),
                "entropy_norm_hist": (dims + ("bin",), self.entropy_hist),
                "peak_key_hist": (dims + ("key",), self.peak_hist),
            },
            coords={
                "layer": np.arange(self.shape[0]),
                "head": np.arange(self.shape[1]),
                "bin": centres,
                "bin_lower": ("bin", self.entropy_edges[:-1]),
                "bin_upper": ("bin", self.entropy_edges[1:]),
                "key": np.arange(self.keys),
            },
            attrs={"batches": self.batches, "variance": "population (M2 / n)"},
        )


SUMMARY_VARS = ("entropy_mean", "entropy_norm", "peak_key")


def summary_blocks(stats: xr.Dataset, batch_chunk: int | None = None):
    """Yield `(entropy, entropy_norm, peak_key)` numpy blocks of `(batch, layer, head)`,
    `batch_chunk` batches at a time (default: whole stored chunks, up to BLOCK_BYTES)."""
    n = stats.sizes["batch"]
    batch_chunk = _batch_step(stats, list(SUMMARY_VARS), batch_chunk)
    view = stats[list(SUMMARY_VARS)].transpose("batch", "layer", "head")
    for start in range(0, n, batch_chunk):
        block = view.isel(batch=slice(start, min(n, start + batch_chunk))).compute()
        yield tuple(np.asarray(block[name].values) for name in SUMMARY_VARS)


def streaming_summary(source, bins: int = 20, *, batch_chunk: int | None = None,
                      keys: int | None = None, entropy_smoothing: float = 0.0) -> xr.Dataset:
    """Per (layer, head) moments and histograms over the whole corpus, in one chunked pass.

    `source` is a store path (its committed `stats` group) or a statistics Dataset. Reads
    `batch_chunk` batches at a time (default: whole stored chunks, at most BLOCK_BYTES =
    32 MB) and folds each block into a `SummaryAccumulator`, so memory is one block plus
    the accumulators, whatever the number of batches. Returns `count`, `entropy_mean/var` (nats), `entropy_norm_mean/var`,
    `peak_key_mean/var` (population variances), `entropy_norm_hist (layer, head, bin)`
    (`bins` equal bins over [0, 1]) and `peak_key_hist (layer, head, key)` (one bin per key).
    `entropy_smoothing` > 0 summarises Clark et al. 2019's entropy of smoothed rows instead
    (`corpus_stats`; computed from the attention, block by block).
    """
    if entropy_smoothing:
        stats = corpus_stats(source, entropy_smoothing=entropy_smoothing)
    elif isinstance(source, xr.Dataset):
        stats = source
    else:
        from .stats import open_stats

        stats = open_stats(source)
    if bins < 1:
        raise ValueError(f"bins must be at least 1, not {bins}")
    if keys is None:
        keys = int(stats.sizes.get("key") or stats.sizes.get("query") or 0)
        if not keys:
            raise ValueError("cannot tell the number of keys: pass keys=")
    acc = SummaryAccumulator(np.linspace(0.0, 1.0, bins + 1), keys)
    for block in summary_blocks(stats, batch_chunk):
        acc.update(*block)
    out = acc.result()
    out.attrs["entropy_smoothing"] = float(entropy_smoothing)
    return out
