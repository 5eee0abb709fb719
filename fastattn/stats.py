"""Store → statistics: one fused Numba kernel call per block of planes, for notebooks and the store.

`compute_stats(ds)` is lazy: one dask task per block of ~128 MB of attention (whole store
chunks, never copied into one array) runs the fused kernel (`fastattn.kernels.stats`), which
gives every per-query, per-key and per-plane statistic, the top-k and the pattern flags in one
pass; nothing is computed afterwards in xarray or NumPy. On `open_store`'s attention of a local
store the tasks read and decode the chunk files themselves, as `write_stats` does. Inside dask
the kernel runs single-threaded (dask's threads already use the cores); on in-memory arrays it
runs parallel.
`write_stats(store)` runs the same kernel over the same blocks for the batches that have no
statistics yet, in a plain loop (no dask graph), and commits them through the manifest, like
an ingest. The formulas and the pattern flags' thresholds are in the kernel module's docstring.

`FLAGS`, `PER_QUERY` and `PER_PLANE` (the variable names) are the kernel's (`fastattn.stat_names`,
which does not load Numba). xarray and dask are imported by the functions that
return Datasets: the command line reads and writes the store through zarr and never loads them.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import math
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from .stat_names import FLAGS, PLANE_STATS, ROW_STATS
from .store.commit import derived_record
from .store.schema import STATS

if TYPE_CHECKING:
    import xarray as xr

#: Attention bytes per block of `compute_stats` and `write_stats`: big enough that per-block costs
#: (a kernel launch, one write per variable, a dask task) vanish, small enough that two blocks
#: in flight stay ~0.3 GB.
BLOCK_BYTES = 128 << 20
#: ... and at most this many batches: a block is one chunk of every statistic, and with short
#: sequences BLOCK_BYTES of attention is millions of batches, whose statistics (which grow with
#: the sequence, not its square) would make chunks of 100 MB and more to decode for a few batches.
MAX_BLOCK_BATCHES = 4096

#: The variable names: the kernel's (`fastattn.stat_names`, which does not load Numba).
PER_QUERY = ROW_STATS
PER_PLANE = PLANE_STATS


def variables(lead: tuple[str, ...], k: int) -> dict[str, tuple[tuple[str, ...], np.dtype]]:
    """Every variable of the kernel's output: its dims and dtype (per-query values are float32,
    the input's precision and most of the bytes; per-plane summaries float64)."""
    f32 = np.dtype(np.float32)
    out = {name: (lead + ("query",), f32) for name in ROW_STATS}
    out["col_sum"] = (lead + ("key",), f32)
    out["topk_index"] = (lead + ("query", "rank"), np.dtype(np.int32))
    out["topk_weight"] = (lead + ("query", "rank"), f32)
    planes = {name: (lead, np.dtype(np.float64)) for name in PLANE_STATS}
    for name in ("entropy_mean", "entropy_norm", "self_attention", "diag_share"):
        out[name] = planes.pop(name)
    out["peak_key"] = (lead, np.dtype(np.int32))
    out.update(planes)
    out.update({name: (lead, np.dtype(bool)) for name in FLAGS})
    return out


def _block_arrays(pieces, lengths, shape: tuple[int, ...], k: int, parallel: bool, ids=None) -> dict[str, np.ndarray]:
    """The fused kernel over one block of planes, `shape` of them (the leading dims).

    `pieces` are `(array (*piece, Q, K), offset)` pairs tiling the block (e.g. its store chunks);
    each is written straight into the block's outputs, so they are never concatenated.
    `lengths` holds one length per plane of the block (None: every plane whole); `ids` the token
    ids (..., Q), leading dims broadcasting to `shape` (None: no ids, whose scores are NaN)."""
    from .kernels import stats as kernel

    pieces = iter(pieces)  # may read each piece only when asked for it (`_Planes`, `_block_of_files`)
    first = next(pieces)
    Q, K = first[0].shape[-2:]
    out = kernel.empty_buffers(math.prod(shape), Q, K, k, np.float32)
    planes = np.arange(math.prod(shape)).reshape(shape)  # a block plane's index in the outputs
    repeats = None if ids is None else kernel.repeats(ids, shape)  # once per block: every piece's planes are in it
    for array, offset in itertools.chain([first], pieces):
        where = tuple(slice(o, o + n) for o, n in zip(offset, array.shape[:-2]))
        lens = None if lengths is None else lengths[where]
        kernel.fill(out, array, lens, planes[where].ravel(), parallel=parallel, repeats=repeats)
    return kernel.named(out, shape)


def _dataset(arrays: dict, lead: tuple[str, ...], k: int, coords) -> xr.Dataset:
    """The kernel's arrays (NumPy or dask) as a Dataset with the attention's coordinates."""
    import xarray as xr

    st = xr.Dataset({name: (dims, arrays[name]) for name, (dims, _) in variables(lead, k).items()}, coords=coords)
    return st.assign_coords(rank=np.arange(k, dtype=np.int32))


