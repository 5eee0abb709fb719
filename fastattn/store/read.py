"""Reading a store as committed: the manifest, the zarr group, and the lazy Dataset."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import zarr

from ..errors import StoreError
from .location import Location, as_location
from .manifest import Manifest
from .schema import DIMS, FORMAT_VERSION, MANIFEST

if TYPE_CHECKING:
    import xarray as xr


def read_manifest(location: Location) -> Manifest | None:
    """The committed manifest, None before the first commit; a damaged one is a StoreError naming it."""
    data = location.read(MANIFEST)
    if data is None:
        return None
    try:
        return Manifest.from_json(data)
    except StoreError as exc:
        raise StoreError(f"{location.key_url(MANIFEST)}: {exc}") from None


def read_json(location: Location, key: str):
    """A metadata file as JSON, None when missing or not JSON."""
    data = location.read(key)
    try:
        return None if data is None else json.loads(data)
    except ValueError:
        return None


def is_fastattn(location: Location) -> bool:
    root = read_json(location, "zarr.json")
    attrs = root.get("attributes") if isinstance(root, dict) else None
    return isinstance(attrs, dict) and isinstance(attrs.get("fastattn"), dict)


def checked_manifest(location: Location) -> Manifest:
    """The manifest of an existing fastattn store, or a one-line StoreError."""
    location.check_reachable()
    if not location.exists():
        raise StoreError(f"{location}: no such store")
    if not is_fastattn(location):
        raise StoreError(f"{location}: not a fastattn store (no fastattn metadata in zarr.json)")
    manifest = read_manifest(location)
    if manifest is None:
        raise StoreError(f"{location}: store has no committed ingest yet (run fastattn ingest)")
    version = read_json(location, "zarr.json")["attributes"]["fastattn"].get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(f"{location}: store format {version}, this fastattn reads {FORMAT_VERSION}")
    if not manifest.stats_only:
        _check_attention_metadata(location, manifest)
    return manifest


def require_maps(location: Location, manifest: Manifest) -> Manifest:
    """The manifest, or a one-line StoreError for a store of statistics only (no attention maps)."""
    if manifest.stats_only:
        raise StoreError(
            f"{location}: holds statistics only (captured with stats_only), no attention maps, and this needs them;"
            " statistics, roles, compare and the entropy and batches plots work on it"
        )
    return manifest


def require_batches(location: Location, manifest: Manifest) -> Manifest:
    """The manifest, or a StoreError for a store that commits no batch (nothing to analyse)."""
    if not manifest.committed:
        raise StoreError(f"{location}: the store has no committed batches (run fastattn ingest)")
    return manifest


def _check_attention_metadata(location: Location, manifest: Manifest) -> None:
    """The attention array's metadata must agree with the manifest: an edited `data_type`
    would otherwise decode the chunks as other numbers, or fail deep inside zarr."""
    key = "attention/zarr.json"
    where = location.key_url(key)
    meta = read_json(location, key)
    if not isinstance(meta, dict) or meta.get("node_type") != "array":
        raise StoreError(f"{where}: missing or not valid Zarr array metadata")
    if meta.get("data_type") != manifest.dtype:
        raise StoreError(
            f"{where}: data_type is {meta.get('data_type')!r:.40}, but the manifest says"
            f" {manifest.dtype} (restore data_type to {manifest.dtype})"
        )
    if tuple(meta.get("dimension_names") or ()) != DIMS:
        raise StoreError(f"{where}: dimension_names are {meta.get('dimension_names')!r:.60}, not {list(DIMS)}")


def open_group(location: Location, mode: str = "r+") -> zarr.Group:
    # Never the consolidated metadata: it describes the last commit, and writers need the arrays as they are.
    return zarr.open_group(location.zarr_store(read_only=mode == "r"), mode=mode, use_consolidated=False)


def open_committed(location: Location, limits: dict[str, int], group: str | None = None) -> xr.Dataset:
    """A group's arrays cut to `limits` (dim -> committed size), even when a writer stopped
    while resizing them left the arrays at different lengths (xarray refuses those whole)."""
    import xarray as xr  # here, not at the top: ingest, stats and the writers never need xarray (a second to import)

    def committed(ds: xr.Dataset) -> xr.Dataset:
        return ds.isel({dim: slice(0, limit) for dim, limit in limits.items() if dim in ds.dims})

    zstore = location.zarr_store(read_only=True)
    try:
        return committed(xr.open_zarr(zstore, group=group, consolidated=False))
    except ValueError:  # conflicting sizes: open each array on its own, cut it, then merge
        names = list(zarr.open_group(zstore, path=group or "", mode="r", use_consolidated=False).array_keys())
        return xr.merge(
            [
                committed(xr.open_zarr(zstore, group=group, consolidated=False, drop_variables=[m for m in names if m != name]))
                for name in names
            ]
        )


#: The attention's `encoding` keys `open_store` sets on a local store: the store's folder, and
#: the name of the dask array it made over that store's chunks.
FILES_KEY, DASK_KEY = "fastattn_store_path", "fastattn_dask_name"


def open_store(
    location: str | os.PathLike | Location, *, storage_options: dict | None = None, attention: bool = True
) -> xr.Dataset:
    """The committed batches of a store as a lazy, dask-backed `xarray.Dataset`.

    Dims `batch, layer, head, query, key`; each `(query, key)` plane is one dask chunk
    (kernels need whole planes), batches are chunked as stored. A store of statistics only
    (`fastattn.live`) has no attention: a StoreError, unless `attention=False`, which takes
    the per-sample arrays alone (`length`, `source`, `token`, ...) of either kind of store.
    """
    loc = as_location(location, storage_options)
    manifest = checked_manifest(loc)
    if attention:
        require_maps(loc, manifest)
    n, size = manifest.committed, manifest.max_length
    ds = open_committed(loc, {"batch": n, "query": size, "key": size})
    if not attention and "attention" in ds:
        ds = ds.drop_vars("attention")
    ds = ds.chunk({"query": -1, "key": -1})
    if "attention" in ds and loc.local_path("") is not None:
        # Which files, and which dask array over them: `compute_stats` reads these chunk files
        # itself while the attention is still this very array (any slice or rechunk renames it).
        ds["attention"].encoding.update({FILES_KEY: loc.local_path(""), DASK_KEY: ds["attention"].data.name})
    ds.attrs = {
        "fastattn_format": FORMAT_VERSION,
        "store": str(loc),
        "committed": n,
        "max_length": size,
        "dtype": manifest.dtype,
        "files": len(manifest.files),
        "stats_only": manifest.stats_only,
    }
    return ds
