"""The passes over what the manifest records: every committed batch claimed by exactly one
file, and the per-sample arrays (`length`, `source`, `source_index`) agreeing with it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import dumps, store
from .problems import DROP, ENTRY, SOURCE

if TYPE_CHECKING:
    from .checker import Checker

#: The per-sample arrays these passes check value by value (the others: every chunk decodes).
CHECKED = ("length", "source", "source_index")


def check_files(c: Checker):
    """Every committed batch claimed by exactly one ingested file; duplicates point at one.
    Also sets each committed batch's row-sum tolerance from its file's recorded dtype.
    Returns the owner of each committed batch (an index into the names returned, -1: none)."""
    manifest = c.manifest
    committed = manifest.committed
    owner = np.full(committed, -1, dtype=np.int64)
    c.tolerance = np.full(committed, dumps.row_sum_tolerance(None, manifest.dtype))
    names: list[str] = []
    where = store.MANIFEST
    for rel, entry in sorted(manifest.files.items(), key=lambda item: item[1].start):
        start, stop = entry.start, entry.stop
        if start < 0 or start >= stop:
            c.add(where, f"{rel}: malformed entry {entry.to_json()!r}", fix=DROP, batch=min(committed, max(start, 0)))
            continue
        if entry.status is store.Status.DUPLICATE:
            original = manifest.files.get(entry.duplicate_of)
            if original is None or not original.ingested or (original.start, original.stop) != (start, stop):
                c.add(where, f"{rel}: {entry.status_text}, which is not an ingested file with batches {start}..{stop - 1}",
                      fix=ENTRY, subject=rel)
            continue
        if not entry.ingested:
            c.add(where, f"{rel}: unknown status {entry.status_text!r}")
            continue
        if stop > committed:  # claims batches the manifest does not commit: its batches up to there still count as its own
            c.add(where, f"{rel}: batches {start}..{stop - 1} are not within the {committed} committed",
                  fix=DROP, batch=committed)
            stop = committed
            if start >= stop:
                continue
        claimed = owner[start:stop]
        if (claimed >= 0).any():
            other = names[int(claimed[claimed >= 0][0])]
            first = start + int(np.argmax(claimed >= 0))
            c.add(where, f"{rel} and {other} both claim batch {first}", fix=DROP, batch=first)
            continue
        owner[start:stop] = len(names)
        names.append(rel)
        c.tolerance[start:stop] = dumps.row_sum_tolerance(entry.dtype, manifest.dtype)
    free = np.flatnonzero(owner < 0)
    if free.size:
        runs = np.split(free, np.flatnonzero(np.diff(free) > 1) + 1)
        shown = ", ".join(f"{r[0]}..{r[-1]}" for r in runs[:3]) + (", ..." if len(runs) > 3 else "")
        c.add(where, f"{free.size} committed batches are claimed by no file ({shown})", fix=DROP, batch=int(free[0]))
    return owner, names


def check_per_batch(c: Checker, owner: np.ndarray, names: list[str]) -> None:
    """`length` in range, `source`/`source_index` as the manifest's ranges say; keeps the lengths
    (-1 where unreadable) for the later passes."""
    manifest = c.manifest
    committed = manifest.committed
    lengths = c.lengths = np.full(committed, -1, dtype=np.int64)
    top = min(manifest.max_length, max(c.dims["query"], c.dims["key"]))
    for region, values in c.reader.values(c.arrays["length"], c.held("length"), fix=DROP, required=True):
        if values is None:
            continue
        lengths[region[0]] = values
        for i in np.flatnonzero((values < 1) | (values > top)):
            b = region[0].start + int(i)
            c.add(f"length[{b}]", f"{values[i]} outside 1..{top}", fix=DROP, batch=b, kind="length")
            lengths[b] = -1
    starts = np.array([manifest.files[rel].start for rel in names], dtype=np.int64)
    sources = [manifest.files[n].source_name(n) for n in names]
    for name in ("source", "source_index"):
        array = c.arrays.get(name)
        if array is None:
            continue
        wrong, example = 0, None
        for region, values in c.reader.values(array, c.held(name), fix=SOURCE, required=True):
            if values is None:
                continue
            own = owner[region[0]]
            batches = np.arange(region[0].start, region[0].stop)
            if name == "source":
                want = np.array([sources[o] if o >= 0 else "" for o in own], dtype=object)
                got = np.asarray(values, dtype=object)
            else:
                want = np.where(own >= 0, batches - starts[np.maximum(own, 0)], -1) if names else np.full(own.shape, -1)
                got = np.asarray(values)
            bad = np.flatnonzero((got != want) & (own >= 0))
            wrong += bad.size
            if bad.size and example is None:
                i = int(bad[0])
                example = f"batch {batches[i]} says {_plain(got[i])!r}, the manifest {_plain(want[i])!r}"
        if wrong:
            c.add(name, f"{wrong} batch{'es' * (wrong != 1)} disagree{'s' * (wrong == 1)} with the manifest's file ranges"
                  f" (first: {example})", fix=SOURCE)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value) if not isinstance(value, (int, str)) else value
