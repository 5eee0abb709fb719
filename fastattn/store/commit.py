"""Writing a store: lay it out, commit; and the derived groups' commits.

The manifest is the commit record: committing is one atomic write of `manifest.json`
(a rename locally, a single PUT on object storage), after which the consolidated metadata
plain `xr.open_zarr` reads is refreshed. Whatever a writer does before its commit is
invisible to readers; a disk error on the way is one line (`nothing_committed`).

A derived group of the schema (`schema.DERIVED`) is written under `writing_derived`, committed
with `commit_derived` and read with `open_derived`, whichever way its spec records its commit;
check and repair read and undo those records with `derived_record`, `derived_current` and
`uncommit_derived`.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING

import numpy as np
import zarr

from ..errors import StoreError
from .location import Location
from .lock import Lock
from .manifest import Manifest, now
from .read import checked_manifest, open_committed, require_batches
from .schema import DIMS, FORMAT_VERSION, MANIFEST, META, Derived, attention_chunks, create_array, stored

if TYPE_CHECKING:
    import xarray as xr

AT_LAST_COMMIT = "the store still opens at its last commit"


@contextlib.contextmanager
def nothing_committed(location: Location, what: str, then: str = AT_LAST_COMMIT):
    """An OSError (a full disk, a store turned read-only) while `what` is one line saying
    that nothing was committed, and `then` what holds."""
    try:
        yield
    except OSError as exc:
        raise StoreError(f"{location}: {what} failed ({exc.strerror or exc}); nothing was committed, {then}") from None


def create(location: Location, *, layers: int, heads: int, query: int, key: int, dtype: str,
           stats_only: bool = False) -> Manifest:
    """Lay out an empty store (batch 0) from the schema, replacing the arrays an uncommitted
    crash left (array by array, so the lock file beside them stays). `stats_only`: every array
    but the attention (statistics captured straight from a model), chunked as if it were there."""
    chunks = attention_chunks(heads, query, key, np.dtype(dtype).itemsize)
    attrs = {"format_version": FORMAT_VERSION, "created": now()}
    # the root's first write already carries the attributes: a kill right after it leaves a store
    # the next ingest recognises as its own, not a foreign folder it must refuse
    group = zarr.open_group(
        location.zarr_store(), mode="a", zarr_format=3, use_consolidated=False, attributes={"fastattn": attrs}
    )
    group.attrs["fastattn"] = attrs
    group.require_group(META)
    sizes = dict(zip(DIMS, (0, layers, heads, query, key)))
    for spec in stored(stats_only):
        create_array(group, spec, sizes, chunks, dtype)
    return Manifest(layers=layers, heads=heads, max_length=max(query, key), dtype=dtype, batch_chunk=chunks[0],
                    stats_only=stats_only)


def write_manifest(location: Location, manifest: Manifest) -> None:
    """The commit point alone: one atomic manifest write."""
    with nothing_committed(location, "writing the manifest"):
        location.write_atomic(MANIFEST, manifest.to_json())


def commit(location: Location, manifest: Manifest) -> None:
    """The commit point: one atomic manifest write. Then refresh the consolidated metadata
    that plain `xr.open_zarr` reads (it may lag a crash behind; fastattn never reads it)."""
    write_manifest(location, manifest)
    refresh_consolidated(location)


def refresh_consolidated(location: Location) -> None:
    """Rewrite the consolidated metadata plain `xr.open_zarr` reads from the arrays as they are."""
    try:
        with warnings.catch_warnings():  # the manifest and lock are ours, and consolidation is not yet in the v3 spec
            warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
            zarr.consolidate_metadata(location.zarr_store())
    except OSError as exc:
        raise StoreError(
            f"{location}: committed, but refreshing the consolidated metadata failed ({exc.strerror or exc});"
            " fastattn reads the store as committed, and the next run (or fastattn check --repair) refreshes it"
        ) from None


# ---------------------------------------------------------------- derived groups


def derived_record(spec: Derived, manifest: Manifest, group=None) -> dict | None:
    """A derived group's commit record as written: `{"batches": n, param: value, ...}`; None
    when nothing is committed. An attribute record is read from `group` (the zarr group)."""
    if spec.record == "manifest":
        batches = getattr(manifest, f"{spec.name}_committed")
        return {"batches": batches, **{p: getattr(manifest, f"{spec.name}_{p}") for p in spec.params}} if batches else None
    record = dict(group.attrs).get(spec.attribute) if group is not None else None
    return record if isinstance(record, dict) and record else None


def derived_current(spec: Derived, manifest: Manifest, record: dict) -> bool:
    """Whether a record still describes the store: a manifest record covers no batch past the
    commit (it may lag: its writer extends it); an attribute record was written after the
    last ingest, for exactly the committed batches."""
    if spec.record == "manifest":
        return record["batches"] <= manifest.committed
    return (record.get("batches"), record.get("ingests")) == (manifest.committed, len(manifest.ingests))


def uncommit_derived(manifest: Manifest, spec: Derived, upto: int = 0) -> None:
    """Make a manifest record cover at most `upto` batches (0: none), for the next commit. An
    attribute record needs nothing: it is stale once the manifest commits other batches, and
    repair removes the group itself."""
    if spec.record == "manifest":
        name = f"{spec.name}_committed"
        setattr(manifest, name, min(getattr(manifest, name), upto))


@contextlib.contextmanager
def writing_derived(location: Location, spec: Derived):
    """A derived group's writer: under the store's lock, with the manifest as committed now;
    a disk error on the way is one line. The store must exist (read its `checked_manifest` first: the
    lock would create a missing store's folder)."""
    location.check_writable()
    with Lock(location, spec.command), nothing_committed(location, f"writing {spec.noun}"):
        yield checked_manifest(location)  # again: another writer may have committed meanwhile


def commit_derived(location: Location, manifest: Manifest, spec: Derived, batches: int, **params) -> None:
    """Record that the group now holds `batches` committed batches computed with `params`, as
    its spec says: in the manifest (then committed), or in the group's attribute (last)."""
    if spec.record == "manifest":
        setattr(manifest, f"{spec.name}_committed", batches)
        for name, value in params.items():
            setattr(manifest, f"{spec.name}_{name}", value)
        commit(location, manifest)
        return
    group = zarr.open_group(location.zarr_store(), path=spec.name, mode="r+", use_consolidated=False)
    group.attrs[spec.attribute] = {"batches": batches, "ingests": len(manifest.ingests), **params, "time": now()}


def derived_committed(location: Location, spec: Derived) -> tuple[Manifest, dict]:
    """The manifest and a derived group's commit record, when the group is committed and up to
    date; else a one-line StoreError (no batches, none yet, out of date)."""
    manifest = require_batches(location, checked_manifest(location))
    group = None
    if spec.record == "attribute":
        try:
            group = zarr.open_group(location.zarr_store(read_only=True), path=spec.name, mode="r", use_consolidated=False)
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
            group = None
    record = derived_record(spec, manifest, group)
    if record is None:
        raise StoreError(f"{location}: {spec.none} (run {spec.command})")
    if not derived_current(spec, manifest, record):
        raise StoreError(
            f"{location}: out of date ({spec.noun} of {record['batches']} batches, the store has {manifest.committed});"
            f" run {spec.command} again"
        )
    return manifest, record


def require_variables(location: Location, spec: Derived, record: dict, names) -> None:
    """Every variable of the group's layout is among `names` (but those added `later`), or a
    one-line StoreError."""
    missing = [name for name in spec.variables(record) if name not in names and name not in spec.later]
    if missing:
        raise StoreError(f"{location}: {spec.lack.format(names=', '.join(missing))}")


def open_derived(location: Location, spec: Derived) -> xr.Dataset:
    """The committed batches of a derived group, lazily; a StoreError when it has none, is out
    of date, or lacks a variable its layout has. A variable added `later` that an older group
    lacks reads as NaN. `attrs`: the store and the commit record."""
    import xarray as xr

    _, record = derived_committed(location, spec)
    ds = open_committed(location, {"batch": record["batches"]}, group=spec.name)  # survives a killed resize
    require_variables(location, spec, record, ds.variables)
    for name, dims in spec.variables(record).items():
        if name not in ds.variables:  # one added later: the same dims as a variable the group has
            template = next(v for v in ds.data_vars.values() if v.dims == dims)
            ds[name] = xr.full_like(template, np.nan, dtype=np.float64)
    ds.attrs = {"store": str(location), **record}
    return ds
