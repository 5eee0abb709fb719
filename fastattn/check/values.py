"""The passes over values: every committed sample of the attention, chunk by chunk, against
its length and the row-sum tolerance ingest applied; every chunk of the other batched arrays."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..store import schema
from .problems import DROP

if TYPE_CHECKING:
    from .checker import Checker


def check_attention(c: Checker) -> None:
    """Each committed sample NaN exactly outside its valid block, its values as ingest let them in."""
    attention = c.arrays["attention"]
    _, layers, heads, query, key = attention.shape
    held = c.held("attention")
    step = attention.chunks[0]
    q_index, k_index = np.arange(query), np.arange(key)
    for start in range(0, held, step):
        stop = min(start + step, held)
        n = c.lengths[start:stop]
        rows = np.minimum(n, query)[:, None]  # valid queries of each sample
        cols = np.minimum(n, key)[:, None]
        valid = (q_index[None, :, None] < rows[:, :, None]) & (k_index[None, None, :] < cols[:, :, None])
        for layer in range(layers):
            region = (slice(start, stop), slice(layer, layer + 1), slice(None), slice(None), slice(None))
            block = c.reader.read_region(attention, region, f"committed batches {start}..{stop - 1} of layer {layer}")
            if block is None:
                continue
            _check_values(c, block[:, 0], valid, n, start, layer, c.tolerance[start:stop])
        c.result.batches += stop - start


def _check_values(c: Checker, block, valid, lengths, start, layer, tolerance) -> None:
    """NaN exactly outside each valid block; finite, non-negative rows summing to 1 inside
    (within each sample's own `tolerance`)."""
    nan = np.isnan(block)
    inside = valid[:, None]  # (batch, 1, query, key) against (batch, head, query, key)
    outside_bad = ~nan & ~inside
    inside_bad = ~np.isfinite(block) & inside
    negative = (block < 0) & inside
    sums = np.where(inside, block, 0).sum(axis=-1, dtype=np.float64)
    row_valid = inside.any(axis=-1)
    error = np.where(row_valid, np.abs(sums - 1.0), 0.0)
    off = error > tolerance[:, None, None]
    for i in np.flatnonzero((lengths < 1) | outside_bad.any(axis=(1, 2, 3)) | inside_bad.any(axis=(1, 2, 3))
                            | negative.any(axis=(1, 2, 3)) | off.any(axis=(1, 2))):
        b = start + int(i)
        n = int(lengths[i])
        if n < 1:
            continue  # its length is already reported
        where = f"attention batch {b} layer {layer}"
        size = f"{min(n, block.shape[-2])} x {min(n, block.shape[-1])}"
        if inside_bad[i].any():
            h, q, k = np.argwhere(inside_bad[i])[0]
            c.add(where, f"NaN or Inf inside the valid {size} block (head {h}, query {q}, key {k})",
                  fix=DROP, batch=b, kind="values")
        elif outside_bad[i].any():
            h, q, k = np.argwhere(outside_bad[i])[0]
            c.add(where, f"a value outside the valid {size} block, where NaN belongs (head {h}, query {q}, key {k})",
                  fix=DROP, batch=b, kind="values")
        elif negative[i].any():
            h, q, k = np.argwhere(negative[i])[0]
            c.add(where, f"negative weight {block[i, h, q, k]:.3g} (head {h}, query {q}, key {k})",
                  fix=DROP, batch=b, kind="values")
        else:
            h, q = np.unravel_index(np.argmax(error[i]), error[i].shape)
            c.add(where, f"rows do not sum to 1 (off by {error[i, h, q]:.3g} at head {h}, query {q};"
                  f" tolerance {tolerance[i]:.3g})", fix=DROP, batch=b, kind="values")


def check_decodes(c: Checker, name: str) -> None:
    """Every chunk of a batched array's committed batches decodes (its values are the writer's);
    a per-token one (`token`, `input_id`: dims batch, query) holds its fill value past each
    sample's length, where ingest writes nothing else."""
    spec = schema.BY_NAME[name]
    fill = spec.empty((1,), c.manifest.dtype)[0] if spec.dims == ("batch", "query") else None
    fill = fill.item() if isinstance(fill, np.generic) else fill
    for region, values in c.reader.values(c.arrays[name], c.held(name), fix=DROP):
        if values is None or fill is None:
            continue
        rows, cols = region[0], region[1]
        n = c.lengths[rows]
        past = (np.arange(cols.start, cols.stop)[None, :] >= n[:, None]) & (n >= 0)[:, None]  # -1: length unknown
        bad = past & (np.asarray(values) != fill)
        for i in np.flatnonzero(bad.any(axis=1)):
            k = int(np.flatnonzero(bad[i])[0])
            b = rows.start + int(i)
            value = values[i, k].item() if isinstance(values[i, k], np.generic) else values[i, k]
            c.add(f"{name} batch {b}", f"{value!r} at position {cols.start + k}, past the sample's length {n[i]},"
                  f" where {fill!r} belongs", fix=DROP, batch=b, kind="values")
