"""Store → statistics: xarray/dask around the Numba kernels, per-plane summaries, pattern flags.

`compute_stats(ds)` is lazy: one fused kernel pass per dask chunk of whole `(query, key)`
planes, so memory stays flat however many batches there are. Inside dask the kernels run
single-threaded (dask's threads already use the cores); on in-memory arrays they run
parallel. `write_stats(store)` computes only the batches that have no statistics yet and
commits them through the manifest, like an ingest.

Pattern flags. The seed rules were written for 8 tokens, where a uniform row gives every
key u = 1/8 and every key receives 1 in total. Each rule is rescaled so that at length 8
it gives exactly the seed's number:

- ``uniform``:        std of the valid weights < 0.08·u             (seed: std < 0.01)
- ``diagonal_only``:  diagonal sum / total > 0.8                     (a share already)
- ``dominant_key``:   peak incoming / length > 3.0/8 of all attention (seed: peak incoming > 3.0)
- ``critical_key``:   peak incoming / length > 1.5/8                  (seed: peak incoming > 1.5)
- ``weak``:           largest weight < 1.2·u                          (seed: max < 0.15)
- ``strong_self``:    mean of the diagonal > 1.2·u                    (seed: diagonal mean > 0.15)

Incoming attention is scaled as a share of all attention (the total is `length`), not as
a multiple of the uniform column sum (which is 1 at any length): "3× a fair share" of 512
keys is 0.6% of the attention, which is not one key dominating. Length-1 planes and
cross-attention (query ≠ key, no diagonal) give NaN statistics where undefined and False
flags.
"""

from __future__ import annotations

import contextlib

import numpy as np
import xarray as xr


PER_QUERY = ("row_sum", "entropy", "max_weight", "distance", "diag", "sq_sum")
PLANE_DIMS = ("batch", "layer", "head")
FLAGS = ("uniform", "diagonal_only", "dominant_key", "weak", "critical_key", "strong_self")
SEED_LENGTH = 8

#: The seed's thresholds at 8 tokens (see the module docstring for how each scales).
UNIFORM_STD = 0.01
DIAGONAL_SHARE = 0.8
DOMINANT_INCOMING = 3.0
CRITICAL_INCOMING = 1.5
WEAK_MAX = 0.15
STRONG_SELF = 0.15


def _kernel_block(attention: np.ndarray, lengths: np.ndarray, k: int, parallel: bool):
    """All per-query/per-key outputs of one block of planes."""
    from .kernels import plane_stats, topk  # numba loads on first use, not on `import fastattn`

    lengths = np.broadcast_to(lengths, attention.shape[:-2])
    stats = plane_stats(attention, lengths, parallel=parallel)
    index, weight = topk(attention, k, lengths, parallel=parallel)
    per_query = [getattr(stats, name).astype(np.float32) for name in PER_QUERY]
    return (*per_query, stats.col_sum.astype(np.float32), index, weight.astype(np.float32))


def _lengths_for(attention: xr.DataArray, length: xr.DataArray | None) -> xr.DataArray:
    if length is not None:
        return length.astype(np.int64)
    full = max(attention.sizes["query"], attention.sizes["key"])
    dims = [d for d in attention.dims if d not in ("query", "key")]
    return xr.DataArray(np.full([attention.sizes[d] for d in dims], full, dtype=np.int64), dims=dims)


def per_query_stats(attention: xr.DataArray, length: xr.DataArray | None = None, k: int = 5) -> xr.Dataset:
    """Per-query and per-key statistics of every plane, lazily on dask arrays.

    `row_sum[q] = Σ_k A[q,k]`, `entropy[q] = −Σ_k A ln A` (0·ln 0 = 0), `max_weight[q]`,
    `distance[q] = Σ_k A[q,k]·|q−k|`, `diag[q] = A[q,q]`, `sq_sum[q] = Σ_k A²`,
    `col_sum[k] = Σ_q A[q,k]`, and the top-`k` keys per query (descending, ties to the
    lower index, −1/NaN past the valid keys). NaN outside each plane's valid block.
    """
    if not 1 <= k <= 64:
        raise ValueError(f"k must be between 1 and 64, not {k}")
    lengths = _lengths_for(attention, length)
    lazy = attention.chunks is not None
    if lazy:
        attention = attention.chunk({"query": -1, "key": -1})
    outputs = xr.apply_ufunc(
        _kernel_block,
        attention,
        lengths,
        kwargs={"k": k, "parallel": not lazy},
        input_core_dims=[["query", "key"], []],
        output_core_dims=[["query"]] * len(PER_QUERY) + [["key"], ["query", "rank"], ["query", "rank"]],
        output_dtypes=[np.float32] * (len(PER_QUERY) + 1) + [np.int32, np.float32],
        dask="parallelized",
        dask_gufunc_kwargs={"output_sizes": {"rank": k}},
    )
    names = (*PER_QUERY, "col_sum", "topk_index", "topk_weight")
    ds = xr.Dataset(dict(zip(names, outputs)))
    return ds.assign_coords(rank=np.arange(k, dtype=np.int32))


