"""`--repair`: fix what a check found that can be fixed, under the store's lock.

In this order: leftovers; array metadata (one atomic file each: everything after reads the
arrays through it); with `force`, the manifest rewound to before the first damaged file (the
commit point of dropping); coordinates, the arrays shrunk to what is committed or claimed,
`source`/`source_index` rebuilt, broken duplicate entries and broken derived groups
uncommitted; the manifest written; broken derived groups removed; the consolidated
metadata refreshed. Nothing committed or claimed by a file entry is dropped without `force`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
import zarr

from .. import store
from ..store import schema
from .problems import CONSOLIDATED, COORD, DROP, ENTRY, META, PAST, SOURCE, STRAY, Problem, reason

if TYPE_CHECKING:
    from .checker import Checker


def repair(location: store.Location, found: Checker, force: bool) -> bool:
    """Fix what `found` reported that can be fixed; called under the store's lock. Returns
    whether anything was done (then the store is checked again)."""
    problems = found.result.problems
    by_fix: dict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        by_fix[p.fix].append(p)
    manifest = found.manifest
    if not any(p.fix not in (None, DROP) or (p.fix == DROP and force) for p in problems):
        return False  # nothing to do: leave the store untouched
    for rel in found.stray:
        location.delete(rel)
    for p in by_fix[STRAY]:
        p.repaired = "deleted"
    if manifest is None:
        return bool(by_fix[STRAY])
    try:
        _repair_store(location, found, manifest, by_fix, force)
    except Exception as exc:  # a store broken beyond what was foreseen: say so, in one line
        found.result.problems.append(Problem("repair", f"stopped: {reason(exc)}"))
        return False
    return any(p.repaired for p in problems)


def _repair_store(location: store.Location, found: Checker, manifest: store.Manifest, by_fix, force: bool) -> None:
    for name, (meta, note) in found.restore.items():
        location.write_atomic(f"{name}/zarr.json", json.dumps(meta, indent=2).encode())
        for p in by_fix[META]:
            if p.subject == name:
                p.repaired = note
    if by_fix[DROP] and force:
        before = manifest.committed
        cut, dropped, end = _rewind(manifest, min((p.batch for p in by_fix[DROP] if p.batch is not None), default=0))
        store.write_manifest(location, manifest)  # the commit point: from here the damaged batches are gone
        note = _drop_note(cut, before, end, dropped)
        for p in by_fix[DROP]:
            p.repaired = note
    group = store.open_group(location, "r+")
    with zarr.config.set({"array.write_empty_chunks": True}):
        if not found.trusted:  # the attention's shape is wrong and cannot be restored: size nothing after it
            found.coords_to_rebuild &= {"batch"}
        if found.coords_to_rebuild and "attention" in group:
            _rebuild_coordinates(group, manifest, found.coords_to_rebuild)
            for p in by_fix[COORD]:
                p.repaired = "rebuilt"
        keep = max(manifest.committed, manifest.claimed())  # a batch a file entry claims stays
        present = schema.present(group, manifest.stats_only)
        if found.trusted and all(spec.name in group for spec in present):
            batched = [group[spec.name] for spec in present if spec.batched or spec.name == "batch"]
            if all(a.shape[0] >= keep for a in batched) and (any(a.shape[0] != keep for a in batched) or by_fix[PAST]):
                store.resize(group, batch=keep)
                for p in by_fix[PAST]:
                    p.repaired = f"arrays shrunk to the {keep} batches the manifest commits"
        if by_fix[SOURCE] and all(group[n].shape[0] >= manifest.committed for n in ("source", "source_index") if n in group):
            _rebuild_sources(location, group, manifest, found)
            for p in by_fix[SOURCE]:
                p.repaired = "rebuilt from the manifest"
        for p in by_fix[ENTRY]:
            manifest.files.pop(p.subject, None)
            p.repaired = "entry removed (the file's batches were never stored twice)"
    broken = [spec for spec in store.DERIVED.values() if by_fix[spec.name]]
    for spec in broken:
        store.uncommit_derived(manifest, spec)
    store.write_manifest(location, manifest)  # the consolidation comes once, at the end
    # derived data goes only once the manifest no longer commits it, and before the consolidation
    # (which reads every node's metadata, a broken one's too)
    for spec in broken:
        location.remove_prefix(spec.name)
        for p in by_fix[spec.name]:
            p.repaired = spec.repaired
    store.refresh_consolidated(location)
    for p in by_fix[CONSOLIDATED]:
        p.repaired = "refreshed"


def _drop_note(cut: int, before: int, end: int, dropped: list[str]) -> str:
    """What --force did, with the ranges it really dropped."""
    parts = []
    if before > cut:
        parts.append(f"committed batches {cut}..{before - 1}")
    if end > max(cut, before):
        parts.append(f"batches {max(cut, before)}..{end - 1} that file entries claimed past the commit")
    what = " and ".join(parts) or "no batch"
    note = f"--force: dropped {what} and rewound the manifest to {cut} batches"
    if dropped:
        files = f"{len(dropped)} file{'s' * (len(dropped) != 1)}"
        note += f"; ingest again to restore {files} ({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''})"
    return note


def _rewind(manifest: store.Manifest, batch: int) -> tuple[int, list[str], int]:
    """Uncommit every batch from the file that holds `batch` onwards, and remove the entries of the
    files that held them (so ingesting again restores them). Returns the new committed count, the
    files dropped, and the end of the batches they claimed."""
    files = manifest.files
    cut = min(batch, manifest.committed)
    moved = True
    while moved:  # down to the start of the file holding the cut (overlapping entries too)
        moved = False
        for entry in files.values():
            if entry.ingested and 0 <= entry.start < cut < entry.stop:
                cut, moved = entry.start, True
    dropped, end = [], cut
    for rel, entry in list(files.items()):
        if entry.start < 0 or entry.stop < 0:
            dropped.append(rel)
        elif entry.ingested and entry.stop > cut:
            dropped.append(rel)
            end = max(end, entry.stop)
    for rel in dropped:
        del files[rel]
    for rel, entry in list(files.items()):
        if entry.status is store.Status.DUPLICATE and entry.duplicate_of not in files:
            del files[rel]
    manifest.committed = cut
    for spec in store.DERIVED.values():
        store.uncommit_derived(manifest, spec, upto=cut)
    return cut, dropped, end


def _rebuild_sources(location: store.Location, group: zarr.Group, manifest: store.Manifest, found: Checker) -> None:
    committed = manifest.committed
    source = np.full(committed, "", dtype=object)
    index = np.full(committed, -1, dtype=np.int32)
    for rel, entry in manifest.files.items():
        if entry.ingested and 0 <= entry.start < entry.stop <= committed:
            source[entry.start : entry.stop] = entry.source_name(rel)
            index[entry.start : entry.stop] = np.arange(entry.stop - entry.start)
    for name, values in (("source", source.astype(str)), ("source_index", index)):
        for key in found.reader.bad_chunks.get(name, []):
            location.delete(key)  # a corrupt chunk cannot be read back for a partial write
        array = group[name]
        step = array.chunks[0]
        for start in range(0, committed, step):
            array[start : min(start + step, committed)] = values[start : start + step]


def _rebuild_coordinates(group: zarr.Group, manifest: store.Manifest, dims: set[str]) -> None:
    """Coordinates laid out again by the schema, at the attention's sizes."""
    attention = group["attention"]
    sizes = dict(zip(store.DIMS, attention.shape))
    layout = (manifest.batch_chunk, *attention.chunks[1:])
    for spec in schema.ARRAYS:
        if spec.coordinate and spec.name in dims:
            schema.create_array(group, spec, sizes, layout, manifest.dtype)
