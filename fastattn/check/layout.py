"""The passes over shapes: every batched array's shape and chunk grid against the manifest
(restorable when the chunks on disk show the metadata is what is wrong), and the coordinates."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from .. import store
from ..store import schema
from .problems import COORD, DROP, META, PAST, Stop

if TYPE_CHECKING:
    from .checker import Checker


def check_shapes(c: Checker) -> None:
    """Every batched array's shape and chunking against the manifest."""
    m = c.manifest
    if m.stats_only:
        _check_without_attention(c)
        return
    n, bc = m.committed, m.batch_chunk
    attention = c.arrays["attention"]
    b, layers, heads, query, key = attention.shape
    cq, ck = attention.chunks[3:]
    want_l, want_h = (m.layers, m.heads) if n else (layers, heads)
    if m.cross:
        want_q, want_k = m.cross
    else:  # self-attention: square, and at least the longest committed sample (a killed run may have grown it)
        want_q = want_k = max(m.max_length, query, key)
    # schema.attention_chunks: whole planes of all heads, or heads split, or a plane's queries split
    ch = attention.chunks[2]
    grid = tuple(attention.chunks[:2]) == (bc, 1) and 1 <= ch <= want_h and (
        (cq, ck) == (want_q, want_k) if m.cross else (cq == ck or (ch == 1 and cq < ck))
    )
    if not grid:
        planes = f"{want_q}, {want_k}" if m.cross else "n, n; or heads or queries split"
        c.add("attention", f"chunks {tuple(attention.chunks)}; the manifest's layout is ({bc}, 1, {want_h}, {planes})")
        c.unreadable.add("attention")
    target = [b, want_l, want_h, want_q, want_k]
    wrong = []
    if (layers, heads) != (want_l, want_h):
        wrong.append(f"has {layers} layers x {heads} heads; the manifest says {want_l} x {want_h}")
    if (query, key) != (want_q, want_k):
        wrong.append(f"holds {query} x {key} tokens (query x key); the manifest needs {want_q} x {want_k}")
    # restorable when the chunks on disk show the metadata is what is wrong: the chunk grid is
    # the manifest's, and the last layer the manifest has holds data
    evident = grid and (not n or layers >= want_l or c.reader.exists(attention, (0, want_l - 1, 0, 0, 0)))
    c.trusted = grid and (not wrong or evident)  # else nothing may be sized after the attention
    if wrong:
        c.unreadable.add("attention")
        if not evident and (layers, heads) != (want_l, want_h):
            c.add("attention", "; ".join(wrong))
            raise Stop  # the manifest and the arrays disagree about what a batch is
        c.add("attention", "; ".join(wrong), fix=META if evident else None, subject="attention")
    c.dims = dict(zip(store.DIMS[1:], target[1:] if evident else attention.shape[1:]))
    short = _short_of_commit(c, "attention", attention, grid)
    target[0] = n if short else b
    if (wrong and evident) or short:
        _restore_shape(c, "attention", attention, target)
    layout = (bc, *attention.chunks[1:])  # the grid the other batched arrays share with the attention
    for spec in schema.ARRAYS:
        if spec.batched and spec is not schema.ATTENTION and spec.name in c.arrays:
            _check_batched(c, spec, layout)
    _past_commit(c, "attention")


def _past_commit(c: Checker, where: str) -> None:
    """Batches past the last commit, left by an interrupted run (repair shrinks the arrays)."""
    n = c.manifest.committed
    longest = max(a.shape[0] for name, a in c.arrays.items() if name in store.BATCHED or name == "batch")
    keep = max(n, c.claimed)  # batches a file entry claims are never cut without --force
    if longest > keep and c.writer is None:
        c.add(where, f"{longest - keep} batches past the last commit ({n} committed), left by an interrupted run", fix=PAST)


def _check_without_attention(c: Checker) -> None:
    """A store of statistics captured from a model (`Manifest.stats_only`): no attention, so the
    dims are the manifest's, and the batched arrays share the batch chunk (`token` keeps the
    query chunk it was laid out with: the attention's, had there been one)."""
    m = c.manifest
    token = c.arrays.get("token")
    size = max(m.max_length, token.shape[1] if token is not None else 0)  # a killed run may have grown it
    c.dims = {"layer": m.layers, "head": m.heads, "query": size, "key": size}
    rows = token.chunks[1] if token is not None else m.max_length
    layout = (m.batch_chunk, 1, m.heads, rows, rows)
    for spec in schema.ARRAYS:
        if spec.batched and spec is not schema.ATTENTION and spec.name in c.arrays:
            _check_batched(c, spec, layout)
    _past_commit(c, "length")


