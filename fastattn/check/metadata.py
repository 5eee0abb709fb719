"""The passes over metadata: the root group, the lock and leftovers, the manifest, every array
of the schema (dims, dtype, codecs), the consolidated copy, and every node's `zarr.json`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import zarr

from .. import store
from ..store import schema
from .problems import COORD, CONSOLIDATED, DROP, LOCK, META, STRAY, Problem, Stop, reason
from .reader import members

if TYPE_CHECKING:
    from .checker import Checker

#: Arrays repair rebuilds from the manifest once they exist (their metadata has no other source).
FROM_MANIFEST = ("source", "source_index")


def check_root(c: Checker) -> None:
    if not c.loc.exists():
        c.add(str(c.loc), "no such store")
        raise Stop
    raw = c.loc.read("zarr.json")
    if raw is None:
        c.add("zarr.json", "missing: not a Zarr store")
        raise Stop
    try:
        root = json.loads(raw)
    except ValueError as exc:
        c.add("zarr.json", f"not valid JSON ({exc})")
        raise Stop from None
    if not isinstance(root, dict) or root.get("zarr_format") != 3 or root.get("node_type") != "group":
        c.add("zarr.json", "not a Zarr v3 group")
        raise Stop
    attrs = (root.get("attributes") or {}).get("fastattn")
    if not isinstance(attrs, dict):
        c.add("zarr.json", "no fastattn attributes: not a fastattn store")
        raise Stop
    version = attrs.get("format_version")
    if version != store.FORMAT_VERSION:
        c.add("zarr.json", f"store format {version}, this fastattn reads {store.FORMAT_VERSION}")
        raise Stop
    c.root = root


def lock_problem(location: store.Location) -> Problem | None:
    """A lock file nobody holds: left by a writer that died (a live writer's lock is no problem)."""
    path = location.local_path(store.LOCK)
    if path is None or not location.exists(store.LOCK) or store.lock_holder(location) is not None:
        return None
    holder = store.read_lock_record(path)
    if holder is None:
        who = "a writer killed while taking it (the lock is empty or unreadable)"
    else:
        who = f"{holder.get('purpose', 'a writer')} (pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')})"
    return Problem(store.LOCK, f"stale lock left by {who}, which no longer holds it", fix=LOCK)


def check_lock(c: Checker) -> None:
    c.writer = store.lock_holder(c.loc)
    problem = lock_problem(c.loc) if c.writer is None else None
    if problem is not None:
        c.result.problems.append(problem)


def check_leftovers(c: Checker) -> None:
    c.stray = c.loc.leftovers()
    if c.stray:
        count = len(c.stray)
        where = c.stray[0] if count == 1 else f"{c.stray[0]} and {count - 1} more"
        c.add(where, f"{count} temporary file{'s' * (count > 1)} left by an interrupted write", fix=STRAY)


def read_manifest(c: Checker) -> store.Manifest | None:
    raw = c.loc.read(store.MANIFEST)
    if raw is None:
        c.add(store.MANIFEST, "missing: no ingest was ever committed (an interrupted first ingest?); run fastattn ingest")
        return None
    try:
        manifest = store.Manifest.from_json(raw)  # checks every field
    except Exception as exc:  # not JSON, not an object, a field of the wrong type...
        c.add(store.MANIFEST, f"unreadable ({reason(exc)})")
        return None
    c.claimed = manifest.claimed()
    for spec in store.DERIVED.values():  # a record in the manifest must not outrun the store
        record = store.derived_record(spec, manifest)
        if record and spec.record == "manifest" and not store.derived_current(spec, manifest, record):
            c.add(store.MANIFEST, f"{spec.committed.format(batches=record['batches'])}, but the store has {manifest.committed}",
                  fix=spec.name)
    return manifest


def schema_problem(spec: schema.Array, array, attention_dtype: str) -> str | None:
    """What is wrong with an array's dims or dtype, if anything."""
    names = tuple(array.metadata.dimension_names or ())
    if names != spec.dims:
        return f"dims {names}, expected {spec.dims}"
    kind = array.dtype.kind if hasattr(array.dtype, "kind") else "?"
    if spec.dtype == schema.STR:
        return None if kind in "TUO" else f"dtype {array.dtype}, expected a string"
    dtype = spec.dtype or attention_dtype
    return None if array.dtype == np.dtype(dtype) else f"dtype {array.dtype}, expected {dtype}"


def check_schema(c: Checker) -> None:
    """Every array of the schema: there, an array, its dims and dtype; the attention checksummed."""
    specs = schema.stored(c.manifest.stats_only)  # a store of statistics only has no attention
    found = members(c.group, [spec.name for spec in specs])
    for spec in specs:
        name, coordinate = spec.name, spec.coordinate
        array = found[name]
        if isinstance(array, Exception):
            exc = array
            unreadable = not isinstance(exc, KeyError) or c.loc.exists(f"{name}/zarr.json")
            if spec.optional and not unreadable and _consolidated(c).get(name) is None:
                continue  # a store created before this array existed: it never had one
            where, what = (f"{name}/zarr.json", f"unreadable array metadata ({reason(exc)})") if unreadable else (name, "missing array")
            if coordinate:
                c.add(where, what, fix=COORD)
                c.coords_to_rebuild.add(name)
            else:
                _restore_all(c, spec, where, what)
            continue
        problem = "is a group, not an array" if not isinstance(array, zarr.Array) else schema_problem(spec, array, c.manifest.dtype)
        if problem:
            c.add(name, problem, fix=COORD if coordinate else None)
            c.coords_to_rebuild.add(name)
            continue
        c.arrays[name] = array
    _check_own_group(c)
    if "attention" in c.arrays:
        codecs = [type(codec).__name__ for codec in c.arrays["attention"].metadata.codecs]
        if "Crc32cCodec" not in codecs:
            c.add("attention", "no crc32c checksum among its codecs: flipped bits would be read as data")
    if any(name not in c.arrays for name in ("length",) + (() if c.manifest.stats_only else ("attention",))):
        raise Stop  # nothing more can be read


def _check_own_group(c: Checker) -> None:
    """`_fastattn/zarr.json`, when there, must be a group's: every commit's consolidation reads it."""
    raw = c.loc.read(f"{store.META}/zarr.json")
    try:
        body = json.loads(raw) if raw is not None else None
    except ValueError:
        body = {}
    if body is None or (isinstance(body, dict) and (body.get("zarr_format"), body.get("node_type")) == (3, "group")):
        return
    c.add(f"{store.META}/zarr.json", "not a Zarr v3 group's metadata: committing would fail", fix=META, subject=store.META)
    c.restore[store.META] = ({"zarr_format": 3, "node_type": "group", "attributes": {}}, "rewritten as the empty group it is")


def _restore_all(c: Checker, spec: schema.Array, where: str, what: str) -> None:
    """An array whose metadata is missing or unreadable: restorable from the consolidated copy in
    the root zarr.json (chunking and codecs never change; the shape comes from the manifest)."""
    m, name = c.manifest, spec.name
    meta = _consolidated(c).get(name)
    try:
        template = _memory_array(meta)
    except Exception:
        template = None
    if template is None or schema_problem(spec, template, m.dtype) or template.chunks[0] != m.batch_chunk:
        if name in FROM_MANIFEST:  # rebuildable from the manifest, once the array exists
            c.add(where, f"{what}, and no copy of it in the consolidated metadata")
        else:
            c.add(where, f"{what}; its committed values cannot be read", fix=DROP, batch=0)
        return
    held = [size for dim, size in zip(spec.dims, template.shape) if dim in ("query", "key")]
    tokens = dict(zip(("query", "key"), m.cross)) if m.cross else dict.fromkeys(("query", "key"), max([m.max_length, *held]))
    sizes = {"batch": m.committed, "layer": m.layers, "head": m.heads, **tokens}
    c.add(where, f"{what}; the consolidated metadata has a copy", fix=META, subject=name)
    c.restore[name] = ({**meta, "shape": list(spec.shape(sizes))}, "restored from the consolidated metadata, shape from the manifest")


def _consolidated(c: Checker) -> dict:
    """The root's consolidated copy of every array's metadata, by name ({} when there is none)."""
    copy = c.root.get("consolidated_metadata")
    metadata = copy.get("metadata") if isinstance(copy, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _memory_array(meta) -> zarr.Array | None:
    """The array a metadata document describes, opened in memory (None if it is not one)."""
    if not isinstance(meta, dict):
        return None
    from zarr.core.buffer import default_buffer_prototype

    body = default_buffer_prototype().buffer.from_bytes(json.dumps(meta).encode())
    return zarr.open_array(zarr.storage.MemoryStore({"zarr.json": body}), mode="r")


def check_consolidated(c: Checker) -> None:
    consolidated = c.root.get("consolidated_metadata")
    metadata = consolidated.get("metadata") if isinstance(consolidated, dict) else None
    if not isinstance(metadata, dict):
        c.add("zarr.json", "no consolidated metadata (plain xarray.open_zarr reads it)", fix=CONSOLIDATED)
        return
    for name, array in c.arrays.items():
        entry = metadata.get(name)
        if not isinstance(entry, dict) or entry.get("shape") != list(array.shape):
            was = entry.get("shape") if isinstance(entry, dict) else "nothing"
            c.add(
                "zarr.json",
                f"consolidated metadata is stale ({name}: {was}, the array is {list(array.shape)});"
                " plain xarray.open_zarr would read the wrong shape",
                fix=CONSOLIDATED,
            )
            return


def check_hierarchy(c: Checker) -> None:
    """Every other node's metadata parses: every commit consolidates the whole hierarchy, and
    one unreadable `zarr.json` anywhere (an uncommitted group's too) would make it fail."""
    named = {p.where for p in c.result.problems}
    for key in c.loc.keys():
        if key in named or not key.endswith("/zarr.json"):
            continue
        try:
            _parse_metadata(c.loc.read(key))
        except Exception as exc:
            group = key.split("/", 1)[0]
            fix = group if group in store.DERIVED else None  # a derived group's problem: remove it
            c.add(key, f"unreadable metadata ({reason(exc)}); every commit consolidates it, and would fail", fix=fix)


def _parse_metadata(raw: bytes | None) -> None:
    """Raise unless `raw` is a Zarr v3 node's metadata, as consolidation reads it."""
    from zarr.core.metadata.v3 import ArrayV3Metadata

    body = json.loads(raw)
    if not isinstance(body, dict) or body.get("zarr_format") != 3:
        raise ValueError("not Zarr v3 metadata")
    if body.get("node_type") == "array":
        ArrayV3Metadata.from_dict(dict(body))
    elif body.get("node_type") != "group":
        raise ValueError(f"node_type {body.get('node_type')!r}")
