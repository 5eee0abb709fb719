"""Verify a store end to end, and repair what can be repaired (`fastattn check`).

`store_problems(path)` reads everything a reader would trust and reports each problem as
one `where: message` line; whatever a broken store makes a read raise becomes such a
line too, never a traceback:

- metadata: the root `zarr.json` (Zarr v3 group, fastattn attributes, format version),
  every array of the schema present with its dims and dtype, the consolidated metadata
  plain `xarray.open_zarr` reads agreeing with the arrays;
- shapes against the manifest: `attention` is `(>= committed, layers, heads, query, key)`
  with `query = key >= max_length` (or the manifest's cross-attention shape), chunked
  `(batch_chunk, 1, heads, q, k)`; the per-batch arrays and `token` match it;
- the commit record: a readable manifest; every committed batch claimed by exactly one
  file; `source` / `source_index` agreeing with the files' batch ranges; duplicates
  pointing at an ingested file; nothing past the commit (which an interrupted run leaves);
- data: every chunk of every array decodes (read chunk by chunk, never a whole array;
  a bad chunk is named by its key, e.g. `attention/c.3.2.0.0.0`); committed chunks exist
  (zarr would silently read a missing chunk as fill values); `length` in `1..max_length`;
  each sample is NaN exactly outside its `length x length` block, finite and non-negative
  inside, and its rows sum to 1 within the tolerance ingest applied to the dump it came
  from (`fastattn.dumps.row_sum_tolerance` of the dtype its manifest entry records);
- every derived group of `fastattn.store.schema.DERIVED`, when committed (`stats`:
  `stats_committed` in the manifest; `rollout`: its `fastattn_rollout` record): every
  variable present with its dims and a shape that fits the store, every chunk within the
  committed batches present and decoding, their `length` equal to the store's;
- leftovers: a lock file nobody holds (its writer died), temporary files
  (`*.partial`, `.*.tmp`) from an interrupted write.

`repair=True` (under the store's lock) removes leftovers; restores an array's metadata
(its shape from the manifest, or all of it from the consolidated copy) where the chunks
on disk show it is the metadata, not the data, that is wrong; shrinks the arrays to the
batches the manifest commits or a file entry claims; rebuilds what the manifest
determines (`source`, `source_index`, coordinates, consolidated metadata); uncommits and
removes a broken derived group (its command recomputes it); and never
drops a batch that is committed or claimed by a file entry unless `force=True`: then
every batch from the first damaged file onwards is dropped, with the entries of the
files that held them, so ingesting the same folders again restores them.

The package: `checker` (the state the passes share, their order, check-repair-check),
`metadata`, `layout`, `records`, `values` and `derived` (the passes, each a function of the
checker), `reader` (chunk by chunk), `repair`, `problems` (what is reported).
"""

from .checker import REPAIR_ROUNDS, Checker, store_problems, run_check
from .problems import (
    CONSOLIDATED,
    COORD,
    DROP,
    ENTRY,
    FORCE_HINT,
    LOCK,
    MAX_PER_KIND,
    META,
    PAST,
    ROLLOUT,
    SOURCE,
    STATS,
    STRAY,
    CheckResult,
    Problem,
)

__all__ = [
    "CONSOLIDATED", "COORD", "DROP", "ENTRY", "FORCE_HINT", "LOCK", "MAX_PER_KIND", "META", "PAST", "REPAIR_ROUNDS",
    "ROLLOUT", "SOURCE", "STATS", "STRAY", "CheckResult", "Checker", "Problem", "store_problems", "run_check",
]
