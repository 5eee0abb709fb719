"""Verify a store end to end, and repair what can be repaired (`fastattn check`).

`check_store(path)` reads everything a reader would trust and reports each problem as
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
  a bad chunk is named by its key, e.g. `attention/c/3/2/0/0/0`); committed chunks exist
  (zarr would silently read a missing chunk as fill values); `length` in `1..max_length`;
  each sample is NaN exactly outside its `length x length` block, finite and non-negative
  inside, and its rows sum to 1 within the tolerance ingest applied to the dump it came
  from (`fastattn.dumps.row_sum_tolerance` of the dtype its manifest entry records);
- the derived groups, when committed: `stats` (`stats_committed` in the manifest) and
  `rollout` (its `fastattn_rollout` record): every variable present with its dims and a
  shape that fits the store, every chunk within the committed batches present and
  decoding, their `length` equal to the store's;
- leftovers: a lock file nobody holds (its writer died), temporary files
  (`*.partial`, `.*.tmp`) from an interrupted write.

`repair=True` (under the store's lock) removes leftovers; restores an array's metadata
(its shape from the manifest, or all of it from the consolidated copy) where the chunks
on disk show it is the metadata, not the data, that is wrong; shrinks the arrays to the
batches the manifest commits or a file entry claims; rebuilds what the manifest
determines (`source`, `source_index`, coordinates, consolidated metadata); uncommits a
broken `stats` group and removes a broken `rollout` (both are recomputed); and never
drops a batch that is committed or claimed by a file entry unless `force=True`: then
every batch from the first damaged file onwards is dropped, with the entries of the
files that held them, so ingesting the same folders again restores them.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import zarr

from . import dumps, store
from .errors import first_line
from .stats import variables as stats_variables

#: At most this many lines per kind of problem (bad values, bad chunks...); the rest are counted.
MAX_PER_KIND = 10
#: check, repair, check again: a repair can reveal what it could not see before (chunks behind
#: restored metadata), so `--repair` goes round at most this many times.
REPAIR_ROUNDS = 3

# What --repair can do about a problem.
LOCK = "lock"  # remove a stale lock
STRAY = "stray"  # delete temporary files
PAST = "past"  # shrink the arrays to the committed (or claimed) batches
META = "meta"  # restore an array's metadata: its shape from the manifest, the rest from the consolidated copy
SOURCE = "source"  # rebuild source / source_index from the manifest
COORD = "coord"  # rebuild a coordinate array
CONSOLIDATED = "consolidated"  # refresh the consolidated metadata
STATS = "stats"  # uncommit the statistics (fastattn stats recomputes them)
ROLLOUT = "rollout"  # remove the rollout (fastattn rollout recomputes it)
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

#: The `stats` group as `fastattn.stats.write_stats` lays it out: variable -> dims.
#: The `stats` group as `fastattn.stats.write_stats` lays it out: variable -> dims.
STATS_SCHEMA = {
    **{name: dims for name, (dims, _) in stats_variables(("batch", "layer", "head"), 1).items()},
    "length": ("batch",),
    **{dim: (dim,) for dim in (*store.DIMS, "rank")},
}
ROLLOUT_GROUP = "rollout"  # fastattn.corpus.ROLLOUT_GROUP (not imported: corpus pulls in plotting code)


def rollout_schema(keep_matrix: bool) -> dict[str, tuple]:
    """The `rollout` group as `fastattn.corpus.write_rollout` writes it: variable -> dims."""
    schema = {"rollout_incoming": ("batch", "layer", "key"), "length": ("batch",), "batch": ("batch",),
              "layer": ("layer",), "key": ("key",)}
    if keep_matrix:
        schema.update(rollout=("batch", "layer", "query", "key"), query=("query",))
    return schema


@dataclass
class Problem:
    """One thing wrong with a store: where (a file, array or chunk key) and what."""

    where: str
    message: str
    repaired: str = ""  # what --repair did about it; empty while it remains
    fix: str | None = field(default=None, repr=False, compare=False)
    batch: int | None = field(default=None, repr=False, compare=False)  # first committed batch it affects
    subject: str | None = field(default=None, repr=False, compare=False)  # the manifest entry or array it is about

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
    location = store.as_location(path, storage_options)
    if not repair:
        return _Checker(location).run()
    first = _Checker(location, only_header=True).run()
    if first.problems:  # not a fastattn store: nothing to repair, and nothing to lock
        return first
    stale = _lock_problem(location)
    location.check_writable()
    problems = [stale] if stale else []
    if stale:
        stale.repaired = "taken over and removed"
    after = None
    with store.Lock(location, "fastattn check --repair"):
        for _round in range(REPAIR_ROUNDS):
            found = _Checker(location, own_lock=True)
            result = found.run()
            done = _repair(location, found, force)
            for p in result.problems:
                known = next((q for q in problems if _same(p, q)), None)
                if known is None:
                    problems.append(p)
                elif p.repaired:
                    known.repaired = p.repaired
            if not done:  # nothing left that repair can do: this check is the last word
                after = CheckResult(result.store, [Problem(p.where, p.message, fix=p.fix) for p in result.problems],
                                    result.committed, result.chunks, result.batches)
                break
        if after is None:
            after = _Checker(location, own_lock=True).run()
    for p in problems:
        if p.repaired and p is not stale and any(_same(p, q) for q in after.problems):
            p.repaired = ""  # the repair did not take
    problems += [q for q in after.problems if not any(_same(p, q) for p in problems)]
    after.problems = problems
    return after


def _same(a: Problem, b: Problem) -> bool:
    return a.where == b.where and a.message == b.message


BROKEN = object()  # a derived group zarr cannot open


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
        self.root: dict = {}
        self.manifest: store.Manifest | None = None
        self.group: zarr.Group | None = None
        self.arrays: dict[str, zarr.Array] = {}
        self.unreadable: set[str] = set()  # arrays whose shape or chunks make their values unreadable as they are
        self.dims: dict[str, int] = {}  # the sizes the attention's dims should have
        self.trusted = True  # False while the attention's shape or chunks contradict the manifest unrepaired
        self.claimed = 0  # end of the batches the manifest's file entries claim
        self.lengths = np.zeros(0, dtype=np.int64)  # per committed batch; -1 where unknown
        self.tolerance = np.zeros(0)  # row-sum tolerance per committed batch
        self.writer: dict | None = None  # the lock's holder, when a live writer works
        self.stray: list[str] = []
        self.bad_chunks: dict[str, list[str]] = defaultdict(list)
        self.coords_to_rebuild: set[str] = set()
        self.restore: dict[str, tuple[dict, str]] = {}  # array -> (metadata --repair writes, what it says)

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
        except Exception as exc:  # a broken store can make any read fail: one line, never a traceback
            self.add(str(self.loc), f"cannot be read further ({_reason(exc)})")
        for kind, hidden in self.hidden.items():
            more = self.counts[kind] - MAX_PER_KIND
            hidden.where = kind
            hidden.message = f"{more} more problems of this kind (only the first {MAX_PER_KIND} are listed)"
            self.result.problems.append(hidden)
        return self.result

    def _guarded(self, where: str, work, *args, essential: bool = False):
        """Run one pass; what it did not foresee becomes a problem naming `where`."""
        try:
            return work(*args)
        except _Stop:
            raise
        except Exception as exc:
            self.add(where, f"could not be checked ({_reason(exc)})")
            if essential:
                raise _Stop from None
            return None

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
        self.result.committed = manifest.committed
        self._guarded("zarr.json", self._check_schema, essential=True)
        self._guarded("attention", self._check_shapes, essential=True)
        self._guarded("coordinates", self._check_coordinates)
        if self.writer is None:
            self._guarded("zarr.json", self._check_consolidated)
        owner, names = self._guarded(store.MANIFEST, self._check_files, essential=True)
        self._guarded("length", self._check_per_batch, owner, names, essential=True)
        self._guarded("attention", self._check_attention)
        self._guarded("token", self._check_tokens)
        self._guarded("stats", self._check_stats)
        self._guarded(ROLLOUT_GROUP, self._check_rollout)
        self._guarded("zarr.json", self._check_hierarchy)

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
        self.stray = self.loc.leftovers()
        if self.stray:
            count = len(self.stray)
            where = self.stray[0] if count == 1 else f"{self.stray[0]} and {count - 1} more"
            self.add(where, f"{count} temporary file{'s' * (count > 1)} left by an interrupted write", fix=STRAY)

    def _read_manifest(self) -> store.Manifest | None:
        raw = self.loc.read(store.MANIFEST)
        if raw is None:
            self.add(store.MANIFEST, "missing: no ingest was ever committed (an interrupted first ingest?); run fastattn ingest")
            return None
        try:
            manifest = store.Manifest.from_json(raw)  # checks every field
        except Exception as exc:  # not JSON, not an object, a field of the wrong type...
            self.add(store.MANIFEST, f"unreadable ({_reason(exc)})")
            return None
        self.claimed = manifest.claimed()
        if manifest.stats_committed > manifest.committed:
            self.add(
                store.MANIFEST,
                f"statistics committed for {manifest.stats_committed} batches, but the store has {manifest.committed}",
                fix=STATS,
            )
        return manifest

    def _schema_problem(self, name: str, array) -> str | None:
        """What is wrong with an array's dims or dtype, if anything."""
        dims, dtype = SCHEMA[name]
        dtype = self.manifest.dtype if name == "attention" else dtype
        names = tuple(array.metadata.dimension_names or ())
        if names != dims:
            return f"dims {names}, expected {dims}"
        kind = array.dtype.kind if hasattr(array.dtype, "kind") else "?"
        if (dtype == STR and kind not in "TUO") or (dtype not in (None, STR) and array.dtype != np.dtype(dtype)):
            return f"dtype {array.dtype}, expected {'a string' if dtype == STR else dtype}"
        return None

    def _check_schema(self) -> None:
        for name in SCHEMA:
            coordinate = name in store.DIMS
            try:
                array = self.group[name]
            except Exception as exc:
                unreadable = not isinstance(exc, KeyError) or self.loc.exists(f"{name}/zarr.json")
                where, what = (f"{name}/zarr.json", f"unreadable array metadata ({_reason(exc)})") if unreadable else (name, "missing array")
                if coordinate:
                    self.add(where, what, fix=COORD)
                    self.coords_to_rebuild.add(name)
                else:
                    self._restore_all(name, where, what)
                continue
            if not isinstance(array, zarr.Array):
                self.add(name, "is a group, not an array", fix=COORD if coordinate else None)
                self.coords_to_rebuild.add(name)
                continue
            problem = self._schema_problem(name, array)
            if problem:
                self.add(name, problem, fix=COORD if coordinate else None)
                self.coords_to_rebuild.add(name)
                continue
            self.arrays[name] = array
        self._check_own_group()
        if "attention" in self.arrays:
            codecs = [type(c).__name__ for c in self.arrays["attention"].metadata.codecs]
            if "Crc32cCodec" not in codecs:
                self.add("attention", "no crc32c checksum among its codecs: flipped bits would be read as data")
        if any(name not in self.arrays for name in ("attention", "length")):
            raise _Stop  # nothing more can be read

    def _check_own_group(self) -> None:
        """`_fastattn/zarr.json`, when there, must be a group's: every commit's consolidation reads it."""
        raw = self.loc.read(f"{store.META}/zarr.json")
        try:
            body = json.loads(raw) if raw is not None else None
        except ValueError:
            body = {}
        if body is None or (isinstance(body, dict) and (body.get("zarr_format"), body.get("node_type")) == (3, "group")):
            return
        self.add(f"{store.META}/zarr.json", "not a Zarr v3 group's metadata: committing would fail", fix=META, subject=store.META)
        self.restore[store.META] = ({"zarr_format": 3, "node_type": "group", "attributes": {}}, "rewritten as the empty group it is")

    def _restore_all(self, name: str, where: str, what: str) -> None:
        """An array whose metadata is missing or unreadable: restorable from the consolidated copy in
        the root zarr.json (chunking and codecs never change; the shape comes from the manifest)."""
        m = self.manifest
        meta = ((self.root.get("consolidated_metadata") or {}).get("metadata") or {}).get(name)
        try:
            template = _memory_array(meta)
        except Exception:
            template = None
        if template is None or self._schema_problem(name, template) or template.chunks[0] != m.batch_chunk:
            if name in ("source", "source_index"):  # rebuildable from the manifest, once the array exists
                self.add(where, f"{what}, and no copy of it in the consolidated metadata")
            else:
                self.add(where, f"{what}; its committed values cannot be read", fix=DROP, batch=0)
            return
        shape = list(template.shape)
        shape[0] = m.committed
        if name == "attention":
            tokens = m.cross or [max(m.max_length, *template.shape[3:])] * 2
            shape[1:] = [m.layers, m.heads, *tokens]
        elif name == "token":
            shape[1] = m.cross[0] if m.cross else max(m.max_length, template.shape[1])
        meta = {**meta, "shape": shape}
        self.add(where, f"{what}; the consolidated metadata has a copy", fix=META, subject=name)
        self.restore[name] = (meta, "restored from the consolidated metadata, shape from the manifest")

    def _restore_shape(self, name: str, array, shape) -> None:
        meta = json.loads(self.loc.read(f"{array.path}/zarr.json"))
        meta["shape"] = [int(s) for s in shape]
        self.restore[name] = (meta, f"shape restored to {tuple(int(s) for s in shape)} from the manifest (the chunks were intact)")

    def _check_shapes(self) -> None:
        """Every batched array's shape and chunking against the manifest."""
        m = self.manifest
        n, bc = m.committed, m.batch_chunk
        attention = self.arrays["attention"]
        b, layers, heads, query, key = attention.shape
        cq, ck = attention.chunks[3:]
        want_l, want_h = (m.layers, m.heads) if n else (layers, heads)
        if m.cross:
            want_q, want_k = m.cross
        else:  # self-attention: square, and at least the longest committed sample (a killed run may have grown it)
            want_q = want_k = max(m.max_length, query, key)
        # store.attention_chunks: whole planes of all heads, or heads split, or a plane's queries split
        ch = attention.chunks[2]
        grid = tuple(attention.chunks[:2]) == (bc, 1) and 1 <= ch <= want_h and (
            (cq, ck) == (want_q, want_k) if m.cross else (cq == ck or (ch == 1 and cq < ck))
        )
        if not grid:
            planes = f"{want_q}, {want_k}" if m.cross else "n, n; or heads or queries split"
            self.add("attention", f"chunks {tuple(attention.chunks)}; the manifest's layout is ({bc}, 1, {want_h}, {planes})")
            self.unreadable.add("attention")
        target = [b, want_l, want_h, want_q, want_k]
        wrong = []
        if (layers, heads) != (want_l, want_h):
            wrong.append(f"has {layers} layers x {heads} heads; the manifest says {want_l} x {want_h}")
        if (query, key) != (want_q, want_k):
            wrong.append(f"holds {query} x {key} tokens (query x key); the manifest needs {want_q} x {want_k}")
        # restorable when the chunks on disk show the metadata is what is wrong: the chunk grid is
        # the manifest's, and the last layer the manifest has holds data
        evident = grid and (not n or layers >= want_l or self._exists(attention, (0, want_l - 1, 0, 0, 0)))
        self.trusted = grid and (not wrong or evident)  # else nothing may be sized after the attention
        if wrong:
            self.unreadable.add("attention")
            if not evident and (layers, heads) != (want_l, want_h):
                self.add("attention", "; ".join(wrong))
                raise _Stop  # the manifest and the arrays disagree about what a batch is
            self.add("attention", "; ".join(wrong), fix=META if evident else None, subject="attention")
        self.dims = dict(zip(store.DIMS[1:], target[1:] if evident else attention.shape[1:]))
        short = self._short_of_commit("attention", attention, grid)
        target[0] = n if short else b
        if (wrong and evident) or short:
            self._restore_shape("attention", attention, target)
        for name in store.PER_BATCH:
            array = self.arrays.get(name)
            if array is None:
                continue
            if tuple(array.chunks) != (bc,):
                self.add(name, f"chunks {tuple(array.chunks)}; the manifest's layout is ({bc},)")
                self.unreadable.add(name)
            if self._short_of_commit(name, array, name not in self.unreadable):
                self._restore_shape(name, array, (n,))
        token = self.arrays.get("token")
        if token is not None:
            grid = tuple(token.chunks) == (bc, cq)
            if not grid:
                self.add("token", f"chunks {tuple(token.chunks)}; the attention's layout makes them ({bc}, {cq})")
                self.unreadable.add("token")
            width, need = token.shape[1], (want_q if m.cross else m.max_length)
            narrow = width != need if m.cross else bool(n) and width < need
            if narrow:
                self.add("token", f"has {width} query positions; the manifest needs {need}", fix=META if grid else None, subject="token")
            short = self._short_of_commit("token", token, grid)
            if grid and (narrow or short):
                self._restore_shape("token", token, (n if short else token.shape[0], self.dims["query"] if narrow else width))
        longest = max(a.shape[0] for name, a in self.arrays.items() if name in BATCHED or name == "batch")
        keep = max(n, self.claimed)  # batches a file entry claims are never cut without --force
        if longest > keep and self.writer is None:
            self.add(
                "attention",
                f"{longest - keep} batches past the last commit ({n} committed), left by an interrupted run",
                fix=PAST,
            )

    def _short_of_commit(self, name: str, array, grid_ok: bool) -> bool:
        """An array holding fewer batches than committed: a restorable shape when the chunk of the last
        committed batch is on disk (the metadata lost them), else committed data that is gone."""
        n = self.manifest.committed
        if array.shape[0] >= n:
            return False
        last = ((n - 1) // array.chunks[0], *([0] * (array.ndim - 1)))
        if grid_ok and self._exists(array, last):
            self.add(name, f"holds {array.shape[0]} batches but {n} are committed: its metadata lost them,"
                     " their chunks are on disk", fix=META, subject=name)
            return True
        self.add(name, f"holds {array.shape[0]} batches but {n} are committed: committed data is missing",
                 fix=DROP, batch=array.shape[0])
        return False

    def _exists(self, array, coords) -> bool:
        return self.loc.exists(_key(array, coords))

    def _check_coordinates(self) -> None:
        attention = self.arrays["attention"]
        n = self.manifest.committed
        for dim in store.DIMS:
            array = self.arrays.get(dim)
            if array is None:
                continue
            if dim == "batch":  # past the commit it only has to follow the arrays, which --repair shrinks
                size = array.shape[0] if array.shape[0] >= n else attention.shape[0]
            elif not self.trusted:
                continue  # the attention's shape is reported; a coordinate cannot be judged against it
            else:
                size = self.dims[dim]
            if array.shape != (size,):
                if self.writer is None:  # a writer resizes the coordinates with the arrays
                    self.add(dim, f"coordinate of length {array.shape[0]}, the dimension has {size}", fix=COORD)
                    self.coords_to_rebuild.add(dim)
                continue
            upto = n if dim == "batch" else None  # past the commit is a writer's business
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

    def _check_files(self):
        """Every committed batch claimed by exactly one ingested file; duplicates point at one.
        Also sets each committed batch's row-sum tolerance from its file's recorded dtype."""
        manifest = self.manifest
        committed = manifest.committed
        owner = np.full(committed, -1, dtype=np.int64)
        self.tolerance = np.full(committed, dumps.row_sum_tolerance(None, manifest.dtype))
        names: list[str] = []
        where = store.MANIFEST
        for rel, entry in sorted(manifest.files.items(), key=lambda item: item[1].start):
            start, stop = entry.start, entry.stop
            if start < 0 or start >= stop:
                self.add(where, f"{rel}: malformed entry {entry.to_json()!r}", fix=DROP, batch=min(committed, max(start, 0)))
                continue
            if entry.status is store.Status.DUPLICATE:
                original = manifest.files.get(entry.duplicate_of)
                if original is None or not original.ingested or (original.start, original.stop) != (start, stop):
                    self.add(where, f"{rel}: {entry.status_text}, which is not an ingested file with batches {start}..{stop - 1}",
                             fix=ENTRY, subject=rel)
                continue
            if not entry.ingested:
                self.add(where, f"{rel}: unknown status {entry.status_text!r}")
                continue
            if stop > committed:  # claims batches the manifest does not commit: its batches up to there still count as its own
                self.add(where, f"{rel}: batches {start}..{stop - 1} are not within the {committed} committed",
                         fix=DROP, batch=committed)
                stop = committed
                if start >= stop:
                    continue
            claimed = owner[start:stop]
            if (claimed >= 0).any():
                other = names[int(claimed[claimed >= 0][0])]
                first = start + int(np.argmax(claimed >= 0))
                self.add(where, f"{rel} and {other} both claim batch {first}", fix=DROP, batch=first)
                continue
            owner[start:stop] = len(names)
            names.append(rel)
            self.tolerance[start:stop] = dumps.row_sum_tolerance(entry.dtype, manifest.dtype)
        free = np.flatnonzero(owner < 0)
        if free.size:
            runs = np.split(free, np.flatnonzero(np.diff(free) > 1) + 1)
            shown = ", ".join(f"{r[0]}..{r[-1]}" for r in runs[:3]) + (", ..." if len(runs) > 3 else "")
            self.add(where, f"{free.size} committed batches are claimed by no file ({shown})", fix=DROP, batch=int(free[0]))
        return owner, names

    def _held(self, name: str) -> int:
        """Committed batches of `name` whose values can be read as the array is."""
        array = self.arrays.get(name)
        if array is None or name in self.unreadable:
            return 0
        return min(self.manifest.committed, array.shape[0])

    def _check_per_batch(self, owner: np.ndarray, names: list[str]) -> None:
        """`length` in range, `source`/`source_index` as the manifest's ranges say; keeps the lengths
        (-1 where unreadable) for the later passes."""
        manifest = self.manifest
        committed = manifest.committed
        lengths = self.lengths = np.full(committed, -1, dtype=np.int64)
        top = min(manifest.max_length, max(self.dims["query"], self.dims["key"]))
        for region, values in self._values(self.arrays["length"], self._held("length"), fix=DROP, required=True):
            if values is None:
                continue
            lengths[region[0]] = values
            for i in np.flatnonzero((values < 1) | (values > top)):
                b = region[0].start + int(i)
                self.add(f"length[{b}]", f"{values[i]} outside 1..{top}", fix=DROP, batch=b, kind="length")
                lengths[b] = -1
        starts = np.array([manifest.files[rel].start for rel in names], dtype=np.int64)
        sources = [manifest.files[n].source_name(n) for n in names]
        for name in ("source", "source_index"):
            array = self.arrays.get(name)
            if array is None:
                continue
            wrong, example = 0, None
            for region, values in self._values(array, self._held(name), fix=SOURCE, required=True):
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
                self.add(name, f"{wrong} batch{'es' * (wrong != 1)} disagree{'s' * (wrong == 1)} with the manifest's file ranges (first: {example})", fix=SOURCE)

    def _check_attention(self) -> None:
        attention = self.arrays["attention"]
        _, layers, heads, query, key = attention.shape
        held = self._held("attention")
        step = attention.chunks[0]
        q_index, k_index = np.arange(query), np.arange(key)
        for start in range(0, held, step):
            stop = min(start + step, held)
            n = self.lengths[start:stop]
            rows = np.minimum(n, query)[:, None]  # valid queries of each sample
            cols = np.minimum(n, key)[:, None]
            valid = (q_index[None, :, None] < rows[:, :, None]) & (k_index[None, None, :] < cols[:, :, None])
            for layer in range(layers):
                region = (slice(start, stop), slice(layer, layer + 1), slice(None), slice(None), slice(None))
                block = self._read_region(attention, region, f"committed batches {start}..{stop - 1} of layer {layer}")
                if block is None:
                    continue
                self._check_values(block[:, 0], valid, n, start, layer, self.tolerance[start:stop])
            self.result.batches += stop - start

    def _check_values(self, block, valid, lengths, start, layer, tolerance) -> None:
        """NaN exactly outside each valid block; finite, non-negative rows summing to 1 inside
        (within each sample's own `tolerance`)."""
        nan = np.isnan(block)
        inside = valid[:, None]  # (batch, 1, query, key) against (batch, head, query, key)
        outside_bad = ~nan & ~inside
        inside_bad = ~np.isfinite(block) & inside
        negative = (block < 0) & inside
        sums = np.where(inside, block, 0).sum(axis=-1, dtype=np.float64)
        row_valid = inside.any(axis=-1)
        error = np.where(row_valid, np.abs(sums - 1.0), 0.0)
        off = error > tolerance[:, None, None]
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
                         f" tolerance {tolerance[i]:.3g})", fix=DROP, batch=b, kind="values")

    def _check_tokens(self) -> None:
        token = self.arrays.get("token")
        if token is None:
            return
        for _ in self._values(token, self._held("token"), fix=DROP):
            pass

    # -- the derived groups

    def _derived(self, name: str, fix: str):
        """The group `name`, None when there is none, or BROKEN (a problem: zarr cannot open it)."""
        try:
            group = self.group[name] if name in self.group else None
        except Exception as exc:
            self.add(f"{name}/zarr.json", f"unreadable ({_reason(exc)})", fix=fix)
            return BROKEN
        if group is not None and not isinstance(group, zarr.Group):
            self.add(name, "is an array, not a group", fix=fix)
            return BROKEN
        return group

    def _check_stats(self) -> None:
        manifest = self.manifest
        done = manifest.stats_committed
        group = self._derived("stats", STATS)
        if group is None and done:
            self.add("stats", f"missing, but statistics are committed for {done} batches", fix=STATS)
        if group is None or group is BROKEN or not done or done > manifest.committed:
            return  # uncommitted statistics: nothing trusts them (too many committed is reported with the manifest)
        known = self.lengths[:done][self.lengths[:done] > 0]
        longest = int(known.max()) if known.size else 1
        query, key = self.dims["query"], self.dims["key"]
        # laid out at the attention's size when they were computed: the store may have grown since
        tokens = {"query": (query, query), "key": (key, key)} if manifest.cross else {"query": (longest, query), "key": (longest, key)}
        sizes = {"batch": (done, None), "layer": (manifest.layers,) * 2, "head": (manifest.heads,) * 2,
                 "rank": (manifest.stats_k,) * 2, **tokens}
        self._check_group("stats", group, STATS_SCHEMA, sizes, done, STATS, f"statistics are committed for {done} batches")

    def _check_rollout(self) -> None:
        manifest = self.manifest
        group = self._derived(ROLLOUT_GROUP, ROLLOUT)
        if group is None or group is BROKEN:
            return
        record = dict(group.attrs).get("fastattn_rollout")
        n = manifest.committed
        if not isinstance(record, dict) or (record.get("batches"), record.get("ingests")) != (n, len(manifest.ingests or [])):
            return  # never finished, or older than the last ingest: open_rollout refuses it, nothing trusts it
        size = manifest.max_length
        sizes = {"batch": (n, n), "layer": (manifest.layers,) * 2, "query": (size, size), "key": (size, size)}
        self._check_group(ROLLOUT_GROUP, group, rollout_schema(bool(record.get("keep_matrix"))), sizes, n, ROLLOUT,
                          f"the rollout of {n} batches is committed")

    def _check_group(self, prefix: str, group, schema: dict, sizes: dict, upto: int, fix: str, committed: str) -> None:
        """Every variable of a derived group: present, its dims, a shape within `sizes` (dim ->
        (least, most or None)), coordinates 0..n-1, and every chunk below `upto` batches present and
        decoding; its `length` equal to the store's."""
        for name, dims in schema.items():
            where = f"{prefix}/{name}"
            try:
                array = group[name]
            except KeyError:
                self.add(where, f"missing array; {committed}", fix=fix)
                continue
            except Exception as exc:
                self.add(f"{where}/zarr.json", f"unreadable array metadata ({_reason(exc)})", fix=fix)
                continue
            if not isinstance(array, zarr.Array):
                self.add(where, "is a group, not an array", fix=fix)
                continue
            got = tuple(array.metadata.dimension_names or ())
            if got != dims:
                self.add(where, f"dims {got}, expected {dims}", fix=fix)
                continue
            if any(not _within(s, *sizes[d]) for s, d in zip(array.shape, dims)):
                want = ", ".join(_span(*sizes[d]) for d in dims)
                self.add(where, f"shape {tuple(array.shape)}, the store needs ({want})", fix=fix)
                continue
            if dims == (name,):  # a coordinate: a missing chunk reads as 0s, which only a 0 may be
                extent = min(upto, array.shape[0]) if name == "batch" else array.shape[0]
                for region, values in self._values(array, extent, fix=fix):
                    if values is not None and not np.array_equal(values, np.arange(region[0].start, region[0].stop)):
                        self.add(where, f"coordinate values are not 0..{extent - 1}", fix=fix)
                        break
                continue
            for region, values in self._values(array, upto, fix=fix, required=True):
                if name != "length" or values is None:
                    continue
                store_lengths = self.lengths[region[0]]
                differ = np.flatnonzero((store_lengths > 0) & (np.asarray(values) != store_lengths))
                if differ.size:
                    b = region[0].start + int(differ[0])
                    self.add(where, f"batch {b} has length {values[differ[0]]}, the store {store_lengths[differ[0]]}", fix=fix)
                    break

    def _check_hierarchy(self) -> None:
        """Every other node's metadata parses: every commit consolidates the whole hierarchy, and
        one unreadable `zarr.json` anywhere (an uncommitted group's too) would make it fail."""
        named = {p.where for p in self.result.problems}
        for key in self._metadata_keys():
            if key in named or key == "zarr.json":
                continue
            try:
                _parse_metadata(self.loc.read(key))
            except Exception as exc:
                group = key.split("/", 1)[0]
                fix = {"stats": STATS, ROLLOUT_GROUP: ROLLOUT}.get(group)
                self.add(key, f"unreadable metadata ({_reason(exc)}); every commit consolidates it, and would fail", fix=fix)

    def _metadata_keys(self) -> list[str]:
        return [key for key in self.loc.keys() if key == "zarr.json" or key.endswith("/zarr.json")]

    # -- reading chunk by chunk

    def _values(self, array, upto=None, *, fix, required=False, axis=0):
        """(region, values) over `array` below `upto` along `axis`, several small chunks per read
        (up to ~CHUNK_BYTES); a read that fails is retried chunk by chunk to name the bad ones,
        which yield None. Damage is reported as affecting the batches from the chunk's first one."""
        itemsize = getattr(array.dtype, "itemsize", 0) or 64  # variable-length strings: a guess
        chunk_bytes = max(1, math.prod(array.chunks) * itemsize)
        per_read = max(1, store.schema.CHUNK_BYTES // chunk_bytes)
        chunks = list(_chunks(array, upto, axis))
        groups: dict[tuple, list] = defaultdict(list)  # chunks sharing every index but `axis`'s
        for coords, region in chunks:
            groups[coords[:axis] + coords[axis + 1 :]].append((coords, region))
        for members in groups.values():
            for i in range(0, len(members), per_read):
                part = members[i : i + per_read]
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


def _within(size: int, least: int, most: int | None) -> bool:
    return size >= least and (most is None or size <= most)


def _span(least: int, most: int | None) -> str:
    return str(least) if least == most else f">= {least}" if most is None else f"{least}..{most}"


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


def _memory_array(meta) -> zarr.Array | None:
    """The array a metadata document describes, opened in memory (None if it is not one)."""
    if not isinstance(meta, dict):
        return None
    from zarr.core.buffer import default_buffer_prototype

    body = default_buffer_prototype().buffer.from_bytes(json.dumps(meta).encode())
    return zarr.open_array(zarr.storage.MemoryStore({"zarr.json": body}), mode="r")


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


def _reason(exc: BaseException) -> str:
    if "checksum" in str(exc).lower():
        return "crc32c checksum mismatch: the bytes on disk changed"
    return f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__


def _lock_problem(location: store.Location) -> Problem | None:
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


# ---------------------------------------------------------------- repairing


def _repair(location: store.Location, found: _Checker, force: bool) -> bool:
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
        found.result.problems.append(Problem("repair", f"stopped: {_reason(exc)}"))
        return False
    return any(p.repaired for p in problems)


def _repair_store(location: store.Location, found: _Checker, manifest: store.Manifest, by_fix, force: bool) -> None:
    # metadata first (one atomic file each): everything after reads the arrays through it
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
        names = (*BATCHED, *store.DIMS)
        if found.trusted and all(name in group for name in names):
            batched = [group[name] for name in (*BATCHED, "batch")]
            if all(a.shape[0] >= keep for a in batched) and (any(a.shape[0] != keep for a in batched) or by_fix[PAST]):
                store.resize(group, batch=keep)
                for p in by_fix[PAST]:
                    p.repaired = f"arrays shrunk to the {keep} batches the manifest commits"
        if by_fix[SOURCE] and all(group[n].shape[0] >= manifest.committed for n in ("source", "source_index") if n in group):
            _rebuild_sources(location, group, manifest, found)
            for p in by_fix[SOURCE]:
                p.repaired = "rebuilt from the manifest"
        if by_fix[STATS]:
            manifest.stats_committed = 0
            for p in by_fix[STATS]:
                p.repaired = "statistics uncommitted; fastattn stats recomputes them"
        for p in by_fix[ENTRY]:
            manifest.files.pop(p.subject, None)
            p.repaired = "entry removed (the file's batches were never stored twice)"
    store.write_manifest(location, manifest)  # the consolidation comes once, at the end
    # derived data goes only once the manifest no longer commits it, and before the consolidation
    # (which reads every node's metadata, a broken one's too)
    if by_fix[STATS]:
        location.remove_prefix("stats")
    if by_fix[ROLLOUT]:
        location.remove_prefix(ROLLOUT_GROUP)
        for p in by_fix[ROLLOUT]:
            p.repaired = "rollout removed; fastattn rollout recomputes it"
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
    manifest.stats_committed = min(manifest.stats_committed, cut)
    return cut, dropped, end


def _rebuild_sources(location: store.Location, group: zarr.Group, manifest: store.Manifest, found: _Checker) -> None:
    committed = manifest.committed
    source = np.full(committed, "", dtype=object)
    index = np.full(committed, -1, dtype=np.int32)
    for rel, entry in manifest.files.items():
        if entry.ingested and 0 <= entry.start < entry.stop <= committed:
            source[entry.start : entry.stop] = entry.source_name(rel)
            index[entry.start : entry.stop] = np.arange(entry.stop - entry.start)
    for name, values in (("source", source.astype(str)), ("source_index", index)):
        for key in found.bad_chunks.get(name, []):
            location.delete(key)  # a corrupt chunk cannot be read back for a partial write
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