def _check_batched(c: Checker, spec: schema.Array, layout: tuple[int, ...]) -> None:
    """A batched array besides the attention: chunked on the attention's grid, as long as the
    manifest needs along its other dims, holding every committed batch."""
    name, array, n = spec.name, c.arrays[spec.name], c.manifest.committed
    want = spec.chunks(layout, {})
    grid = tuple(array.chunks) == want
    if not grid:
        c.add(name, f"chunks {tuple(array.chunks)}; the manifest's layout is {want}")
        c.unreadable.add(name)
    narrow = {}
    for dim, width in zip(spec.dims[1:], array.shape[1:]):
        need = _needed(c, dim, width)
        if need is not None:
            narrow[dim] = need
            c.add(name, f"has {width} {dim} positions; the manifest needs {need}", fix=META if grid else None, subject=name)
    short = _short_of_commit(c, name, array, grid)
    if grid and (narrow or short):
        rest = [c.dims[dim] if dim in narrow else width for dim, width in zip(spec.dims[1:], array.shape[1:])]
        _restore_shape(c, name, array, (n if short else array.shape[0], *rest))


def _needed(c: Checker, dim: str, width: int) -> int | None:
    """The size the manifest needs along `dim` when an array's `width` falls short of it, else None:
    a cross-attention store's exact query or key size; at least the longest sample of a
    self-attention store (a killed run may have grown it); exactly its layers and heads."""
    m = c.manifest
    if dim in ("query", "key"):
        if m.cross:
            need = m.cross[("query", "key").index(dim)]
            return need if width != need else None
        return m.max_length if m.committed and width < m.max_length else None
    need = m.layers if dim == "layer" else m.heads
    return need if m.committed and width != need else None


def _short_of_commit(c: Checker, name: str, array, grid_ok: bool) -> bool:
    """An array holding fewer batches than committed: a restorable shape when the chunk of the last
    committed batch is on disk (the metadata lost them), else committed data that is gone."""
    n = c.manifest.committed
    if array.shape[0] >= n:
        return False
    last = ((n - 1) // array.chunks[0], *([0] * (array.ndim - 1)))
    if grid_ok and c.reader.exists(array, last):
        c.add(name, f"holds {array.shape[0]} batches but {n} are committed: its metadata lost them,"
              " their chunks are on disk", fix=META, subject=name)
        return True
    c.add(name, f"holds {array.shape[0]} batches but {n} are committed: committed data is missing",
          fix=DROP, batch=array.shape[0])
    return False


def _restore_shape(c: Checker, name: str, array, shape) -> None:
    meta = json.loads(c.loc.read(f"{array.path}/zarr.json"))
    meta["shape"] = [int(s) for s in shape]
    c.restore[name] = (meta, f"shape restored to {tuple(int(s) for s in shape)} from the manifest (the chunks were intact)")


def check_coordinates(c: Checker) -> None:
    attention = c.arrays.get("attention", c.arrays["length"])  # the batch axis: a store of statistics has no attention
    n = c.manifest.committed
    for spec in schema.ARRAYS:
        dim = spec.name
        array = c.arrays.get(dim) if spec.coordinate else None
        if array is None:
            continue
        if dim == "batch":  # past the commit it only has to follow the arrays, which --repair shrinks
            size = array.shape[0] if array.shape[0] >= n else attention.shape[0]
        elif not c.trusted:
            continue  # the attention's shape is reported; a coordinate cannot be judged against it
        else:
            size = c.dims[dim]
        if array.shape != (size,):
            if c.writer is None:  # a writer resizes the coordinates with the arrays
                c.add(dim, f"coordinate of length {array.shape[0]}, the dimension has {size}", fix=COORD)
                c.coords_to_rebuild.add(dim)
            continue
        upto = n if dim == "batch" else None  # past the commit is a writer's business
        for region, values in c.reader.values(array, upto, fix=COORD):
            if values is None:
                c.coords_to_rebuild.add(dim)
            elif not np.array_equal(values, np.arange(region[0].start, region[0].stop)):
                c.add(dim, f"coordinate values are not 0..{(size if upto is None else min(size, upto)) - 1}", fix=COORD)
                c.coords_to_rebuild.add(dim)
                break