def plane_summaries(st: xr.Dataset, length: xr.DataArray | None, query: int, key: int) -> xr.Dataset:
    """Per-plane numbers and flags from the per-query/per-key statistics (all lazy)."""
    if length is None:
        length = xr.full_like(st.row_sum.isel(query=0, drop=True), max(query, key), dtype=np.int64)
    n = length.astype(np.float64)
    cross = query != key
    queries = float(query) if cross else n
    keys = float(key) if cross else n
    total = st.row_sum.sum("query")
    out = xr.Dataset()
    out["entropy_mean"] = st.entropy.mean("query")
    out["entropy_norm"] = out.entropy_mean / np.log(xr.where(keys > 1, keys, np.nan))
    out["self_attention"] = st.diag.mean("query")
    out["diag_share"] = st.diag.sum("query", min_count=1) / total
    filled = st.col_sum.fillna(-np.inf)
    out["peak_key"] = filled.argmax("key").astype(np.int32)
    out["peak_incoming"] = st.col_sum.max("key")
    out["confidence"] = st.max_weight.mean("query")
    out["distance_mean"] = st.distance.mean("query")
    out["row_sum_error"] = abs(st.row_sum - 1.0).max("query")
    # std over the valid block: mean weight is total/count, mean square is Σ A²/count
    count = queries * keys
    mean = total / count
    variance = (st.sq_sum.sum("query") / count - mean**2).clip(min=0.0)
    std = np.sqrt(variance)
    uniform_weight = 1.0 / keys
    scale = uniform_weight * SEED_LENGTH  # 1 at 8 tokens
    share = out.peak_incoming / queries
    valid = n > 1
    out["uniform"] = valid & (std < UNIFORM_STD * scale)
    out["diagonal_only"] = valid & (out.diag_share > DIAGONAL_SHARE)
    out["dominant_key"] = valid & (share > DOMINANT_INCOMING / SEED_LENGTH)
    out["weak"] = valid & (st.max_weight.max("query") < WEAK_MAX * scale)
    out["critical_key"] = valid & (share > CRITICAL_INCOMING / SEED_LENGTH)
    out["strong_self"] = valid & (out.self_attention > STRONG_SELF * scale)
    return out


def compute_stats(ds: xr.Dataset | xr.DataArray, k: int = 5) -> xr.Dataset:
    """Every statistic of every `(batch, layer, head)` plane, as a lazy `xarray.Dataset`.

    Takes a store (`open_store`) or any Dataset/DataArray with `query` and `key` dims
    (`length` is used when the Dataset has it, else whole planes are valid). Variables:
    per query `row_sum, entropy, max_weight, distance` (and `diag`, `sq_sum`); per key
    `col_sum`; `topk_index, topk_weight` (…, query, rank); per plane `entropy_mean,
    entropy_norm, self_attention, diag_share, peak_key, peak_incoming, confidence,
    distance_mean, row_sum_error`, and the boolean flags `uniform, diagonal_only,
    dominant_key, weak, critical_key, strong_self`.
    """
    attention = ds if isinstance(ds, xr.DataArray) else ds["attention"]
    length = ds["length"] if isinstance(ds, xr.Dataset) and "length" in ds else None
    st = per_query_stats(attention, length, k)
    st = st.merge(plane_summaries(st, length, attention.sizes["query"], attention.sizes["key"]))
    if length is not None:
        st["length"] = length
    return st


# ---------------------------------------------------------------- the store's stats group

