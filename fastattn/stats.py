"""Store → statistics: xarray/dask around the Numba kernels, per-plane summaries, pattern flags.

`compute_stats(ds)` is lazy: one fused kernel pass per dask chunk of whole `(query, key)`
planes, so memory stays flat however many batches there are. Inside dask the kernels run
single-threaded (dask's threads already use the cores); on in-memory arrays they run
parallel. `write_stats(store)` computes only the batches that have no statistics yet, in a
plain loop over ~128 MB blocks (no dask graph), and commits them through the manifest, like
an ingest.

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
from concurrent.futures import ThreadPoolExecutor

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


def per_query_stats(
    attention: xr.DataArray, length: xr.DataArray | None = None, k: int = 5, *, parallel: bool | None = None
) -> xr.Dataset:
    """Per-query and per-key statistics of every plane, lazily on dask arrays.

    `row_sum[q] = Σ_k A[q,k]`, `entropy[q] = −Σ_k A ln A` (0·ln 0 = 0), `max_weight[q]`,
    `distance[q] = Σ_k A[q,k]·|q−k|`, `diag[q] = A[q,q]`, `sq_sum[q] = Σ_k A²`,
    `col_sum[k] = Σ_q A[q,k]`, and the top-`k` keys per query (descending, ties to the
    lower index, −1/NaN past the valid keys). NaN outside each plane's valid block.
    `parallel`: the kernels' own threads; by default on for in-memory arrays, off inside
    dask (whose threads already use the cores).
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
        kwargs={"k": k, "parallel": (not lazy) if parallel is None else parallel},
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


def compute_stats(ds: xr.Dataset | xr.DataArray, k: int = 5, *, parallel: bool | None = None) -> xr.Dataset:
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
    st = per_query_stats(attention, length, k, parallel=parallel)
    st = st.merge(plane_summaries(st, length, attention.sizes["query"], attention.sizes["key"]))
    for var in st.data_vars.values():
        var.attrs = {}  # not the attention's "attention weight"
    if length is not None:
        st["length"] = length
    return st


# ---------------------------------------------------------------- the store's stats group

GROUP = "stats"


#: Attention bytes per block of `write_stats`: big enough that per-block costs (one write per
#: variable, one kernel launch) vanish, small enough that two blocks in flight stay ~0.3 GB.
BLOCK_BYTES = 128 << 20


