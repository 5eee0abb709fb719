"""Verify a store end to end, and repair what can be repaired (`fastattn check`).

`check_store(path)` reads everything a reader would trust and reports each problem as
one `where: message` line:

- metadata: the root `zarr.json` (Zarr v3 group, fastattn attributes, format version),
  every array of the schema present with its dims and dtype, the consolidated metadata
  plain `xarray.open_zarr` reads agreeing with the arrays;
- the commit record: a readable manifest; arrays holding at least the committed batches
  (and nothing past them, which an interrupted run leaves); `length` in `1..max_length`;
  every committed batch claimed by exactly one file; `source` / `source_index` agreeing
  with the files' batch ranges; duplicates pointing at an ingested file;
- data: every chunk of every array decodes (read chunk by chunk, never a whole array;
  a bad chunk is named by its key, e.g. `attention/c/3/2/0/0/0`); committed chunks exist;
  each sample is NaN exactly outside its `length x length` block, finite and non-negative
  inside, and its rows sum to 1 within the ingest tolerance
  (`fastattn.dumps.ROW_SUM_TOLERANCE` for the store's dtype);
- the `stats` group: no more batches committed than the store has, and its chunks decode;
- leftovers: a lock file nobody holds (its writer died), temporary files
  (`*.partial`, `.*.tmp`) from an interrupted write.

`repair=True` (under the store's lock) removes leftovers, shrinks the arrays to the
committed batches, rebuilds what the manifest determines (`source`, `source_index`,
coordinates, consolidated metadata), uncommits statistics that are broken (recomputed by
`fastattn stats`), and never deletes a committed batch unless `force=True`: then every
batch from the first damaged file onwards is dropped and the manifest rewound, so
ingesting the same folders again restores them.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import zarr

from . import dumps, store
from .errors import StoreError

#: At most this many lines per kind of problem (bad values, bad chunks...); the rest are counted.
MAX_PER_KIND = 10

# What --repair can do about a problem.
LOCK = "lock"  # remove a stale lock
STRAY = "stray"  # delete temporary files
PAST = "past"  # shrink the arrays to the committed batches
SOURCE = "source"  # rebuild source / source_index from the manifest
COORD = "coord"  # rebuild a coordinate array
CONSOLIDATED = "consolidated"  # refresh the consolidated metadata
STATS = "stats"  # uncommit the statistics (fastattn stats recomputes them)
ENTRY = "entry"  # remove a manifest entry that stores nothing (a broken duplicate record)
DROP = "drop"  # committed data is damaged: only --force drops it

STR = "str"
#: name -> (dims, dtype); the attention dtype is the manifest's.
SCHEMA = {
    "attention": (store.DIMS, None),
    "length": (("batch",), "int32"),
    "source": (("batch",), STR),
    "source_index": (("batch",), "int32"),
    "token": (("batch", "query"), STR),
    **{dim: ((dim,), "int32") for dim in store.DIMS},
}
BATCHED = ("attention", "length", "source", "source_index", "token")
FORCE_HINT = "; --repair --force drops the batches from its file onwards"


@dataclass
class Problem:
    """One thing wrong with a store: where (a file, array or chunk key) and what."""

    where: str
    message: str
    repaired: str = ""  # what --repair did about it; empty while it remains
    fix: str | None = field(default=None, repr=False, compare=False)
    batch: int | None = field(default=None, repr=False, compare=False)  # first committed batch it affects
    subject: str | None = field(default=None, repr=False, compare=False)  # the manifest entry it is about

    def __str__(self) -> str:
        line = f"{self.where}: {self.message}"
        return f"{line} [repaired: {self.repaired}]" if self.repaired else line


@dataclass
class CheckResult:
    """Every problem found (repaired ones say how), and what was read to find them."""

    store: str
    problems: list[Problem] = field(default_factory=list)
    committed: int = 0
    chunks: int = 0  # chunks decoded
    batches: int = 0  # committed batches whose values were checked

    @property
    def remaining(self) -> list[Problem]:
        return [p for p in self.problems if not p.repaired]

    @property
    def ok(self) -> bool:
        return not self.remaining

    def summary(self) -> str:
        read = f"{self.committed} committed batches, {self.chunks} chunks decoded"
        if not self.problems:
            return f"{self.store}: ok ({read}, every value checked)"
        repaired = len(self.problems) - len(self.remaining)
        count = f"{len(self.problems)} problem{'s' * (len(self.problems) != 1)}"
        text = f"{self.store}: {count} ({repaired} repaired, {len(self.remaining)} remaining; {read})"
        if self.remaining and all(p.fix == DROP for p in self.remaining):
            return text + "; --repair --force drops the damaged batches"
        if any(p.fix not in (None, DROP) for p in self.remaining):
            return text + "; --repair fixes some of them"
        return text


def check_store(path, *, repair: bool = False, force: bool = False, storage_options: dict | None = None) -> list[Problem]:
    """Check a store (see the module docstring); with `repair`, fix what can be fixed.

    Returns every problem found; the ones `repair` fixed carry what was done in
    `.repaired`. `force` (with `repair`) drops damaged committed batches.
    """
    return run_check(path, repair=repair, force=force, storage_options=storage_options).problems


def run_check(path, *, repair: bool = False, force: bool = False, storage_options: dict | None = None) -> CheckResult:
    """`check_store` with the counts of what was read (for the CLI's summary line)."""
    location = path if isinstance(path, store.Location) else store.Location(path, storage_options)
    if not repair:
        return _Checker(location).run()
    first = _Checker(location, only_header=True).run()
    if first.problems:  # not a fastattn store: nothing to repair, and nothing to lock
        return first
    stale = _lock_problem(location)
    location.check_writable()
    with store.Lock(location, "fastattn check --repair"):
        found = _Checker(location, own_lock=True)
        result = found.run()
        _repair(location, found, force)
        after = _Checker(location, own_lock=True).run()
    problems = ([stale] if stale else []) + result.problems
    if stale:
        stale.repaired = "taken over and removed"
    for p in problems:
        if p.repaired and any(_same(p, q) for q in after.problems):
            p.repaired = ""  # the repair did not take
    problems += [q for q in after.problems if not any(_same(p, q) for p in problems)]
    after.problems = problems
    return after


def _same(a: Problem, b: Problem) -> bool:
    return a.where == b.where and a.message == b.message


class _Stop(Exception):
    """Nothing further can be checked."""


# ---------------------------------------------------------------- checking


class _Checker:
    def __init__(self, location: store.Location, *, own_lock: bool = False, only_header: bool = False):
        self.loc = location
        self.own_lock = own_lock
        self.only_header = only_header
        self.result = CheckResult(store=str(location))
        self.counts: dict[str, int] = defaultdict(int)
        self.hidden: dict[str, Problem] = {}
        self.manifest: store.Manifest | None = None
        self.group: zarr.Group | None = None
        self.arrays: dict[str, zarr.Array] = {}
        self.writer: dict | None = None  # the lock's holder, when a live writer works
        self.stray: list[str] = []
        self.bad_chunks: dict[str, list[str]] = defaultdict(list)
        self.coords_to_rebuild: set[str] = set()

    # -- bookkeeping

    def add(self, where: str, message: str, *, fix=None, batch=None, kind=None, subject=None):
        if fix == DROP and FORCE_HINT not in message:
            message += FORCE_HINT
        problem = Problem(where, message, fix=fix, batch=batch, subject=subject)
        if kind is not None:
            self.counts[kind] += 1
            if self.counts[kind] > MAX_PER_KIND:
                hidden = self.hidden.setdefault(kind, Problem(where, "", fix=fix, batch=batch))
                if batch is not None:
                    hidden.batch = batch if hidden.batch is None else min(hidden.batch, batch)
                return
        self.result.problems.append(problem)

    def run(self) -> CheckResult:
        try:
            self._check()
        except _Stop:
            pass
        for kind, hidden in self.hidden.items():
            more = self.counts[kind] - MAX_PER_KIND
            hidden.where = kind
            hidden.message = f"{more} more problems of this kind (only the first {MAX_PER_KIND} are listed)"
            self.result.problems.append(hidden)
        return self.result

    # -- the passes

    def _check(self) -> None:
        self._check_root()
        if self.only_header:
            return
        if not self.own_lock:
            self._check_lock()
        if self.writer is None:
            self._check_stray()
        manifest = self.manifest = self._read_manifest()
        if manifest is None:
            raise _Stop  # nothing committed (or no record of it): nothing else can be trusted or compared
        try:
            self.group = store.open_group(self.loc, "r")
        except Exception as exc:  # a zarr.json that zarr cannot read
            self.add("zarr.json", f"zarr cannot open the store ({_reason(exc)})")
            raise _Stop from None
        self._check_schema()
        self.result.committed = manifest.committed
        self._check_shapes(manifest)
        self._check_coordinates()
        if self.writer is None:
            self._check_consolidated()
        owner, names = self._check_files(manifest)
        lengths = self._check_per_batch(manifest, owner, names)
        self._check_attention(manifest, lengths)
        self._check_tokens(manifest)
        self._check_stats(manifest)

    def _check_root(self) -> None:
        if not self.loc.exists():
            self.add(str(self.loc), "no such store")
            raise _Stop
        raw = self.loc.read("zarr.json")
        if raw is None:
            self.add("zarr.json", "missing: not a Zarr store")
            raise _Stop
        try:
            root = json.loads(raw)
        except ValueError as exc:
            self.add("zarr.json", f"not valid JSON ({exc})")
            raise _Stop from None
        if not isinstance(root, dict) or root.get("zarr_format") != 3 or root.get("node_type") != "group":
            self.add("zarr.json", "not a Zarr v3 group")
            raise _Stop
        attrs = (root.get("attributes") or {}).get("fastattn")
        if not isinstance(attrs, dict):
            self.add("zarr.json", "no fastattn attributes: not a fastattn store")
            raise _Stop
        version = attrs.get("format_version")
        if version != store.FORMAT_VERSION:
            self.add("zarr.json", f"store format {version}, this fastattn reads {store.FORMAT_VERSION}")
            raise _Stop
        self.root = root

    def _check_lock(self) -> None:
        self.writer = store.lock_holder(self.loc)
        problem = _lock_problem(self.loc) if self.writer is None else None
        if problem is not None:
            self.result.problems.append(problem)

    def _check_stray(self) -> None:
        if self.loc.remote:
            return
        for dirpath, _dirs, files in os.walk(self.loc.root):
            for name in files:
                if name.endswith(".partial") or (name.startswith(".") and name.endswith(".tmp")):
                    self.stray.append(os.path.relpath(os.path.join(dirpath, name), self.loc.root).replace(os.sep, "/"))
        if self.stray:
            self.stray.sort()
            count = len(self.stray)
            where = self.stray[0] if count == 1 else f"{self.stray[0]} and {count - 1} more"
            self.add(where, f"{count} temporary file{'s' * (count > 1)} left by an interrupted write", fix=STRAY)

    def _read_manifest(self) -> store.Manifest | None:
        raw = self.loc.read(store.MANIFEST)
        if raw is None:
            self.add(store.MANIFEST, "missing: no ingest was ever committed (an interrupted first ingest?); run fastattn ingest")
            return None
        try:
            manifest = store.Manifest.from_json(raw)
        except (ValueError, TypeError, StoreError) as exc:
            self.add(store.MANIFEST, f"unreadable ({_reason(exc)})")
            return None
        counts = ("committed", "layers", "heads", "max_length", "batch_chunk", "stats_committed", "stats_k")
        for name in counts:
            value = getattr(manifest, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                self.add(store.MANIFEST, f"'{name}' is {value!r}, not a count")
                return None
        if manifest.dtype not in ("float32", "float16"):
            self.add(store.MANIFEST, f"dtype {manifest.dtype!r}; expected float32 or float16")
            return None
        if manifest.batch_chunk < 1 or (manifest.committed and min(manifest.layers, manifest.heads, manifest.max_length) < 1):
            self.add(store.MANIFEST, "batch_chunk, layers, heads and max_length must be at least 1")
            return None
        if not isinstance(manifest.files, dict):
            self.add(store.MANIFEST, "'files' is not a mapping")
            return None
        if manifest.stats_committed > manifest.committed:
            self.add(
                store.MANIFEST,
                f"statistics committed for {manifest.stats_committed} batches, but the store has {manifest.committed}",
                fix=STATS,
            )
        return manifest

    def _check_schema(self) -> None:
        dtype_of = {"attention": self.manifest.dtype}
        for name, (dims, dtype) in SCHEMA.items():
            dtype = dtype_of.get(name, dtype)
            fix = COORD if name in store.DIMS else None
            try:
                array = self.group[name]
            except KeyError:
                self.add(name, "missing array", fix=fix)
                self.coords_to_rebuild.add(name)
                continue
            except Exception as exc:
                self.add(f"{name}/zarr.json", f"unreadable array metadata ({_reason(exc)})", fix=fix)
                self.coords_to_rebuild.add(name)
                continue
            if not isinstance(array, zarr.Array):
                self.add(name, "is a group, not an array", fix=fix)
                self.coords_to_rebuild.add(name)
                continue
            names = tuple(array.metadata.dimension_names or ())
            if names != dims:
                self.add(name, f"dims {names}, expected {dims}", fix=fix)
                self.coords_to_rebuild.add(name)
                continue
            kind = array.dtype.kind if hasattr(array.dtype, "kind") else "?"
            if (dtype == STR and kind not in "TUO") or (dtype not in (None, STR) and array.dtype != np.dtype(dtype)):
                self.add(name, f"dtype {array.dtype}, expected {'a string' if dtype == STR else dtype}", fix=fix)
                self.coords_to_rebuild.add(name)
                continue
            self.arrays[name] = array
        if "attention" in self.arrays:
            codecs = [type(c).__name__ for c in self.arrays["attention"].metadata.codecs]
            if "Crc32cCodec" not in codecs:
                self.add("attention", "no crc32c checksum among its codecs: flipped bits would be read as data")
        if any(name not in self.arrays for name in ("attention", "length")):
            raise _Stop  # nothing more can be read

    def _check_shapes(self, manifest: store.Manifest) -> None:
        attention = self.arrays["attention"]
        _, layers, heads, query, key = attention.shape
        committed = manifest.committed
        if committed and (layers, heads) != (manifest.layers, manifest.heads):
            self.add("attention", f"has {layers} layers x {heads} heads; the manifest says {manifest.layers} x {manifest.heads}")
            raise _Stop
        if committed and manifest.max_length > max(query, key):
            self.add("attention", f"holds {query} x {key} tokens, but the manifest's longest sample has {manifest.max_length}")
            raise _Stop
        if attention.chunks[0] != manifest.batch_chunk or attention.chunks[1] != 1:
            self.add(
                "attention",
                f"chunks {attention.chunks}; writers expect {manifest.batch_chunk} batches and one layer per chunk",
            )
        for name in BATCHED:
            array = self.arrays.get(name)
            if array is not None and array.shape[0] < committed:
                self.add(
                    name,
                    f"holds {array.shape[0]} batches but {committed} are committed: committed data is missing",
                    fix=DROP,
                    batch=array.shape[0],
                )
        token = self.arrays.get("token")
        if token is not None and token.shape[1] != query:
            self.add("token", f"has {token.shape[1]} query positions, attention {query}")
        longest = max(a.shape[0] for n, a in self.arrays.items() if n in BATCHED or n == "batch")
        if longest > committed and self.writer is None:
            self.add(
                "attention",
                f"{longest - committed} batches past the last commit ({committed} committed), left by an interrupted run",
                fix=PAST,
            )

    def _check_coordinates(self) -> None:
        attention = self.arrays["attention"]
        for axis, dim in enumerate(store.DIMS):
            array = self.arrays.get(dim)
            if array is None:
                continue
            size = attention.shape[axis]
            if dim == "batch":  # past the commit it only has to follow the arrays, which --repair shrinks
                size = array.shape[0] if array.shape[0] >= self.manifest.committed else size
            if array.shape != (size,):
                if self.writer is None:  # a writer resizes the coordinates with the arrays
                    self.add(dim, f"coordinate of length {array.shape[0]}, the dimension has {size}", fix=COORD)
                    self.coords_to_rebuild.add(dim)
                continue
            upto = self.manifest.committed if dim == "batch" else None  # past the commit is a writer's business
            for region, values in self._values(array, upto, fix=COORD):
                if values is None:
                    self.coords_to_rebuild.add(dim)
                elif not np.array_equal(values, np.arange(region[0].start, region[0].stop)):
                    self.add(dim, f"coordinate values are not 0..{(size if upto is None else min(size, upto)) - 1}", fix=COORD)
                    self.coords_to_rebuild.add(dim)
                    break

    def _check_consolidated(self) -> None:
        consolidated = self.root.get("consolidated_metadata")
        metadata = consolidated.get("metadata") if isinstance(consolidated, dict) else None
        if not isinstance(metadata, dict):
            self.add("zarr.json", "no consolidated metadata (plain xarray.open_zarr reads it)", fix=CONSOLIDATED)
            return
        for name, array in self.arrays.items():
            entry = metadata.get(name)
            if not isinstance(entry, dict) or entry.get("shape") != list(array.shape):
                was = entry.get("shape") if isinstance(entry, dict) else "nothing"
                self.add(
                    "zarr.json",
                    f"consolidated metadata is stale ({name}: {was}, the array is {list(array.shape)});"
                    " plain xarray.open_zarr would read the wrong shape",
                    fix=CONSOLIDATED,
                )
                return

    def _check_files(self, manifest: store.Manifest):
        """Every committed batch claimed by exactly one ingested file; duplicates point at one."""
        committed = manifest.committed
        owner = np.full(committed, -1, dtype=np.int64)
        names: list[str] = []
        where = store.MANIFEST
        for rel, entry in sorted(manifest.files.items(), key=lambda item: _start(item[1])):
            status = entry.get("status") if isinstance(entry, dict) else None
            start, stop = (entry.get("start"), entry.get("stop")) if isinstance(entry, dict) else (None, None)
            if not all(isinstance(v, int) for v in (start, stop)) or not isinstance(status, str):
                self.add(where, f"{rel}: malformed entry {entry!r}", fix=DROP, batch=min(committed, _start(entry)))
                continue
            if status.startswith("duplicate of "):
                original = manifest.files.get(status.removeprefix("duplicate of "))
                if not isinstance(original, dict) or original.get("status") != "ingested" or (
                    (original.get("start"), original.get("stop")) != (start, stop)
                ):
                    self.add(where, f"{rel}: {status}, which is not an ingested file with batches {start}..{stop - 1}",
                             fix=ENTRY, subject=rel)
                continue
            if status != "ingested":
                self.add(where, f"{rel}: unknown status {status!r}")
                continue
            if not 0 <= start < stop <= committed:
                self.add(
                    where,
                    f"{rel}: batches {start}..{stop - 1} are not within the {committed} committed",
                    fix=DROP,
                    batch=max(0, min(start, committed)),
                )
                continue
            claimed = owner[start:stop]
            if (claimed >= 0).any():
                other = names[int(claimed[claimed >= 0][0])]
                first = start + int(np.argmax(claimed >= 0))
                self.add(where, f"{rel} and {other} both claim batch {first}", fix=DROP, batch=first)
                continue
            owner[start:stop] = len(names)
            names.append(rel)
        free = np.flatnonzero(owner < 0)
        if free.size:
            runs = np.split(free, np.flatnonzero(np.diff(free) > 1) + 1)
            shown = ", ".join(f"{r[0]}..{r[-1]}" for r in runs[:3]) + (", ..." if len(runs) > 3 else "")
            self.add(where, f"{free.size} committed batches are claimed by no file ({shown})", fix=DROP, batch=int(free[0]))
        return owner, names

    def _check_per_batch(self, manifest: store.Manifest, owner: np.ndarray, names: list[str]) -> np.ndarray:
        """`length` in range, `source`/`source_index` as the manifest's ranges say; returns the lengths
        (-1 where unreadable)."""
        committed = manifest.committed
        lengths = np.full(committed, -1, dtype=np.int64)
        _, _, _, query, key = self.arrays["attention"].shape
        top = min(manifest.max_length, max(query, key))
        length = self.arrays["length"]
        for region, values in self._values(length, committed, fix=DROP, required=True):
            if values is None:
                continue
            lengths[region[0]] = values
            for i in np.flatnonzero((values < 1) | (values > top)):
                b = region[0].start + int(i)
                self.add(f"length[{b}]", f"{values[i]} outside 1..{top}", fix=DROP, batch=b, kind="length")
                lengths[b] = -1
        starts = np.zeros(len(names), dtype=np.int64)
        for i, rel in enumerate(names):
            starts[i] = manifest.files[rel]["start"]
        sources = [store.source_name(n, manifest.files[n]) for n in names]
        for name in ("source", "source_index"):
            array = self.arrays.get(name)
            if array is None:
                continue
            wrong, example = 0, None
            for region, values in self._values(array, committed, fix=SOURCE, required=True):
                if values is None:
                    continue
                own = owner[region[0]]
                batches = np.arange(region[0].start, region[0].stop)
                if name == "source":
                    want = np.array([sources[o] if o >= 0 else "" for o in own], dtype=object)
                    got = np.asarray(values, dtype=object)
                else:
                    want = np.where(own >= 0, batches - starts[np.maximum(own, 0)], -1)
                    got = np.asarray(values)
                bad = np.flatnonzero((got != want) & (own >= 0))
                wrong += bad.size
                if bad.size and example is None:
                    i = int(bad[0])
                    example = f"batch {batches[i]} says {_plain(got[i])!r}, the manifest {_plain(want[i])!r}"
            if wrong:
                self.add(name, f"{wrong} batch{'es' * (wrong != 1)} disagree{'s' * (wrong == 1)} with the manifest's file ranges (first: {example})", fix=SOURCE)
        return lengths

    def _check_attention(self, manifest: store.Manifest, lengths: np.ndarray) -> None:
        attention = self.arrays["attention"]
        _, layers, heads, query, key = attention.shape
        tolerance = dumps.ROW_SUM_TOLERANCE[np.dtype(manifest.dtype).itemsize]
        step = attention.chunks[0]
        q_index, k_index = np.arange(query), np.arange(key)
        for start in range(0, manifest.committed, step):
            stop = min(start + step, manifest.committed)
            n = lengths[start:stop]
            rows = np.minimum(n, query)[:, None]  # valid queries of each sample
            cols = np.minimum(n, key)[:, None]
            valid = (q_index[None, :, None] < rows[:, :, None]) & (k_index[None, None, :] < cols[:, :, None])
            for layer in range(layers):
                region = (slice(start, stop), slice(layer, layer + 1), slice(None), slice(None), slice(None))
                block = self._read_region(attention, region, f"committed batches {start}..{stop - 1} of layer {layer}")
                if block is None:
                    continue
                self._check_values(block[:, 0], valid, n, start, layer, tolerance)
            self.result.batches += stop - start

    def _check_values(self, block, valid, lengths, start, layer, tolerance) -> None:
        """NaN exactly outside each valid block; finite, non-negative rows summing to 1 inside."""
        nan = np.isnan(block)
        inside = valid[:, None]  # (batch, 1, query, key) against (batch, head, query, key)
        outside_bad = ~nan & ~inside
        inside_bad = ~np.isfinite(block) & inside
        negative = (block < 0) & inside
        sums = np.where(inside, block, 0).sum(axis=-1, dtype=np.float64)
        row_valid = inside.any(axis=-1)
        error = np.where(row_valid, np.abs(sums - 1.0), 0.0)
        off = error > tolerance
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
                self.add(where, f"NaN or Inf inside the valid {size} block (head {h}, query {q}, key {k})",
                         fix=DROP, batch=b, kind="values")
            elif outside_bad[i].any():
                h, q, k = np.argwhere(outside_bad[i])[0]
                self.add(where, f"a value outside the valid {size} block, where NaN belongs (head {h}, query {q}, key {k})",
                         fix=DROP, batch=b, kind="values")
            elif negative[i].any():
                h, q, k = np.argwhere(negative[i])[0]
                self.add(where, f"negative weight {block[i, h, q, k]:.3g} (head {h}, query {q}, key {k})",
                         fix=DROP, batch=b, kind="values")
            else:
                h, q = np.unravel_index(np.argmax(error[i]), error[i].shape)
                self.add(where, f"rows do not sum to 1 (off by {error[i, h, q]:.3g} at head {h}, query {q};"
                         f" tolerance {tolerance:g})", fix=DROP, batch=b, kind="values")

    def _check_tokens(self, manifest: store.Manifest) -> None:
        token = self.arrays.get("token")
        if token is None:
            return
        for _ in self._values(token, manifest.committed, fix=DROP):
            pass

    def _check_stats(self, manifest: store.Manifest) -> None:
        done = manifest.stats_committed
        try:
            group = self.group["stats"] if "stats" in self.group else None
        except Exception as exc:
            self.add("stats/zarr.json", f"unreadable ({_reason(exc)})", fix=STATS if done else None)
            return
        if group is None:
            if done:
                self.add("stats", f"missing, but statistics are committed for {done} batches", fix=STATS)
            return
        if not done:
            return  # uncommitted statistics: nothing trusts them
        for name, array in sorted(group.arrays()):
            dims = tuple(array.metadata.dimension_names or ())
            if "batch" not in dims:
                continue
            axis = dims.index("batch")
            if array.shape[axis] < done:
                self.add(f"stats/{name}", f"holds {array.shape[axis]} batches, {done} are committed", fix=STATS)
                continue
            for _ in self._values(array, done, fix=STATS, axis=axis):
                pass

    # -- reading chunk by chunk

    def _values(self, array, upto=None, *, fix, required=False, axis=0):
        """(region, values) over `array` below `upto` along `axis`, several small chunks per read
        (up to ~CHUNK_BYTES); a read that fails is retried chunk by chunk to name the bad ones,
        which yield None. Damage is reported as affecting the batches from the chunk's first one."""
        itemsize = getattr(array.dtype, "itemsize", 0) or 64  # variable-length strings: a guess
        chunk_bytes = max(1, math.prod(array.chunks) * itemsize)
        per_read = max(1, store.CHUNK_BYTES // chunk_bytes)
        chunks = list(_chunks(array, upto, axis))
        groups: dict[tuple, list] = defaultdict(list)  # chunks sharing every index but `axis`'s
        for coords, region in chunks:
            groups[coords[:axis] + coords[axis + 1 :]].append((coords, region))
        for members in groups.values():
            for i in range(0, len(members), per_read):
                part = members[i : i + per_read]
                batch = part[0][1][axis].start if fix == DROP else None
                missing = required and any(not self.loc.exists(_key(array, c)) for c, _ in part)
                if not missing and len(part) > 1:
                    first, last = part[0][1], part[-1][1]
                    region = tuple(
                        slice(first[d].start, last[d].stop) if d == axis else first[d] for d in range(len(first))
                    )
                    try:
                        values = array[region]
                    except Exception:
                        pass
                    else:
                        self.result.chunks += len(part)
                        yield region, values
                        continue
                for coords, region in part:
                    batch = region[axis].start if fix == DROP else None
                    yield region, self._read(array, coords, region, fix=fix, batch=batch, required=required)

    def _read(self, array, coords, region, *, fix, batch=None, required=False):
        """One chunk's values, or None (and a problem naming its key) when it is missing or corrupt."""
        key = _key(array, coords)
        if required and not self.loc.exists(key):
            span = f" (batches {region[0].start}..{region[0].stop - 1})"
            self.add(key, f"missing chunk: its committed values are lost{span}", fix=fix, batch=batch, kind="chunk")
            self.bad_chunks[array.path].append(key)
            return None
        try:
            values = array[region]
        except Exception as exc:
            self.add(key, f"does not decode ({_reason(exc)})", fix=fix, batch=batch, kind="chunk")
            self.bad_chunks[array.path].append(key)
            return None
        self.result.chunks += 1
        return values

    def _read_region(self, array, region, what: str):
        """A region of whole chunks (one batch-chunk of one layer); each chunk is required."""
        grid = [range(s.start // c, math.ceil(s.stop / c)) for s, c in zip(_bounds(array, region), array.chunks)]
        keys = [(coords, _key(array, coords)) for coords in itertools.product(*grid)]
        batch = region[0].start
        missing = [key for _, key in keys if not self.loc.exists(key)]
        for key in missing:
            self.add(key, f"missing chunk: {what} are lost", fix=DROP, batch=batch, kind="chunk")
            self.bad_chunks[array.path].append(key)
        if missing:
            return None
        try:
            values = array[region]
        except Exception:
            for coords, key in keys:  # find which chunks fail
                sub = tuple(slice(i * c, min((i + 1) * c, s.stop)) for i, c, s in zip(coords, array.chunks, _bounds(array, region)))
                try:
                    array[sub]
                except Exception as exc:
                    self.add(key, f"does not decode ({_reason(exc)}): {what}", fix=DROP, batch=batch, kind="chunk")
                    self.bad_chunks[array.path].append(key)
            return None
        self.result.chunks += len(keys)
        return values


def _bounds(array, region) -> list[slice]:
    return [slice(*s.indices(n)[:2]) for s, n in zip(region, array.shape)]


def _chunks(array, upto: int | None = None, axis: int = 0):
    """(chunk coords, region) of every chunk of `array`, along `axis` only below `upto`."""
    shape = list(array.shape)
    if upto is not None:
        shape[axis] = min(shape[axis], upto)
    grid = [range(math.ceil(s / c)) for s, c in zip(shape, array.chunks)]
    for coords in itertools.product(*grid):
        yield coords, tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(coords, array.chunks, shape))


def _key(array, coords) -> str:
    return f"{array.path}/{array.metadata.encode_chunk_key(coords)}"


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value) if not isinstance(value, (int, str)) else value


def _start(entry) -> int:
    start = entry.get("start") if isinstance(entry, dict) else None
    return start if isinstance(start, int) else 0


def _reason(exc: BaseException) -> str:
    if "checksum" in str(exc).lower():
        return "crc32c checksum mismatch: the bytes on disk changed"
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _lock_problem(location: store.Location) -> Problem | None:
    """A lock file nobody holds: left by a writer that died (a live writer's lock is no problem)."""
    path = os.path.join(location.root, store.LOCK)
    if location.remote or not os.path.exists(path) or store.lock_holder(location) is not None:
        return None
    holder = store._read_record(path)
    if holder is None:
        who = "a writer killed while taking it (the lock is empty or unreadable)"
    else:
        who = f"{holder.get('purpose', 'a writer')} (pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')})"
    return Problem(store.LOCK, f"stale lock left by {who}, which no longer holds it", fix=LOCK)


# ---------------------------------------------------------------- repairing


def _repair(location: store.Location, found: _Checker, force: bool) -> None:
    """Fix what `found` reported that can be fixed; called under the store's lock."""
    problems = found.result.problems
    by_fix: dict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        by_fix[p.fix].append(p)
    manifest = found.manifest
    for rel in found.stray:
        try:
            os.remove(os.path.join(location.root, rel))
        except FileNotFoundError:
            pass
    for p in by_fix[STRAY]:
        p.repaired = "deleted"
    if manifest is None or "attention" not in found.arrays:
        return
    group = store.open_group(location, "r+")
    with zarr.config.set({"array.write_empty_chunks": True}):
        if by_fix[DROP] and force:
            before = manifest.committed
            cut, dropped = _rewind(manifest, min(p.batch for p in by_fix[DROP] if p.batch is not None))
            store.commit(location, manifest)  # the commit point: from here the damaged batches are gone
            note = (
                f"--force: dropped committed batches {cut}..{before - 1} and rewound the manifest to {cut} batches;"
                f" ingest again to restore {len(dropped)} file{'s' * (len(dropped) != 1)}"
                + (f" ({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''})" if dropped else "")
            )
            for p in by_fix[DROP]:
                p.repaired = note
        batched = [group[n] for n in (*BATCHED, "batch") if n in found.arrays]
        if batched and all(a.shape[0] >= manifest.committed for a in batched):
            if any(a.shape[0] != manifest.committed for a in batched) or by_fix[PAST]:
                store.resize(group, batch=manifest.committed)
            for p in by_fix[PAST]:
                p.repaired = f"arrays shrunk to the {manifest.committed} committed batches"
        if by_fix[SOURCE] and "source" in found.arrays and "source_index" in found.arrays:
            _rebuild_sources(location, group, manifest, found)
            for p in by_fix[SOURCE]:
                p.repaired = "rebuilt from the manifest"
        if found.coords_to_rebuild:
            _rebuild_coordinates(group, manifest, found.coords_to_rebuild)
            for p in by_fix[COORD]:
                p.repaired = "rebuilt"
        if by_fix[STATS]:
            manifest.stats_committed = 0
            for p in by_fix[STATS]:
                p.repaired = "statistics uncommitted; fastattn stats recomputes them"
        for p in by_fix[ENTRY]:
            manifest.files.pop(p.subject, None)
            p.repaired = "entry removed (the file's batches were never stored twice)"
    store.commit(location, manifest)  # also refreshes the consolidated metadata
    for p in by_fix[CONSOLIDATED]:
        p.repaired = "refreshed"


def _rewind(manifest: store.Manifest, batch: int) -> tuple[int, list[str]]:
    """Uncommit every batch from the file that holds `batch` onwards; returns the new
    committed count and the files dropped from the manifest (ingesting again restores them)."""
    files = manifest.files
    cut = min(batch, manifest.committed)
    moved = True
    while moved:  # down to the start of the file holding the cut (overlapping entries too)
        moved = False
        for entry in files.values():
            if isinstance(entry, dict) and entry.get("status") == "ingested":
                start, stop = entry.get("start"), entry.get("stop")
                if isinstance(start, int) and isinstance(stop, int) and start < cut < stop:
                    cut, moved = start, True
    dropped = []
    for rel, entry in list(files.items()):
        if not isinstance(entry, dict) or not isinstance(entry.get("stop"), int) or not isinstance(entry.get("start"), int):
            dropped.append(rel)
        elif entry.get("status") == "ingested" and entry["stop"] > cut:
            dropped.append(rel)
    for rel in dropped:
        del files[rel]
    for rel, entry in list(files.items()):
        status = entry.get("status", "")
        if status.startswith("duplicate of ") and status.removeprefix("duplicate of ") not in files:
            del files[rel]
    manifest.committed = cut
    manifest.stats_committed = min(manifest.stats_committed, cut)
    return cut, dropped


def _delete(location: store.Location, key: str) -> None:
    if location.remote:
        location.fs.rm(location._path(key))
    else:
        try:
            os.remove(os.path.join(location.root, key))
        except FileNotFoundError:
            pass


def _rebuild_sources(location: store.Location, group: zarr.Group, manifest: store.Manifest, found: _Checker) -> None:
    committed = manifest.committed
    source = np.full(committed, "", dtype=object)
    index = np.full(committed, -1, dtype=np.int32)
    for rel, entry in manifest.files.items():
        if entry.get("status") == "ingested" and 0 <= entry["start"] < entry["stop"] <= committed:
            source[entry["start"] : entry["stop"]] = store.source_name(rel, entry)
            index[entry["start"] : entry["stop"]] = np.arange(entry["stop"] - entry["start"])
    for name, values in (("source", source.astype(str)), ("source_index", index)):
        for key in found.bad_chunks.get(name, []):
            _delete(location, key)  # a corrupt chunk cannot be read back for a partial write
        array = group[name]
        step = array.chunks[0]
        for start in range(0, committed, step):
            array[start : min(start + step, committed)] = values[start : start + step]


def _rebuild_coordinates(group: zarr.Group, manifest: store.Manifest, dims: set[str]) -> None:
    attention = group["attention"]
    for axis, dim in enumerate(store.DIMS):
        if dim not in dims:
            continue
        size = attention.shape[axis]
        chunk = manifest.batch_chunk if dim == "batch" else max(size, manifest.batch_chunk)
        array = group.create_array(
            dim, shape=(size,), chunks=(chunk,), dtype="int32", dimension_names=(dim,), overwrite=True,
            compressors=store.compressors(),
        )
        if size:
            array[:] = np.arange(size, dtype=np.int32)
