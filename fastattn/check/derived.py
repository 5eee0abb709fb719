"""The pass over a derived group of the schema (`store.DERIVED`), when it is committed: every
variable present with its dims and a shape that fits the store, every chunk within the
committed batches present and decoding, its `length` equal to the store's. Any problem has
the group's name as its fix: repair uncommits and removes it, and its command recomputes it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import zarr

from .. import store
from ..store.schema import Derived
from .problems import BROKEN, reason
from .reader import members

if TYPE_CHECKING:
    from .checker import Checker


def check_derived(c: Checker, spec: Derived) -> None:
    group = _open(c, spec)
    record = store.derived_record(spec, c.manifest, None if group is BROKEN else group)
    if group is None and record:
        c.add(spec.name, f"missing, but {spec.committed.format(batches=record['batches'])}", fix=spec.name)
    if group is None or group is BROKEN or not record or not store.derived_current(spec, c.manifest, record):
        return  # uncommitted, or older than the store: nothing trusts it (too many batches is a manifest problem)
    upto = record["batches"]
    known = c.lengths[:upto][c.lengths[:upto] > 0]
    dims = {**c.dims, "longest": int(known.max()) if known.size else 1}
    sizes = spec.sizes(c.manifest, record, dims)
    labels = spec.labels(record) if spec.labels else {}
    _check_group(c, spec, group, spec.variables(record), sizes, upto, spec.committed.format(batches=upto), labels)


def _open(c: Checker, spec: Derived):
    """The group, None when there is none, or BROKEN (a problem: zarr cannot open it)."""
    try:
        group = c.group[spec.name] if spec.name in c.group else None
    except Exception as exc:
        c.add(f"{spec.name}/zarr.json", f"unreadable ({reason(exc)})", fix=spec.name)
        return BROKEN
    if group is not None and not isinstance(group, zarr.Group):
        c.add(spec.name, "is an array, not a group", fix=spec.name)
        return BROKEN
    return group


def _check_group(c: Checker, spec: Derived, group, variables: dict, sizes: dict, upto: int, committed: str,
                 labels: dict) -> None:
    """Every variable of a derived group: present, its dims, a shape within `sizes` (dim ->
    (least, most or None)), coordinates 0..n-1 (or the values `labels` gives), and every chunk
    below `upto` batches present and decoding; its `length` equal to the store's."""
    fix = spec.name
    found = members(group, list(variables))
    for name, dims in variables.items():
        where = f"{spec.name}/{name}"
        array = found[name]
        if isinstance(array, KeyError):
            if name not in spec.later:  # one added later: a group written before it lacks it
                c.add(where, f"missing array; {committed}", fix=fix)
            continue
        if isinstance(array, Exception):
            c.add(f"{where}/zarr.json", f"unreadable array metadata ({reason(array)})", fix=fix)
            continue
        if not isinstance(array, zarr.Array):
            c.add(where, "is a group, not an array", fix=fix)
            continue
        got = tuple(array.metadata.dimension_names or ())
        if got != dims:
            c.add(where, f"dims {got}, expected {dims}", fix=fix)
            continue
        if any(not _within(s, *sizes[d]) for s, d in zip(array.shape, dims)):
            want = ", ".join(_span(*sizes[d]) for d in dims)
            c.add(where, f"shape {tuple(array.shape)}, the store needs ({want})", fix=fix)
            continue
        if name in labels:  # a coordinate naming positions of another dim: the record's
            values = c.reader.read(array, (0,), (slice(0, array.shape[0]),), fix=fix, required=True)
            if values is not None and np.asarray(values).tolist() != list(labels[name]):
                c.add(where, f"values {np.asarray(values).tolist()}, the manifest records {list(labels[name])}", fix=fix)
            continue
        if dims == (name,):  # a coordinate: a missing chunk reads as 0s, which only a 0 may be
            extent = min(upto, array.shape[0]) if name == "batch" else array.shape[0]
            for region, values in c.reader.values(array, extent, fix=fix):
                if values is not None and not np.array_equal(values, np.arange(region[0].start, region[0].stop)):
                    c.add(where, f"coordinate values are not 0..{extent - 1}", fix=fix)
                    break
            continue
        for region, values in c.reader.values(array, upto, fix=fix, required=True):
            if name != "length" or values is None:
                continue
            store_lengths = c.lengths[region[0]]
            differ = np.flatnonzero((store_lengths > 0) & (np.asarray(values) != store_lengths))
            if differ.size:
                b = region[0].start + int(differ[0])
                c.add(where, f"batch {b} has length {values[differ[0]]}, the store {store_lengths[differ[0]]}", fix=fix)
                break


def _within(size: int, least: int, most: int | None) -> bool:
    return size >= least and (most is None or size <= most)


def _span(least: int, most: int | None) -> str:
    return str(least) if least == most else f">= {least}" if most is None else f"{least}..{most}"
