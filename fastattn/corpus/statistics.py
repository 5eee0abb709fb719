"""The per-plane statistics the analyses read, with Clark et al. 2019's smoothed entropy on request."""

from __future__ import annotations

import os

import numpy as np
import xarray as xr

from ..errors import FastattnError
from .common import _attention_and_length


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
    from .. import store
    from ..stats import compute_stats

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
        manifest = store.require_batches(loc, store.checked_manifest(loc))
        if entropy_smoothing:
            store.require_maps(loc, manifest)  # smoothed entropy is computed from the maps
        ds = store.open_store(loc, attention=not manifest.stats_only)
        stats = store.derived_record(store.schema.STATS, manifest)
        if stats is not None and stats["batches"] == manifest.committed:
            from ..stats import open_stats

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
