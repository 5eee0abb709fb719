"""Attention rollout (Abnar & Zuidema 2020) of every sample, kept in the store's `rollout` group."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import FastattnError
from ..kernels import rollout as _rollout
from .common import HEAD_DIMS, _attention_and_length, _whole_samples


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

    from .. import store

    spec = store.schema.ROLLOUT
    loc = store.as_location(location, storage_options)
    store.checked_manifest(loc)  # before the lock, which would create a missing store's folder
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
    from .. import store

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
