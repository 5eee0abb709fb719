"""The store's schema, written once: every array, its chunk rule, and the derived groups.

Layout of `store.zarr` (Zarr v3, opened by plain `xarray.open_zarr` too):

    attention     (batch, layer, head, query, key)  float32/float16, NaN outside valid blocks
    length        (batch,)                          int32, valid tokens of each sample
    source        (batch,)                          str, the dump it came from, relative to the common parent of its ingest's inputs
    source_index  (batch,)                          int32, position in that file's batch axis
    token         (batch, query)                    str, token strings when dumps carry them
    input_id      (batch, query)                    int32, token ids when dumps carry them, -1 elsewhere
                                                    (stores created before it have none: `Array.optional`)
    batch, layer, head, query, key                  int32 coordinates (positions)
    stats/, rollout/                                derived groups (`DERIVED`), recomputable
    kept/                                           a stats-only store's full maps of a few layers x heads
                                                    (`KEPT`: captured with the statistics, not recomputable)
    _fastattn/manifest.json                         the commit record (`manifest.py`)
    _fastattn/lock                                  present while a writer works (`lock.py`)

Ingest lays the arrays out from `ARRAYS` and grows them with `resize`; `fastattn check`
verifies every array of `ARRAYS` and every group of `DERIVED`, and repair rebuilds from them.
A new per-batch array is one `Array` line here (plus the code that fills it in ingest), marked
`optional` so that stores created before it keep opening, checking and appending; a new
derived group is one `Derived` entry (plus its writer, which commits through `commit.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

FORMAT_VERSION = 1
#: fastattn's own files live in a group of their own, so readers listing the root never meet them.
META = "_fastattn"
MANIFEST = f"{META}/manifest.json"
LOCK = f"{META}/lock"
DIMS = ("batch", "layer", "head", "query", "key")
#: The dims a later ingest grows (layers and heads are fixed when the store is created).
GROWING = ("batch", "query", "key")
#: Target uncompressed size of one chunk: a few MB, so a chunk decodes in about a millisecond.
CHUNK_BYTES = 4 << 20
MAX_BATCH_CHUNK = 256
#: The dtype of variable-length strings in `Array.dtype`.
STR = "str"


def compressors(weights: bool = False):
    """blosc lz4, then a crc32c checksum so flipped bits are found; byte shuffle for every
    array but attention weights (`weights=True`).

    Every array carries the checksum: a flipped byte in `length` or `source` must fail too,
    not decode to wrong values. Chosen by `python -m benchmarks.codecs` on the MiniLM samples
    (numbers in README): on attention weights byte shuffle saves ~1% of disk (their mantissas
    are noise; the padding compresses either way) and halves the speed of decoding, which
    every analysis pass waits on; a chunk without padding is then stored verbatim, read
    without a copy (`WholeChunks.read`). zstd-1 compresses ~10% smaller, decodes ~5x slower. The
    statistics keep shuffle: small integers and per-query floats compress 1.3-4x with it,
    and faster. Stores written otherwise read the same (blosc's header says how).
    """
    return [BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle" if weights else "shuffle"), Crc32cCodec()]


#: The chunk keys of every array fastattn lays out: `c.3.0.0` files beside the array's zarr.json,
#: not zarr's default folders `c/3/0/0`. Those made ~1,000 folders for the ~300 attention chunks
#: of 1,000 dumps and ~780 for the ~350 chunk files of their statistics, and creating folders is
#: the slow part of writing where metadata is dear (network and cluster file systems; on this
#: project's test machine 0.5–1 s of a 3.7–4.1 s ingest and ~0.4 s of a 4 s `fastattn stats`,
#: docs/performance.md). zarr, xarray and tensorstore read either from the array's metadata, and
#: an array keeps the keys it was made with when it grows (older stores: folders).
CHUNK_KEYS = {"name": "default", "separator": "."}


def attention_chunks(heads: int, query: int, key: int, itemsize: int) -> tuple[int, int, int, int, int]:
    """The attention's chunk shape: about CHUNK_BYTES at any sequence length, whole key rows.

    Short sequences: one layer's planes of all heads, for as many batches as fit. When one
    sample's layer is larger than that, heads are split, and when one plane is, queries:
    (2 layers, 16 heads, 2048 x 2048) float32 gets (1, 1, 1, 256, 2048) chunks of 2 MB, not
    one of 256 MB. Readers take the shape from the array, so stores of any chunking open.
    The first entry is the store's batch chunk, which every batched array shares.
    """
    row = key * itemsize
    plane = query * row
    if heads * plane <= CHUNK_BYTES:
        return (int(min(MAX_BATCH_CHUNK, CHUNK_BYTES // (heads * plane))), 1, heads, query, key)
    if plane <= CHUNK_BYTES:
        return (1, 1, int(CHUNK_BYTES // plane), query, key)
    return (1, 1, 1, int(max(1, CHUNK_BYTES // row)), key)


# ---------------------------------------------------------------- the arrays


@dataclass(frozen=True)
class Array:
    """One array of the store: its name, dims, dtype and fill value, and its chunk rule.

    The chunk rule: along each dim an array is chunked like the attention (so a batched
    array's chunk covers the same batches as the attention's); a coordinate is one chunk of
    its whole dim as created (at least the batch chunk), the batch coordinate the batch chunk.
    """

    name: str
    dims: tuple[str, ...]
    dtype: str | None  # None: the attention's dtype, as the manifest records it
    fill: object = None  # None: zarr's default for the dtype
    attributes: dict = field(default_factory=dict)
    coordinate: bool = False
    #: Added after stores were first written: a store created before it lacks it and stays so
    #: (readers and writers skip it there; `fastattn check` accepts its absence when no trace of
    #: it is left, i.e. neither its metadata nor a consolidated copy). New stores always have it.
    optional: bool = False

    @property
    def batched(self) -> bool:
        return not self.coordinate and self.dims[0] == "batch"

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[dim] for dim in self.dims)

    def chunks(self, attention_chunks: tuple[int, ...], sizes: dict[str, int]) -> tuple[int, ...]:
        batch_chunk = attention_chunks[0]
        if self.coordinate:
            return (batch_chunk if self.name == "batch" else max(sizes[self.name], batch_chunk),)
        return tuple(attention_chunks[DIMS.index(dim)] for dim in self.dims)

    def zarr_dtype(self, attention_dtype: str):
        return str if self.dtype == STR else self.dtype or attention_dtype

    def empty(self, shape: tuple[int, ...], attention_dtype: str) -> np.ndarray:
        """Values of this array as a writer fills them: the fill value where nothing is known."""
        if self.dtype == STR:
            return np.full(shape, "" if self.fill is None else self.fill, dtype=object)
        return np.full(shape, 0 if self.fill is None else self.fill, dtype=self.zarr_dtype(attention_dtype))


ATTENTION = Array(
    "attention",
    DIMS,
    None,
    np.nan,
    attributes={"long_name": "attention weight", "valid": "NaN outside each sample's length x length block"},
)

#: Every array of the store, in the order they are laid out and resized.
ARRAYS: tuple[Array, ...] = (
    ATTENTION,
    Array("length", ("batch",), "int32", 0),
    Array("source", ("batch",), STR),
    Array("source_index", ("batch",), "int32", -1),
    Array("token", ("batch", "query"), STR),
    Array(
        "input_id",
        ("batch", "query"),
        "int32",
        -1,
        attributes={"long_name": "token id", "valid": "-1 past each sample's length, and where its dump had no input_ids"},
        optional=True,
    ),
    *(Array(dim, (dim,), "int32", coordinate=True) for dim in DIMS),
)
BY_NAME = {spec.name: spec for spec in ARRAYS}
#: The arrays with a batch axis: attention first, then the per-sample ones.
BATCHED = tuple(spec.name for spec in ARRAYS if spec.batched)
#: The arrays with one value per sample.
PER_BATCH = tuple(spec.name for spec in ARRAYS if spec.batched and spec.dims == ("batch",))


def stored(stats_only: bool) -> tuple[Array, ...]:
    """The arrays a store holds: all of `ARRAYS`, or all but the attention in a store of
    statistics captured straight from a model (`Manifest.stats_only`)."""
    return tuple(spec for spec in ARRAYS if not (stats_only and spec is ATTENTION))


def present(group, stats_only: bool | None = None) -> tuple[Array, ...]:
    """The arrays `group` holds or must hold: those `stored` names (`stats_only` None: a group
    without attention is a store of statistics), but the optional ones it lacks."""
    stats_only = "attention" not in group if stats_only is None else stats_only
    return tuple(spec for spec in stored(stats_only) if not spec.optional or spec.name in group)


def sizes_of(group) -> tuple[int, ...]:
    """The store's `(batch, layer, head, query, key)` sizes: the attention's shape, or the
    coordinates' lengths in a store without attention."""
    if "attention" in group:
        return tuple(group["attention"].shape)
    return tuple(group[dim].shape[0] for dim in DIMS)


def create_array(group, spec: Array, sizes: dict[str, int], attention_chunks: tuple[int, ...], dtype: str):
    """Lay out `spec` in `group` (replacing what was there) at `sizes`; a coordinate gets its values."""
    options = {} if spec.fill is None else {"fill_value": spec.fill}
    if spec.attributes:
        options["attributes"] = spec.attributes
    array = group.create_array(
        spec.name,
        shape=spec.shape(sizes),
        chunks=spec.chunks(attention_chunks, sizes),
        dtype=spec.zarr_dtype(dtype),
        dimension_names=spec.dims,
        overwrite=True,
        compressors=compressors(weights=spec.name == "attention"),
        chunk_key_encoding=CHUNK_KEYS,
        **options,
    )
    if spec.coordinate and sizes[spec.name]:
        array[:] = np.arange(sizes[spec.name], dtype=np.int32)
    return array


def resize(group, *, batch: int, query: int = 0, key: int = 0) -> None:
    """Resize every array to `batch` batches; query and key only ever grow. Old values stay."""
    _, layers, heads, q0, k0 = sizes_of(group)
    sizes = dict(zip(DIMS, (batch, layers, heads, max(query, q0), max(key, k0))))
    for spec in present(group):
        array = group[spec.name]
        shape = spec.shape(sizes)
        if not spec.coordinate:
            array.resize(shape)
        elif spec.name in GROWING:
            if array.shape != shape:
                array.resize(shape)
            if shape[0]:  # always: a run killed while writing them leaves the right size with a chunk missing
                array[:] = np.arange(shape[0], dtype=np.int32)


# ---------------------------------------------------------------- the derived groups


@dataclass(frozen=True)
class Derived:
    """A group computed from the committed batches, and recomputed whenever it is wrong.

    Its commit is recorded one of two ways (`record`):
    - "manifest": fields of the manifest, `<name>_committed` (the batches it covers; it may
      lag the store, and its writer extends it incrementally) and one per parameter
      (`<name>_<param>`), committed with the manifest's atomic write (the statistics);
    - "attribute": the group's attribute `fastattn_<name>`, a mapping with `batches`, the
      number of `ingests` it was computed after and its parameters, written after the
      arrays; stale (and ignored) once another ingest commits. A new group takes this kind:
      it needs no field in the manifest.
    """

    name: str
    command: str  # what recomputes it
    record: str  # "manifest" or "attribute"
    params: tuple[str, ...]  # the parameters its record keeps (its variables may depend on them)
    layout: Callable[[dict], dict[str, tuple[str, ...]]]  # record -> every variable and its dims
    extent: Callable[[object, dict, dict], dict[str, tuple[int, int | None]]]  # see `sizes`
    noun: str  # how messages name it: "writing {noun} failed", "{noun} of 24 batches" ("statistics", "the rollout")
    them: str  # the pronoun for it, "them" or "it" (the verbs of the messages agree with it)

    # Every message about the group, made from `noun`, `them`, `command` and `record`.

    @property
    def _bare(self) -> str:
        return self.noun.removeprefix("the ")

    @property
    def _are(self) -> str:
        return "are" if self.them == "them" else "is"

    @property
    def none(self) -> str:
        """What opening it says before its first commit."""
        return f"no {self._bare} yet"

    @property
    def committed(self) -> str:
        """What a missing variable loses (a template of `batches`)."""
        return f"{self.noun} {self._are} committed for {{batches}} batches"

    @property
    def lack(self) -> str:
        """What opening it says when variables are missing (a template of `names`)."""
        lack = "lack" if self.them == "them" else "lacks"
        return (f"the {self._bare} {lack} {{names}} (written by an older fastattn, or damaged);"
                f" run {self.command} to compute {self.them} again")

    @property
    def repaired(self) -> str:
        """What repair says after uncommitting (a manifest record) or removing it."""
        done = "uncommitted" if self.record == "manifest" else "removed"
        return f"{self._bare} {done}; {self.command} recomputes {self.them}"
    #: Variables added after groups of this kind were first written: a committed group may lack
    #: them (check accepts that, readers see NaN in their place, and the writer lays the group
    #: out again and computes them on its next run).
    later: tuple[str, ...] = ()
    #: record -> {coordinate: its values}, for coordinates that name positions of another dim (the
    #: kept maps' `kept_layer`: store layer numbers) rather than count 0..n-1 as the others do.
    labels: Callable[[dict], dict[str, list[int]]] | None = None

    @property
    def attribute(self) -> str:
        return f"fastattn_{self.name}"

    def variables(self, record: dict) -> dict[str, tuple[str, ...]]:
        return self.layout(record)

    def sizes(self, manifest, record: dict, dims: dict) -> dict[str, tuple[int, int | None]]:
        """dim -> (least, most or None) for its arrays, given the manifest, the commit record and
        `dims`: the attention's sizes, plus "longest", the longest committed length it covers."""
        return self.extent(manifest, record, dims)


def _stats_layout(record: dict) -> dict[str, tuple[str, ...]]:
    from ..stats import schema  # the kernel's outputs, as write_stats lays them out (lazily: it loads Numba)

    return {name: dims for name, (dims, _) in schema().items()}


def _stats_extent(manifest, record: dict, dims: dict) -> dict:
    # laid out at the attention's size when they were computed: the store may have grown since
    query, key = dims["query"], dims["key"]
    longest = dims["longest"]
    tokens = {"query": (query, query), "key": (key, key)} if manifest.cross else {"query": (longest, query), "key": (longest, key)}
    return {"batch": (record["batches"], None), "layer": (manifest.layers,) * 2, "head": (manifest.heads,) * 2,
            "rank": (record["k"],) * 2, **tokens}


def _rollout_layout(record: dict) -> dict[str, tuple[str, ...]]:
    layout = {"rollout_incoming": ("batch", "layer", "key"), "length": ("batch",), "batch": ("batch",),
              "layer": ("layer",), "key": ("key",)}
    if record.get("keep_matrix"):
        layout.update(rollout=("batch", "layer", "query", "key"), query=("query",))
    return layout


def _rollout_extent(manifest, record: dict, dims: dict) -> dict:
    n, size = record["batches"], manifest.max_length
    return {"batch": (n, n), "layer": (manifest.layers,) * 2, "query": (size, size), "key": (size, size)}


def _kept_layout(record: dict) -> dict[str, tuple[str, ...]]:
    return {"attention": ("batch", "kept_layer", "kept_head", "query", "key"), "batch": ("batch",),
            "kept_layer": ("kept_layer",), "kept_head": ("kept_head",), "query": ("query",), "key": ("key",)}


def _kept_extent(manifest, record: dict, dims: dict) -> dict:
    tokens = {dim: (dims["longest"], dims[dim]) for dim in ("query", "key")}
    return {"batch": (record["batches"], None), "kept_layer": (len(record["layers"]),) * 2,
            "kept_head": (len(record["heads"]),) * 2, **tokens}


STATS = Derived(
    "stats", "fastattn stats", "manifest", ("k",), _stats_layout, _stats_extent,
    noun="statistics", them="them", later=("duplicate_token", "induction"),
)
ROLLOUT = Derived(
    "rollout", "fastattn rollout", "attribute", ("keep_matrix",), _rollout_layout, _rollout_extent, noun="the rollout", them="it"
)
#: The full maps a stats-only capture keeps of a few layers x heads (`fastattn.live`): a group of its
#: own, since its layer and head dims (`kept_layer`, `kept_head`: which of the store's layers and heads
#: it holds, the record's `layers` and `heads`) are not the statistics' (every layer and head).
#: Committed with the statistics, by the capture alone: a repair that removes it cannot recompute it.
KEPT = Derived(
    "kept", "a new capture with keep_layers/keep_heads", "manifest", ("layers", "heads"), _kept_layout, _kept_extent,
    noun="the kept maps", them="them",
    labels=lambda record: {"kept_layer": record["layers"], "kept_head": record["heads"]},
)
#: Every derived group, by name: `fastattn check` verifies each one that is committed.
DERIVED = {spec.name: spec for spec in (STATS, ROLLOUT, KEPT)}
