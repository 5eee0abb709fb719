"""The store: a Zarr v3 group of the attention and its per-sample arrays, the derived groups
computed from it, and the manifest that commits them.

- `schema`: every array and derived group, once (names, dims, dtypes, fill values, chunk rule);
- `location`: a local folder or an fsspec URL behind one interface (`Location`);
- `manifest`: the typed commit record (`Manifest`, `FileEntry`, `Status`);
- `lock`: one writer at a time (`Lock`);
- `chunks`: whole chunks encoded and written here, several zarr reads or writes at once;
- `commit`: laying out and committing, the derived groups' commits;
- `read`: opening a store as committed (`open_store`).

The names below are the ones callers use: `from fastattn import store; store.open_store(...)`
(`store.commit` is the commit function; its module is `sys.modules["fastattn.store.commit"]`).
"""

from .commit import (
    AT_LAST_COMMIT,
    commit,
    commit_derived,
    create,
    derived_committed,
    derived_current,
    derived_record,
    nothing_committed,
    open_derived,
    refresh_consolidated,
    require_variables,
    uncommit_derived,
    write_manifest,
    writing_derived,
)
from .chunks import WholeChunks, read_all, write_all
from .location import LocalLocation, Location, RemoteLocation, as_location, is_url
from .lock import Lock, lock_holder, read_lock_record
from .manifest import FileEntry, Manifest, Status, now
from .read import checked_manifest, is_fastattn, open_committed, open_group, open_store, read_json, read_manifest, require_batches, require_maps
from .schema import (
    ARRAYS,
    BATCHED,
    CHUNK_KEYS,
    DERIVED,
    DIMS,
    FORMAT_VERSION,
    LOCK,
    MANIFEST,
    META,
    PER_BATCH,
    attention_chunks,
    compressors,
    present,
    resize,
    sizes_of,
    stored,
)

__all__ = [
    "ARRAYS", "as_location", "AT_LAST_COMMIT", "attention_chunks", "BATCHED", "checked_manifest", "CHUNK_KEYS", "commit",
    "commit_derived", "compressors", "create", "DERIVED", "derived_committed", "derived_current",
    "derived_record", "DIMS", "FileEntry", "FORMAT_VERSION", "is_fastattn", "is_url", "LocalLocation",
    "Location", "Lock", "LOCK", "lock_holder", "Manifest", "MANIFEST", "META", "nothing_committed", "now",
    "open_committed", "open_derived", "open_group", "open_store", "PER_BATCH", "present", "read_all", "read_json",
    "read_lock_record", "read_manifest", "refresh_consolidated", "RemoteLocation", "require_batches",
    "require_maps", "require_variables", "resize", "sizes_of", "stored", "Status", "uncommit_derived", "WholeChunks", "write_all", "write_manifest",
    "writing_derived",
]