def _plane_lengths(length: xr.DataArray | None, lead: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray | None:
    """One length per plane (int64, `shape`), from a `length` over some of the leading dims."""
    if length is None:
        return None
    extra = set(length.dims) - set(lead)
    if extra:
        raise ValueError(f"length has dims {sorted(extra)} that the attention's planes do not")
    values = np.asarray(length.transpose(*[d for d in lead if d in length.dims]).values)
    if values.dtype.kind not in "iu":
        raise ValueError(f"length must hold integers, not {values.dtype}")
    expanded = values.reshape([length.sizes.get(d, 1) for d in lead]).astype(np.int64)
    return np.broadcast_to(expanded, shape)


def _plane_ids(ids: xr.DataArray | None, lead: tuple[str, ...], query: int) -> np.ndarray | None:
    """Token ids shaped `lead` + (query,), size 1 along the leading dims `ids` lacks,
    from an `input_id` over some of the leading dims and `query`."""
    if ids is None:
        return None
    extra = set(ids.dims) - set(lead) - {"query"}
    if extra or "query" not in ids.dims or ids.sizes["query"] != query:
        raise ValueError(f"input_id has dims {dict(ids.sizes)}; it needs the attention's query dim and only its leading dims")
    values = np.asarray(ids.transpose(*[d for d in lead if d in ids.dims], "query").values)
    if values.dtype.kind not in "iu":
        raise ValueError(f"input_id must hold integers, not {values.dtype}")
    return values.reshape([ids.sizes.get(d, 1) for d in lead] + [query])


def _block_ids(ids: np.ndarray | None, where: tuple[slice, ...]) -> np.ndarray | None:
    """The ids of a block (`where`: its slices of the leading dims); a size-1 dim is kept whole."""
    if ids is None:
        return None
    return np.ascontiguousarray(ids[tuple(w if n > 1 else slice(None) for w, n in zip(where, ids.shape))])


def _runs(chunks: tuple[tuple[int, ...], ...], plane_bytes: int) -> list[list[tuple[int, int]]]:
    """Blocks of whole chunks: per leading dim, runs `[i, j)` of chunk indices.

    Inner dims are taken whole while the block stays within BLOCK_BYTES; the first dim that
    does not fit is cut into runs of consecutive chunks up to BLOCK_BYTES (at least one),
    and dims outside it keep their own chunks. For a store this is `write_stats`' blocks:
    all layers and heads, and as many batch chunks as fit in ~128 MB."""
    runs: list[list[tuple[int, int]]] = []
    step, whole = plane_bytes, True
    for sizes in reversed(chunks):
        if not whole:
            runs.append([(i, i + 1) for i in range(len(sizes))])
        elif step * sum(sizes) <= BLOCK_BYTES:
            runs.append([(0, len(sizes))])
            step *= sum(sizes)
        else:
            cut, start, size = [], 0, 0
            for i, n in enumerate(sizes):
                if i > start and (size + n) * step > BLOCK_BYTES:
                    cut.append((start, i))
                    start, size = i, 0
                size += n
            runs.append(cut + [(start, len(sizes))])
            whole = False
    return runs[::-1]


def _lazy_arrays(data, lengths: np.ndarray | None, k: int, parallel: bool, ids: np.ndarray | None = None, files=None) -> dict:
    """Dask arrays of every output: one task per block of whole chunks (see `_runs`), which is
    handed its chunks as they are, and one `getitem` per variable and block. The graph is
    written out directly: through `dask.delayed` its ~300 small pieces took ~0.5 s to build.
    With `files` (`_ChunkFiles`: each dask chunk is one chunk file) the tasks read their chunk
    files themselves and the graph holds nothing of `data`'s."""
    import operator

    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    if len(data.chunks[-2]) > 1 or len(data.chunks[-1]) > 1:
        data = data.rechunk({data.ndim - 2: -1, data.ndim - 1: -1})  # the kernel needs whole planes
    lead_chunks = data.chunks[:-2]
    starts = [np.cumsum((0,) + c) for c in lead_chunks]
    runs = _runs(lead_chunks, data.shape[-2] * data.shape[-1] * data.dtype.itemsize)
    token = tokenize(data.name, lengths, k, parallel, ids, files is not None)
    blocks, tasks = f"fastattn-stats-{token}", {}
    for at in itertools.product(*[range(len(r)) for r in runs]):
        spans = [r[i] for r, i in zip(runs, at)]
        origin = [int(s[a]) for s, (a, _) in zip(starts, spans)]
        shape = tuple(int(s[b] - s[a]) for s, (a, b) in zip(starts, spans))
        chunks = list(itertools.product(*[range(a, b) for a, b in spans]))
        offsets = [tuple(int(s[i]) - o for s, i, o in zip(starts, index, origin)) for index in chunks]
        where = tuple(slice(o, o + n) for o, n in zip(origin, shape))
        lens = None if lengths is None else np.ascontiguousarray(lengths[where])
        if files is None:
            keys = [(data.name, *index, 0, 0) for index in chunks]
            tasks[(blocks, *at)] = (_block_of_chunks, keys, offsets, lens, shape, k, parallel, _block_ids(ids, where))
        else:
            coords = [(*index, 0, 0) for index in chunks]
            extents = [tuple(c[i] for c, i in zip(lead_chunks, index)) for index in chunks]
            tasks[(blocks, *at)] = (_block_of_files, files, coords, extents, offsets, lens, shape, k, parallel, _block_ids(ids, where))
    graph = HighLevelGraph.from_collections(blocks, tasks, dependencies=[data] if files is None else [])
    sizes = [tuple(int(starts[d][b] - starts[d][a]) for a, b in runs[d]) for d in range(len(runs))]
    trailing = {"query": data.shape[-2], "key": data.shape[-1], "rank": k}
    out = {}
    for name, (dims, dtype) in variables(tuple(f"d{i}" for i in range(len(runs))), k).items():
        extra = tuple(trailing[d] for d in dims[len(runs):])
        layer = f"{name}-{token}"
        getters = {(layer, *key[1:], *[0] * len(extra)): (operator.getitem, key, name) for key in tasks}
        layers = {**graph.layers, layer: getters}
        dependencies = {**graph.dependencies, layer: {blocks}}
        chunks = tuple(sizes) + tuple((n,) for n in extra)
        out[name] = da.Array(HighLevelGraph(layers, dependencies), layer, chunks, dtype=dtype)
    return out


def _block_of_chunks(arrays, offsets, lengths, shape, k, parallel, ids=None) -> dict[str, np.ndarray]:
    """`_block_arrays` as a dask task: the block's chunks and their offsets in it."""
    return _block_arrays(list(zip(arrays, offsets)), lengths, shape, k, parallel, ids)


def _block_of_files(files, coords, extents, offsets, lengths, shape, k, parallel, ids=None) -> dict[str, np.ndarray]:
    """`_block_arrays` as a dask task that reads the block's chunk files itself: each chunk is
    decoded into the thread's buffer (cut to `extents`, the part of it the Dataset covers, e.g.
    the committed batches of a last chunk) and handed to the kernel before the next is read."""
    pieces = ((files.read(c)[tuple(slice(0, n) for n in extent)], o) for c, extent, o in zip(coords, extents, offsets))
    return _block_arrays(pieces, lengths, shape, k, parallel, ids)


class _ChunkFiles:
    """The attention chunk files of a local store, decoded by `store.WholeChunks.read` (no zarr
    event loop, no new array per chunk), for `compute_stats`' tasks. Pickled (a distributed
    worker) it keeps the folder alone and opens the array again there."""

    def __init__(self, root: str, reader=None):
        self.root, self.reader = root, reader

    def __reduce__(self):
        return _ChunkFiles, (self.root,)

    def read(self, coords: tuple[int, ...]) -> np.ndarray:
        if self.reader is None:
            from . import store

            loc = store.as_location(self.root)
            self.reader = store.WholeChunks(loc, store.open_group(loc, "r")["attention"])
        return self.reader.read(coords)


def _chunk_files(attention: xr.DataArray) -> _ChunkFiles | None:
    """The store's chunk files under `open_store`'s attention, when `compute_stats` can read them
    itself: the DataArray is still the very dask array `open_store` made (any slice, rechunk or
    computation renames it), the store is local, its chunks hold whole planes and its codecs are
    the ones `WholeChunks.read` decodes (as for `write_stats`, `_run_local`), and each dask chunk
    is one chunk file, cut at the committed batches. Otherwise None: zarr reads them."""
    from . import store
    from .errors import StoreError
    from .store.read import DASK_KEY, FILES_KEY

    root, data = attention.encoding.get(FILES_KEY), attention.data
    if root is None or getattr(data, "name", None) != attention.encoding.get(DASK_KEY) or attention.dims != store.DIMS:
        return None
    loc = store.as_location(root)
    array = store.open_group(loc, "r")["attention"]
    try:
        reader = store.WholeChunks(loc, array)
    except StoreError:  # a codec that cannot decode here
        return None
    steps = array.chunks
    grid = tuple(tuple(min(step, size - i) for i in range(0, size, step)) for size, step in zip(data.shape, steps))
    if not _reads_chunk_files(loc, reader, array) or array.shape[1:] != data.shape[1:]:
        return None
    if data.shape[0] > array.shape[0] or data.chunks != grid:
        return None
    return _ChunkFiles(root, reader)


def _reads_chunk_files(loc, reader, attention) -> bool:
    """Whether the kernels' callers read `attention`'s chunk files themselves (`reader`, its
    `store.WholeChunks`): a local store, fastattn's codecs, and whole planes in every chunk."""
    return loc.local_path("") is not None and reader.decodes_here() and attention.chunks[-2:] == attention.shape[-2:]


def compute_stats(ds: xr.Dataset | xr.DataArray, k: int = 5, *, parallel: bool | None = None) -> xr.Dataset:
    """Every statistic of every plane (e.g. `(batch, layer, head)`), as an `xarray.Dataset`.

    Takes a store (`open_store`) or any Dataset/DataArray with `query` and `key` dims (`length`
    is used when the Dataset has it, else whole planes are valid). Lazy on dask-backed data:
    one fused kernel task per ~128 MB block of whole chunks, the same kernel and blocks as
    `write_stats`; immediate on in-memory data. On `open_store`'s attention of a local store,
    as opened (not sliced nor rechunked), each task reads its chunk files itself
    (`store.WholeChunks.read`, as `write_stats`), not through zarr: the same results.
    Variables: per query `row_sum, entropy, max_weight, distance, diag, sq_sum`; per key `col_sum`; `topk_index, topk_weight` (…,
    query, rank); per plane `entropy_mean, entropy_norm, self_attention, diag_share, peak_key,
    peak_incoming, confidence, distance_mean, row_sum_error, prev_token, next_token,
    first_token, last_token, duplicate_token, induction` and the boolean flags `uniform,
    diagonal_only, dominant_key, weak, critical_key, strong_self` (formulas:
    `fastattn.kernels.stats`). `duplicate_token` and `induction` need the Dataset's `input_id`
    (dims: some of the leading ones and `query`; -1 for no id): NaN without it.
    `parallel`: the kernel's own threads; by default on for in-memory arrays, off inside dask
    (whose threads already use the cores).
    """
    import xarray as xr

    if not 1 <= k <= 64:
        raise ValueError(f"k must be between 1 and 64, not {k}")
    attention = ds if isinstance(ds, xr.DataArray) else ds["attention"]
    length = ds["length"] if isinstance(ds, xr.Dataset) and "length" in ds else None
    input_id = ds["input_id"] if isinstance(ds, xr.Dataset) and "input_id" in ds else None
    if "query" not in attention.dims or "key" not in attention.dims:
        raise ValueError(f"attention needs 'query' and 'key' dims, this has {attention.dims}")
    files = _chunk_files(attention) if attention.chunks is not None else None
    lead = tuple(d for d in attention.dims if d not in ("query", "key"))
    attention = attention.transpose(*lead, "query", "key")
    shape = attention.shape[:-2]
    lengths = _plane_lengths(length, lead, shape)
    ids = _plane_ids(input_id, lead, attention.sizes["query"])
    if attention.chunks is None:
        values = attention.values
        arrays = _block_arrays([(values, (0,) * len(lead))], lengths, shape, k, True if parallel is None else parallel, ids)
    else:
        arrays = _lazy_arrays(attention.data, lengths, k, False if parallel is None else parallel, ids, files)
    st = _dataset(arrays, lead, k, attention.coords)
    if length is not None:
        st["length"] = length
    return st


# ---------------------------------------------------------------- the store's stats group

#: The group the statistics live in, as the store's schema names it.
GROUP = STATS.name


def _block_batches(manifest, query: int, key: int) -> int:
    """Batches per block, a multiple of the store's batch chunk (no chunk is read twice): the
    blocks `_runs` gives `compute_stats` on the same store."""
    per_batch = manifest.layers * manifest.heads * query * key * np.dtype(manifest.dtype).itemsize
    chunks = max(1, min(BLOCK_BYTES // (per_batch * manifest.batch_chunk), MAX_BLOCK_BATCHES // manifest.batch_chunk))
    return int(chunks * manifest.batch_chunk)


def _blocks(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) cut at multiples of `size`: each block covers whole stats chunks, except
    a first one that completes the chunk an earlier run left partly filled."""
    edges = [start, *range((start // size + 1) * size, stop, size), stop]
    return list(zip(edges[:-1], edges[1:]))


class _Planes:
    """Batches [b0, b1) of a store, read one chunk's heads of one layer at a time: the block
    of sequences so long that a batch's attention is larger than BLOCK_BYTES. Memory is then
    one chunk's planes, whatever the sequence length."""

    def __init__(self, attention, b0: int, b1: int):
        self.attention, self.b0, self.b1 = attention, b0, b1
        self.shape = (b1 - b0, *attention.shape[1:])

    def __iter__(self):
        step = self.attention.chunks[2]
        for b in range(self.b0, self.b1):
            for layer in range(self.shape[1]):
                for h0 in range(0, self.shape[2], step):
                    piece = self.attention[b, layer, h0 : h0 + step]
                    yield piece[np.newaxis, np.newaxis], (b - self.b0, layer, h0)


def _read_block(group, b0: int, b1: int) -> tuple:
    """Batches [b0, b1) of the store: in memory (zarr reads and decodes the chunks concurrently),
    or as `_Planes` read during the kernel when they are larger than BLOCK_BYTES; their lengths,
    and their token ids (None in a store created before it kept them)."""
    attention = group["attention"]
    ids = group["input_id"][b0:b1] if "input_id" in group else None
    if (b1 - b0) * math.prod(attention.shape[1:]) * attention.dtype.itemsize > BLOCK_BYTES:
        return _Planes(attention, b0, b1), group["length"][b0:b1], ids
    return attention[b0:b1], group["length"][b0:b1], ids


def _block_stats(block: tuple, k: int, parallel: bool) -> dict[str, np.ndarray]:
    """Every statistic of a block (batch, layer, head, query, key), and its lengths."""
    attention, length, ids = block
    shape = attention.shape[:-2]
    lengths = np.broadcast_to(length.astype(np.int64).reshape(-1, 1, 1), shape)
    pieces = attention if isinstance(attention, _Planes) else [(attention, (0, 0, 0))]
    arrays = _block_arrays(pieces, lengths, shape, k, parallel, ids)
    arrays["length"] = length
    return arrays


def _write_block(arrays: dict, st: dict, b0: int, b1: int) -> int:
    """One write per variable, all at once (see store.write_all). Every chunk is written, even
    one equal to the fill value (an all-False flag), so a missing chunk is always damage."""
    from . import store

    arrays = {name: arrays[name].with_config({"write_empty_chunks": True}) for name in st}
    store.write_all((arrays[name], slice(b0, b1), values) for name, values in st.items())
    return b1 - b0


def _stats_task(loc, b0: int, b1: int, k: int) -> int:
    """One block on a dask worker: read, compute (single-threaded: the worker's threads share
    the cores), write. Blocks cover distinct stats chunks, so workers never write the same one."""
    from . import store

    group = store.open_group(loc)
    st = _block_stats(_read_block(group, b0, b1), k, parallel=False)
    return _write_block(dict(group[GROUP].arrays()), st, b0, b1)


#: The `_FillValue` attribute xarray writes beside a float variable's NaN fill value (the float64
#: NaN, base64): with it `xr.open_zarr` masks the fill value as in a group xarray laid out.
_NAN_FILL = base64.b64encode(struct.pack("<d", math.nan)).decode()


def schema(k: int = 1) -> dict[str, tuple[tuple[str, ...], np.dtype]]:
    """Every array of the stats group as `write_stats` lays it out: name -> (dims, dtype); the
    kernel's variables, `length`, and the coordinates (0..size-1), what `fastattn check` checks."""
    from .store import DIMS

    arrays = {**variables(DIMS[:3], k), "length": (("batch",), np.dtype(np.int32))}
    arrays.update({dim: ((dim,), np.dtype(np.int32)) for dim in (*DIMS, "rank")})
    return arrays


def _create_layout(group, n: int, k: int, block: int, shape: tuple[int, ...] | None = None) -> None:
    """The stats group's arrays for `n` batches, empty, one chunk per block (replacing old ones).

    Laid out with zarr from `schema` and the attention's shape, as `xarray.Dataset.to_zarr`
    would lay out the Dataset `compute_stats` returns (dims, dtypes, fill values, attributes),
    so `open_stats` and plain `xr.open_zarr` read it; no chunk of a variable is written here
    (`_write_block` writes them all), only the coordinates. `shape`: the attention's
    `(layer, head, query, key)` when the store has none (statistics captured from a model).

    zarr creates every array (`create_array`, its metadata document and the coordinates' chunks)
    in a store in memory, all in one pass of its event loop; the files are then written to the
    store at once. Created one by one in the store itself, each array cost ~6 ms of CPU in thread
    hops and in reading the root's `zarr.json` (all the consolidated metadata) to check that no
    parent is an array: ~0.25 CPU-s for the ~35 arrays (docs/performance.md)."""
    import asyncio

    import zarr
    from zarr.core.sync import sync

    from . import store

    layers, heads, query, key = shape if shape is not None else group["attention"].shape[1:]
    sizes = {"batch": n, "layer": layers, "head": heads, "query": query, "key": key, "rank": k}
    files: dict = {}
    memory = zarr.storage.MemoryStore(files)

    def new_array(name: str, dims: tuple[str, ...], dtype: np.dtype):
        shape = tuple(sizes[d] for d in dims)
        options = {"name": f"{GROUP}/{name}", "compressors": store.compressors(), "dimension_names": dims, "chunk_key_encoding": store.CHUNK_KEYS}
        if dims == (name,):  # a coordinate: its positions, in one chunk
            return zarr.api.asynchronous.create_array(memory, data=np.arange(shape[0], dtype=dtype), chunks=shape, fill_value=0, **options)
        nan = dtype.kind == "f"
        return zarr.api.asynchronous.create_array(
            memory,
            shape=shape,
            chunks=(block, *shape[1:]),  # not min(n, block): the group grows
            dtype=dtype,
            fill_value=np.nan if nan else dtype.type(0),  # 0 or False
            attributes={"_FillValue": _NAN_FILL} if nan else None,
            **options,
        )

    async def lay_out() -> None:
        await zarr.api.asynchronous.create_group(store=memory, path=GROUP)
        await asyncio.gather(*(new_array(name, dims, dtype) for name, (dims, dtype) in schema(k).items()))
        target = group.store_path / GROUP
        await target.delete_dir()
        await asyncio.gather(*(
            (group.store_path / path).set(value) for path, value in files.items() if path.startswith(f"{GROUP}/")
        ))

    sync(lay_out())


def write_stats(
    location,
    *,
    k: int = 5,
    jobs: int | None = None,
    storage_options: dict | None = None,
    client=None,
    progress=None,
    planes: Sequence[str] = (),
) -> dict:
    """Compute statistics for the batches that have none yet and commit them to the store.

    Returns `{"computed": batches computed now, "total": batches with statistics}`, and under
    "planes" the per-plane variables named in `planes` (batch, layer, head), when this run
    computed every batch from the chunk files: the arrays just stored, so that a table need not
    read them back (else no "planes": `read_planes` reads them). A `k`
    other than the stored one, or statistics laid out by an older version (other variables),
    recompute every batch. Crash-safe like an ingest: the commit record (`store.schema.STATS`)
    moves only after the arrays are written.

    The same kernel over the same blocks as `compute_stats`, without dask: a plain loop takes
    blocks of ~128 MB; on a local store every core reads, decodes and computes chunks of the
    block (`_run_chunks`), elsewhere zarr reads the next block while the parallel kernel runs
    on this one; a writer thread stores the last one meanwhile.
    With a `dask.distributed.Client` (passed or active) the blocks run on its workers instead.
    `progress(batches done, batches to do)` is called after each block.
    """
    from . import cluster, store

    unknown = set(planes) - {name for name, (dims, _) in variables((), k).items() if not dims}
    if unknown:  # before any work: not after the blocks are computed
        raise ValueError(f"planes: {', '.join(sorted(unknown))} not among the per-plane statistics")
    loc = store.as_location(location, storage_options)
    manifest = store.checked_manifest(loc)  # before the lock, which would create a missing store's folder
    if manifest.stats_only:
        return _captured(loc, manifest, k)
    if _up_to_date(store.open_group(loc, "r"), manifest, k):  # nothing to do: no lock, no write (read-only is fine)
        return {"computed": 0, "total": manifest.committed}
    with store.writing_derived(loc, STATS) as manifest:
        done = _done(manifest, k)
        n = manifest.committed
        if n == 0:
            return {"computed": 0, "total": 0}
        client = client if client is not None else cluster.active_client()
        group = store.open_group(loc)
        _, _, _, query, key = group["attention"].shape
        block = _block_batches(manifest, query, key)
        old = group[GROUP] if GROUP in group else None
        stale = done == 0 or old is None or _layout_changed(old, query, key, k, block)
        if done >= n and not stale:
            return {"computed": 0, "total": n}
        if stale and store.derived_record(STATS, manifest):  # uncommit first: the new layout drops the old arrays
            store.uncommit_derived(manifest, STATS)
            store.commit(loc, manifest)
        done = 0 if stale else done

        def prepare() -> None:
            """The group laid out for n batches: new, or the old one grown."""
            if stale:
                _create_layout(group, n, k, block)
                return
            for name, array in old.arrays():
                if "batch" in (array.metadata.dimension_names or ()):
                    array.resize((n, *array.shape[1:]))
                    if name == "batch":
                        array[:] = np.arange(n, dtype=array.dtype)

        blocks = _blocks(done, n, block)
        kept = None
        if client is not None:
            prepare()
            _run_distributed(client, loc, blocks, k, progress, n - done)
        else:
            kept = _run_local(loc, group, blocks, k, jobs, progress, n - done, prepare, planes if done == 0 else ())
        store.commit_derived(loc, manifest, STATS, n, k=k)
    return {"computed": n - done, "total": n, **({"planes": kept} if kept else {})}


def _captured(loc, manifest, k: int) -> dict:
    """A store of statistics captured from a model has no attention to compute them from: its
    statistics are complete as captured, with the k they were captured with."""
    from .errors import StoreError

    if manifest.stats_k != k and manifest.committed:
        raise StoreError(
            f"{loc}: holds statistics only, captured with k={manifest.stats_k}, and no attention maps to compute them"
            f" again with k={k}; use k={manifest.stats_k}, or capture again"
        )
    return {"computed": 0, "total": manifest.stats_committed}


def _done(manifest, k: int) -> int:
    """Batches whose statistics are committed with this `k` (another k recomputes them all)."""
    record = derived_record(STATS, manifest)
    return record["batches"] if record and record["k"] == k else 0


def _up_to_date(group, manifest, k: int) -> bool:
    """Every committed batch has statistics with this `k`, in this version's layout."""
    if _done(manifest, k) < manifest.committed:
        return False
    if not manifest.committed:
        return True
    _, _, _, query, key = group["attention"].shape
    return GROUP in group and not _layout_changed(group[GROUP], query, key, k, _block_batches(manifest, query, key))


def _run_local(loc, group, blocks, k, jobs, progress, total, prepare, keep=()) -> dict | None:
    """Every block on this machine: straight from the chunk files (`_run_chunks`) when the store
    is local, its chunks hold whole planes and fastattn's codecs; else zarr reads block i+1 in a
    thread while the kernels run on block i (with `jobs` threads). `prepare()` lays the group
    out, on the writing thread before its first write. Returns the per-plane variables `keep`
    of every block, from the chunk files' route (None from zarr's)."""
    from . import store
    from .kernels._jit import kernel_threads

    laid_out: dict = {}

    def arrays() -> dict:
        """The group's arrays, as `prepare` laid them out (on the writing thread, after it)."""
        if not laid_out:
            laid_out.update(group[GROUP].arrays())
        return laid_out

    attention = group["attention"]
    chunks = store.WholeChunks(loc, attention)
    if _reads_chunk_files(loc, chunks, attention):
        return _run_chunks(loc, group, chunks, arrays, blocks, k, jobs, progress, total, prepare, keep)
    with kernel_threads(jobs), ThreadPoolExecutor(1) as reader:
        reading = [reader.submit(_read_block, group, *blocks[0])]

        def compute(i: int, b0: int, b1: int) -> dict:
            data = reading[0].result()
            if i + 1 < len(blocks):
                reading[0] = reader.submit(_read_block, group, *blocks[i + 1])
            return _block_stats(data, k, parallel=True)

        _write_behind(blocks, compute, lambda st, b0, b1: _write_block(arrays(), st, b0, b1), progress, total, prepare)
    return None


def _write_behind(blocks, compute, write, progress, total, prepare) -> None:
    """`compute(i, b0, b1)` block after block while a thread writes the one before it
    (`write(result, b0, b1)` -> the batches written), with the progress after each write.
    The thread runs `prepare()` just before the first write, while the second block is
    computed: during the first block the kernel loads from its cache, and the two, both
    Python holding the GIL, took turns on one core (docs/performance.md)."""

    def first_write(result, b0: int, b1: int) -> int:
        prepare()
        return write(result, b0, b1)

    written = 0
    with ThreadPoolExecutor(1) as writer:
        writing = None
        for i, (b0, b1) in enumerate(blocks):
            result = compute(i, b0, b1)
            if writing is not None:
                written += writing.result()
                if progress:
                    progress(written, total)
            writing = writer.submit(first_write if writing is None else write, result, b0, b1)
        written += writing.result()
        if progress:
            progress(written, total)


def _rows(loc, array, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a per-batch array of a local store, every other dim whole: from its
    chunk files when fastattn's codecs wrote them (`WholeChunks.read_rows`, no zarr event loop;
    C order, as zarr's), else zarr's."""
    from . import store

    reader = store.WholeChunks(loc, array)
    return reader.read_rows(stop, start) if reader.decodes_here() else array[start:stop]


def _run_chunks(loc, group, reader, arrays, blocks, k, jobs, progress, total, prepare, keep=()) -> dict | None:
    """The local loop, one chunk at a time: `jobs` threads (default: all cores) each take a
    chunk of the block, read and decode its file (`WholeChunks.read`: no zarr event loop, no
    new array per chunk) and run the kernel on it single-threaded, writing into the block's
    outputs; a writer thread stores block i-1 meanwhile, as whole chunks (`WholeChunks`),
    through zarr only for a first block that completes a chunk an earlier run left partly
    filled. Decoding and computing so overlap on every core, and two sets of outputs are
    reused from block to block: fresh memory costs the kernel its zeroing, page by page
    (docs/performance.md). Returns the per-plane variables `keep`, copied from each block's
    outputs before they are reused (None when `keep` is empty)."""
    import numba

    from . import store
    from .kernels import stats as kernel

    attention = group["attention"]
    _, layers, heads, query, key = attention.shape
    step, layer_step, head_step = attention.chunks[:3]
    first, last = blocks[0][0], blocks[-1][1]
    lengths = np.asarray(_rows(loc, group["length"], first, last), dtype=np.int64)
    ids = _rows(loc, group["input_id"], first, last) if "input_id" in group else None  # None: scores NaN
    written_here = {*variables((), k), "length"}
    writers: dict = {}  # name -> WholeChunks, once `prepare` laid the group out
    threads = max(1, min(jobs or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS))
    spare: dict[int, list] = {}  # plane count -> output buffers not in use
    kept: list[dict] = []  # per block: the variables `keep`

    def chunk_stats(out, coords, where, block_rows, lens, dest, repeats) -> None:
        piece = reader.read(coords)[block_rows, : where[1].stop - where[1].start, : where[2].stop - where[2].start]
        kernel.fill(out, piece, lens, dest, parallel=False, repeats=repeats)

    def block_stats(b0: int, b1: int):
        shape = (b1 - b0, layers, heads)
        planes = math.prod(shape)
        out = (spare.get(planes) or [None]).pop() or kernel.empty_buffers(planes, query, key, k, np.float32)
        index = np.arange(planes).reshape(shape)
        lens = np.broadcast_to(lengths[b0 - first : b1 - first, None, None], shape)
        repeats = None if ids is None else kernel.repeats(ids[b0 - first : b1 - first], shape)
        tasks = []
        for c in range(b0 // step, (b1 - 1) // step + 1):
            lo, hi = max(b0, c * step), min(b1, (c + 1) * step)
            for layer in range(0, layers, layer_step):
                for head in range(0, heads, head_step):
                    where = (slice(lo - b0, hi - b0), slice(layer, min(layer + layer_step, layers)), slice(head, min(head + head_step, heads)))
                    coords = (c, layer // layer_step, head // head_step, 0, 0)
                    tasks.append((out, coords, where, slice(lo - c * step, hi - c * step), lens[where], index[where].ravel(), repeats))
        futures = [workers.submit(chunk_stats, *task) for task in tasks]
        try:
            for future in futures:
                future.result()
        except BaseException:  # a damaged chunk, a full disk, Ctrl-C: the block's other chunks are not read
            for future in futures:
                future.cancel()
            raise
        st = kernel.named(out, shape)
        st["length"] = lengths[b0 - first : b1 - first].astype(np.int32)
        if keep:
            kept.append({name: st[name].copy() for name in keep})
        return out, st

    def write(out, st, b0: int, b1: int) -> int:
        if not writers:
            writers.update({name: store.WholeChunks(loc, array) for name, array in arrays().items() if name in written_here})
        rows = writers["length"].chunks[0]  # the stats' chunk: a block's batches
        if b0 % rows:  # completes a chunk written by an earlier run: zarr reads and merges it
            _write_block(arrays(), st, b0, b1)
        else:
            for name, values in st.items():
                writers[name].write_rows(b0, values)
        spare.setdefault(out.peak_key.shape[0], []).append(out)
        return b1 - b0

    with ThreadPoolExecutor(threads, "fastattn-stats") as workers:
        _write_behind(blocks, lambda i, b0, b1: block_stats(b0, b1), lambda done, b0, b1: write(*done, b0, b1), progress, total, prepare)
    return {name: np.concatenate([block[name] for block in kept]) for name in keep} if keep else None


def _run_distributed(client, loc, blocks, k, progress, total) -> None:
    from dask.distributed import as_completed

    futures = [client.submit(_stats_task, loc, b0, b1, k, pure=False) for b0, b1 in blocks]
    written = 0
    for future in as_completed(futures):
        written += future.result()
        if progress:
            progress(written, total)


def _layout_changed(group, query: int, key: int, k: int, block: int) -> bool:
    """A store that grew longer sequences, another k or an older layout (another set of
    variables, or other dtypes): lay the group out again."""
    from .store import DIMS

    arrays = dict(group.arrays())
    schema = variables(DIMS[:3], k)
    return (
        any(name not in arrays or arrays[name].dtype != dtype for name, (_, dtype) in schema.items())
        or arrays["entropy"].shape[-1] != query
        or arrays["col_sum"].shape[-1] != key
        or arrays["topk_index"].shape[-1] != k
        or arrays["entropy"].chunks[0] != block
    )


def open_stats(location, *, storage_options: dict | None = None) -> xr.Dataset:
    """The committed statistics of a store (its `stats` group), lazily."""
    from . import store

    return store.open_derived(store.as_location(location, storage_options), STATS)


def read_planes(
    location, names, *, layer: list[int] | None = None, head: list[int] | None = None, storage_options: dict | None = None
) -> dict[str, np.ndarray]:
    """Per-plane statistics `names` of the committed batches as NumPy arrays (batch, layer, head)
    at the `layer` and `head` positions given (None or empty: all), and those positions as
    "layer" and "head". Read with zarr alone, all at once: what the command line's table needs,
    without the seconds xarray and dask take to import. The same checks as `open_stats`."""
    from . import store

    loc = store.as_location(location, storage_options)
    _, record = store.derived_committed(loc, STATS)
    n = record["batches"]
    root = store.open_group(loc, "r")
    group = root[GROUP] if GROUP in root else None
    store.require_variables(loc, STATS, record, set(group.array_keys()) if group is not None else ())
    held = [name for name in names if name in group]  # the rest: added later, NaN in an older group
    arrays = [group[name] for name in held]
    picks = plane_picks(arrays[0].shape[1], arrays[0].shape[2], layer, head)
    selection = (slice(0, n), picks["layer"], picks["head"])
    if loc.local_path("") is not None:  # local files: read here, not through zarr (`_rows`)
        values = [picked(_rows(loc, array, 0, n), picks) for array in arrays]
    else:
        values = store.read_all((array, selection) for array in arrays)
    out = dict(zip(held, values))
    shape = (n, picks["layer"].size, picks["head"].size)
    return {**{name: out[name] if name in out else np.full(shape, np.nan) for name in names}, **picks}


def plane_picks(layers: int, heads: int, layer: list[int] | None, head: list[int] | None) -> dict[str, np.ndarray]:
    """The `layer` and `head` positions (None or empty: all) among `layers` and `heads`, checked:
    a position out of range is a one-line error."""
    from .errors import check_index

    picks = {}
    for dim, values, size in (("layer", layer, layers), ("head", head, heads)):
        positions = np.arange(size)
        picks[dim] = positions if not values else positions[[check_index(dim, v, size) for v in values]]
    return picks


def picked(values: np.ndarray, picks: dict[str, np.ndarray]) -> np.ndarray:
    """Per-plane `values` (batch, layer, head) at the picked positions, in C order as zarr
    returns them: NumPy's means sum in memory order (the last bit of the table)."""
    return np.ascontiguousarray(values[:, picks["layer"]][:, :, picks["head"]])


#: What to do about a chunk failing its checksum, by the array it belongs to (`read_errors`).
_DAMAGED_CHUNK_REMEDY = {
    "statistics": "repairing the store has fastattn stats recompute them",
    "attention": "fastattn check --repair --force drops the damaged batches; ingest their dumps again",
}


@contextlib.contextmanager
def read_errors(location, part: str = "statistics"):
    """Reading a store's `part` (its committed statistics, or its attention): a chunk that
    fails its crc32c checksum is one line naming the store and the part, not a traceback
    (`fastattn check` names the chunk)."""
    from .errors import ChecksumError, StoreError

    try:
        yield
    except (ValueError, ChecksumError) as exc:  # zarr's reads raise ValueError, the chunk files' ChecksumError
        if "checksum" not in str(exc).lower():
            raise
        raise StoreError(
            f"{location}: a chunk of the {part} fails its crc32c checksum (the bytes on disk changed);"
            f" fastattn check names it, and {_DAMAGED_CHUNK_REMEDY[part]}"
        ) from None
