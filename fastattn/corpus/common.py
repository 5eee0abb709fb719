"""What the corpus analyses share: the attention and lengths of a store, whole samples for the
kernels, head labels, and blocks of batches for the passes over the statistics."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..kernels import divergence as _divergence


HEAD_DIMS = ("layer", "head", "query", "key")
DEFAULT_EPS = _divergence.DEFAULT_EPS


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