GROUP = "stats"


def _template(st: xr.Dataset) -> xr.Dataset:
    return st.drop_vars([name for name in st.variables if "batch" not in st[name].dims])


def write_stats(
    location, *, k: int = 5, jobs: int | None = None, storage_options: dict | None = None, client=None
) -> dict:
    """Compute statistics for the batches that have none yet and commit them to the store.

    Returns `{"computed": batches computed now, "total": batches with statistics}`. A `k`
    other than the stored one recomputes every batch. Crash-safe like an ingest: the
    manifest's `stats_committed` moves only after the arrays are written. With a
    `dask.distributed.Client` (passed or active) the chunks are computed on its workers.
    """
    import dask

    from . import cluster, store

    loc = location if isinstance(location, store.Location) else store.Location(location, storage_options)
    store.check_store(loc)  # before the lock, which would create a missing store's folder
    with store.Lock(loc, "fastattn stats"), _disk_errors(loc):
        manifest = store.check_store(loc)
        ds = store.open_store(loc)
        done = manifest.stats_committed if manifest.stats_k == k else 0
        n = manifest.committed
        if done >= n:
            return {"computed": 0, "total": n}
        group = store.open_group(loc)
        fresh = done == 0 or GROUP not in group or _shape_changed(group[GROUP], ds, k)
        if fresh:
            done = 0
        # all layers in one chunk: 25 small variables per batch-chunk, not 25 per (batch-chunk, layer)
        st = compute_stats(ds.isel(batch=slice(done, n)), k=k).chunk({"layer": -1})
        if fresh:
            if manifest.stats_committed:  # uncommit first: the rewrite below drops the old arrays
                manifest.stats_committed = 0
                store.commit(loc, manifest)
            st.to_zarr(loc.zarr_store(), group=GROUP, mode="w", compute=False, consolidated=False)
        else:
            for name, array in group[GROUP].arrays():
                if "batch" in (array.metadata.dimension_names or ()):
                    array.resize((n,) + array.shape[1:])
                    if name == "batch":
                        array[:] = np.arange(n, dtype=array.dtype)
        client = client if client is not None else cluster.active_client()
        scheduler = {"scheduler": client} if client is not None else {"scheduler": "threads", "num_workers": jobs}
        with dask.config.set(scheduler):
            # Dask chunks here follow the store's batch chunks, the first starting at `done`: one
            # dask chunk per zarr chunk, so the partial first one is safe to read-modify-write.
            _template(st).to_zarr(
                loc.zarr_store(),
                group=GROUP,
                region={"batch": slice(done, n)},
                mode="r+",
                consolidated=False,
                safe_chunks=False,
            )
        manifest.stats_committed, manifest.stats_k = n, k
        store.commit(loc, manifest)
    return {"computed": n - done, "total": n}


@contextlib.contextmanager
def _disk_errors(loc):
    """A full disk (or any OS error) while writing statistics is one line, not a traceback."""
    from .errors import StoreError

    try:
        yield
    except OSError as exc:
        raise StoreError(
            f"{loc}: writing statistics failed ({exc.strerror or exc}); nothing was committed,"
            " the store still opens at its last commit"
        ) from None


def _shape_changed(group, ds: xr.Dataset, k: int) -> bool:
    """A store that grew longer sequences needs its statistics laid out again."""
    arrays = dict(group.arrays())
    return (
        "entropy" not in arrays
        or arrays["entropy"].shape[-1] != ds.sizes["query"]
        or arrays["col_sum"].shape[-1] != ds.sizes["key"]
        or arrays["topk_index"].shape[-1] != k
    )


def open_stats(location, *, storage_options: dict | None = None) -> xr.Dataset:
    """The committed statistics of a store (its `stats` group), lazily."""
    from . import store
    from .errors import StoreError

    loc = location if isinstance(location, store.Location) else store.Location(location, storage_options)
    manifest = store.check_store(loc)
    if not manifest.stats_committed:
        raise StoreError(f"{loc}: no statistics yet (run fastattn stats)")
    st = store.open_committed(loc, {"batch": manifest.stats_committed}, group=GROUP)  # survives a killed resize
    st.attrs = {"store": str(loc), "k": manifest.stats_k, "batches": manifest.stats_committed}
    return st