def _block_batches(manifest, query: int, key: int) -> int:
    """Batches per block, a multiple of the store's batch chunk (no chunk is read twice)."""
    per_batch = manifest.layers * manifest.heads * query * key * np.dtype(manifest.dtype).itemsize
    chunks = max(1, BLOCK_BYTES // (per_batch * manifest.batch_chunk))
    return int(chunks * manifest.batch_chunk)


def _blocks(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) cut at multiples of `size`: each block covers whole stats chunks, except
    a first one that completes the chunk an earlier run left partly filled."""
    edges = [start, *range((start // size + 1) * size, stop, size), stop]
    return list(zip(edges[:-1], edges[1:]))


def _read_block(group, b0: int, b1: int) -> xr.Dataset:
    """Batches [b0, b1) of the store, in memory: zarr reads and decodes the chunks concurrently."""
    from .store import DIMS

    attention = group["attention"][b0:b1]
    coords = {dim: np.arange(size, dtype=np.int32) for dim, size in zip(DIMS, attention.shape)}
    coords["batch"] = np.arange(b0, b1, dtype=np.int32)
    return xr.Dataset({"attention": (DIMS, attention), "length": ("batch", group["length"][b0:b1])}, coords=coords)


def _block_stats(block: xr.Dataset, k: int, parallel: bool) -> xr.Dataset:
    """Every statistic of an in-memory block, without the coords that have no batch dim."""
    st = compute_stats(block, k=k, parallel=parallel)
    return st.drop_vars([name for name in st.variables if "batch" not in st[name].dims])


def _write_block(arrays: dict, st: xr.Dataset, b0: int, b1: int) -> int:
    """One write per variable, all at once (see store.write_all). Every chunk is written, even
    one equal to the fill value (an all-False flag), so a missing chunk is always damage."""
    from . import store

    arrays = {name: arrays[name].with_config({"write_empty_chunks": True}) for name in st.data_vars}
    store.write_all((arrays[name], slice(b0, b1), st[name].values) for name in st.data_vars)
    return b1 - b0


def _stats_task(loc, b0: int, b1: int, k: int) -> int:
    """One block on a dask worker: read, compute (single-threaded: the worker's threads share
    the cores), write. Blocks cover distinct stats chunks, so workers never write the same one."""
    from . import store

    group = store.open_group(loc)
    st = _block_stats(_read_block(group, b0, b1), k, parallel=False)
    return _write_block(dict(group[GROUP].arrays()), st, b0, b1)


def _create_layout(loc, group, n: int, k: int, block: int, parallel: bool) -> None:
    """The stats group's arrays for `n` batches, empty, one chunk per block (replacing old ones).

    `parallel`: the kernel variant the run itself uses, so that a run compiles only that one."""
    import dask.array as da

    from . import store

    sample = _block_stats(_read_block(group, 0, 1), k, parallel)
    layout = xr.Dataset(coords={"batch": np.arange(n, dtype=np.int32)})
    for name, var in sample.data_vars.items():
        shape = (n, *var.shape[1:])
        layout[name] = (var.dims, da.zeros(shape, chunks=(block, *var.shape[1:]), dtype=var.dtype))
    layout = layout.assign_coords({dim: sample[dim] for dim in sample.dims if dim != "batch"})
    encoding = {name: {"compressors": store.compressors()} for name in layout.variables}
    for name, var in layout.data_vars.items():
        encoding[name]["chunks"] = (block, *var.shape[1:])  # not min(n, block): the group grows
    layout.to_zarr(loc.zarr_store(), group=GROUP, mode="w", compute=False, consolidated=False, encoding=encoding)


def write_stats(
    location,
    *,
    k: int = 5,
    jobs: int | None = None,
    storage_options: dict | None = None,
    client=None,
    progress=None,
) -> dict:
    """Compute statistics for the batches that have none yet and commit them to the store.

    Returns `{"computed": batches computed now, "total": batches with statistics}`. A `k`
    other than the stored one recomputes every batch. Crash-safe like an ingest: the
    manifest's `stats_committed` moves only after the arrays are written.

    Why not `compute_stats(open_store(...)).to_zarr(...)`: dask's graph for that has ~60 tasks
    per store chunk and 25 small writes per batch-chunk, which cost more than the kernels.
    Here a plain loop takes blocks of ~128 MB: zarr reads the next block while the parallel
    kernels run on this one, and a writer thread stores the last one, one write per variable.
    With a `dask.distributed.Client` (passed or active) the blocks run on its workers instead.
    `progress(batches done, batches to do)` is called after each block.
    """
    from . import cluster, store

    loc = location if isinstance(location, store.Location) else store.Location(location, storage_options)
    manifest = store.check_store(loc)  # before the lock, which would create a missing store's folder
    if _done(manifest, k) >= manifest.committed:  # nothing to do: no lock, no write (a read-only store is fine)
        return {"computed": 0, "total": manifest.committed}
    loc.check_writable()
    with store.Lock(loc, "fastattn stats"), _disk_errors(loc):
        manifest = store.check_store(loc)  # again: another writer may have committed meanwhile
        done = _done(manifest, k)
        n = manifest.committed
        if done >= n:
            return {"computed": 0, "total": n}
        client = client if client is not None else cluster.active_client()
        group = store.open_group(loc)
        _, _, _, query, key = group["attention"].shape
        block = _block_batches(manifest, query, key)
        old = group[GROUP] if GROUP in group else None
        if done == 0 or old is None or _layout_changed(old, query, key, k, block):
            if manifest.stats_committed:  # uncommit first: the new layout drops the old arrays
                manifest.stats_committed = 0
                store.commit(loc, manifest)
            done = 0
            _create_layout(loc, group, n, k, block, parallel=client is None)
        else:
            for name, array in old.arrays():
                if "batch" in (array.metadata.dimension_names or ()):
                    array.resize((n, *array.shape[1:]))
                    if name == "batch":
                        array[:] = np.arange(n, dtype=array.dtype)
        blocks = _blocks(done, n, block)
        if client is not None:
            _run_distributed(client, loc, blocks, k, progress, n - done)
        else:
            _run_local(loc, group, blocks, k, jobs, progress, n - done)
        manifest.stats_committed, manifest.stats_k = n, k
        store.commit(loc, manifest)
    return {"computed": n - done, "total": n}


def _done(manifest, k: int) -> int:
    """Batches whose statistics are committed with this `k` (another k recomputes them all)."""
    return manifest.stats_committed if manifest.stats_k == k else 0


def _run_local(loc, group, blocks, k, jobs, progress, total) -> None:
    """Read block i+1 and write block i-1 in threads while the kernels run on block i."""
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(min(jobs or threads, numba.config.NUMBA_NUM_THREADS))
    arrays = dict(group[GROUP].arrays())  # as laid out or resized just now
    written = 0
    try:
        with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
            reading = reader.submit(_read_block, group, *blocks[0])
            writing = None
            for i, (b0, b1) in enumerate(blocks):
                data = reading.result()
                if i + 1 < len(blocks):
                    reading = reader.submit(_read_block, group, *blocks[i + 1])
                st = _block_stats(data, k, parallel=True)
                if writing is not None:
                    written += writing.result()
                    if progress:
                        progress(written, total)
                writing = writer.submit(_write_block, arrays, st, b0, b1)
            written += writing.result()
            if progress:
                progress(written, total)
    finally:
        numba.set_num_threads(threads)


def _run_distributed(client, loc, blocks, k, progress, total) -> None:
    from dask.distributed import as_completed

    futures = [client.submit(_stats_task, loc, b0, b1, k, pure=False) for b0, b1 in blocks]
    written = 0
    for future in as_completed(futures):
        written += future.result()
        if progress:
            progress(written, total)


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


def _layout_changed(group, query: int, key: int, k: int, block: int) -> bool:
    """A store that grew longer sequences, another k or an older layout: lay the group out again."""
    arrays = dict(group.arrays())
    return (
        "entropy" not in arrays
        or arrays["entropy"].shape[-1] != query
        or arrays["col_sum"].shape[-1] != key
        or arrays["topk_index"].shape[-1] != k
        or arrays["entropy"].chunks[0] != block
    )


def open_stats(location, *, storage_options: dict | None = None) -> xr.Dataset:
    """The committed statistics of a store (its `stats` group), lazily."""
    from . import store
    from .check import STATS_SCHEMA
    from .errors import StoreError

    loc = location if isinstance(location, store.Location) else store.Location(location, storage_options)
    manifest = store.require_batches(loc, store.check_store(loc))
    if not manifest.stats_committed:
        raise StoreError(f"{loc}: no statistics yet (run fastattn stats)")
    st = store.open_committed(loc, {"batch": manifest.stats_committed}, group=GROUP)  # survives a killed resize
    missing = [name for name in STATS_SCHEMA if name not in st.variables]
    if missing:
        raise StoreError(f"{loc}: the statistics lack {', '.join(missing)}; run fastattn check")
    st.attrs = {"store": str(loc), "k": manifest.stats_k, "batches": manifest.stats_committed}
    return st


@contextlib.contextmanager
def read_errors(location):
    """Reading committed statistics: a chunk that fails its crc32c checksum is one line naming
    the store, not a traceback (`fastattn check` names the chunk)."""
    from .errors import StoreError

    try:
        yield
    except ValueError as exc:
        if "checksum" not in str(exc).lower():
            raise
        raise StoreError(
            f"{location}: a chunk of the statistics fails its crc32c checksum (the bytes on disk changed);"
            " fastattn check names it, and repairing the store has fastattn stats recompute them"
        ) from None
