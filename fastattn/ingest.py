"""Dumps → store: planned from headers, read in parallel, committed once.

One ingest (see DESIGN in README):
1. take the store's lock; find the dumps; scan headers (no data); classify each file
   as new, unchanged (same size and mtime, or same hash), changed, or bad;
2. grow the arrays for the planned batches and the longest sequence;
3. read and validate files in parallel (each straight into the chunk rows its samples
   will take), assign batch indices in file order to the samples that pass, and write
   each whole chunk as soon as it is full (the chunk that
   holds committed batches too is rewritten whole from both);
4. commit: one atomic manifest write. A crash before it leaves the last commit intact,
   and re-running plans the same range again.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import zarr

from . import cluster, dumps, store
from .choices import STORE_DTYPES
from .errors import DumpError, FastattnError, StoreError, printable

Progress = Callable[[int, int], None]  # (files done, files to read)
#: Largest batch-chunk row of attention chunks that files are read straight into (`_Rows`):
#: up to 16 layers of 4 MB chunks. A few rows are in use at once (filled, being written).
ROW_BYTES = 64 << 20


@dataclass
class Rejection:
    path: str
    reason: str

    def __str__(self) -> str:
        return printable(f"{self.path}: {self.reason}")


@dataclass
class IngestReport:
    """What one ingest did; `rejected` lists each bad file with its reason."""

    store: str
    files_found: int = 0
    files_ingested: int = 0
    files_unchanged: int = 0
    files_replaced: int = 0
    batches_added: int = 0
    committed: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    rejected: list[Rejection] = field(default_factory=list)
    duplicates: list[Rejection] = field(default_factory=list)
    written: bool = False
    inferred_lengths: int = 0  # batches without a mask whose length came from zero key columns

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.rejected

    def summary(self) -> str:
        return (
            f"{self.files_ingested} files ingested ({self.files_unchanged} unchanged, {self.files_replaced} replaced,"
            f" {len(self.rejected)} rejected), {self.batches_added} batches added, {self.committed} in store;"
            f" {self.bytes_read / 1e6:.1f} MB in {self.seconds:.2f} s ({self.mb_per_s:.0f} MB/s)"
        ) + (f"; {self.inferred_lengths} batches without a mask got their length from zero key columns" if self.inferred_lengths else "")


@dataclass(frozen=True)
class _Named:
    """A dump as the store knows it: `key` in the manifest (its identity), `source` shown."""

    key: str
    source: str


@dataclass
class _Plan:
    appends: list[tuple[str, dumps.DumpHeader]] = field(default_factory=list)
    replacements: list[tuple[str, dumps.DumpHeader]] = field(default_factory=list)


def ingest(
    inputs,
    store_path,
    *,
    jobs: int | None = None,
    layout: str | None = None,
    dtype: str = "float32",
    replace: bool = False,
    strict: bool = False,
    infer_padding: bool = True,
    progress: Progress | None = None,
    storage_options: dict | None = None,
    client=None,
) -> IngestReport:
    """Consolidate dumps (folders, files or globs) into the store; idempotent and crash-safe.

    Bad files are skipped and listed in the report; `strict=True` validates every file
    first and writes nothing if any is bad. `dtype` ('float32' or 'float16') applies
    when the store is created. A file whose name was ingested before is skipped when
    unchanged, and rejected when changed unless `replace=True` (same sample count).
    A self-attention dump without an `attention_mask` gets each sample's length from its
    exactly-zero trailing key columns (`dumps.infer_lengths`); `infer_padding=False` keeps
    such samples at the dump's full length (the files this run reads).

    With a `dask.distributed.Client` (passed, or active in the notebook) the reading and
    writing run on its workers; the result is the same store.
    """
    started = time.perf_counter()
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if dtype not in STORE_DTYPES:
        raise FastattnError(f"must be float32 or float16, not {dtype}", parameter="dtype")
    found = dumps.find_dumps(inputs)
    report = IngestReport(store=str(store_path), files_found=len(found.files))
    report.rejected.extend(Rejection(path, reason) for path, reason in found.problems)
    if not found.files:
        if found.problems:
            return report  # nothing to read: the store is not touched
        raise FastattnError(f"no .npz dumps found in {', '.join(os.fspath(i) for i in inputs)}")
    location = store.as_location(store_path, storage_options)
    location.check_reachable()
    new_store = location.is_new()
    if not new_store and not store.is_fastattn(location):
        raise StoreError(f"{location}: exists and is not a fastattn store; refusing to write into it")
    location.check_writable()
    jobs = max(1, jobs or os.cpu_count() or 1)
    # write_empty_chunks: zarr writes every chunk it is given (the coordinates'), even one equal
    # to the fill value, which check counts on; the data chunks are written by store.WholeChunks.
    with (
        store.Lock(location, "fastattn ingest"),
        ThreadPoolExecutor(jobs) as pool,
        zarr.config.set({"array.write_empty_chunks": True}),
    ):
        manifest = store.read_manifest(location)
        if manifest is not None and manifest.stats_only:
            raise StoreError(
                f"{location}: holds statistics captured from a model and no attention maps; dumps cannot be appended"
                " to it (ingest them into another store)"
            )
        plan = _plan(found, manifest, layout, replace, report, infer_padding)
        if strict:
            _validate_all(plan, pool, report)
            if report.rejected:
                report.committed = manifest.committed if manifest else 0
                report.seconds = time.perf_counter() - started
                return report
        if plan.appends or plan.replacements:
            with store.nothing_committed(location, "writing"):
                group, manifest = _prepare(location, manifest, plan, dtype)
                _replace(location, group, manifest, plan.replacements, report)
                client = client if client is not None else cluster.active_client()
                if client is not None:
                    _append_distributed(client, location, group, manifest, plan.appends, report, progress)
                else:
                    _append(location, group, manifest, plan.appends, pool, jobs, report, progress)
            if new_store and manifest.committed == 0:  # every file was rejected: leave no empty store behind
                location.remove()
                report.seconds = time.perf_counter() - started
                return report
            report.seconds = time.perf_counter() - started
            manifest.ingests.append(
                {
                    "time": store.now(),
                    "inputs": [os.fspath(i) for i in inputs],
                    "files": report.files_ingested,
                    "batches": report.batches_added,
                    "rejected": len(report.rejected),
                    "seconds": round(report.seconds, 3),
                }
            )
            store.commit(location, manifest)
            report.written = True
        elif manifest is not None:
            store.refresh_consolidated(location)  # a run killed after its commit may have left it stale
        report.committed = manifest.committed if manifest else 0
    report.seconds = time.perf_counter() - started
    return report


# ---------------------------------------------------------------- planning


def _plan(found: dumps.Found, manifest, layout, replace, report, infer_padding: bool = True) -> _Plan:
    """Classify every found file from its stat and header alone (no array data read).

    A file is known by `dumps.file_key` (its absolute path, symlinks resolved), so a
    same-named file in another folder is another file, and `replace` only ever rewrites
    the batches of the very file it names."""
    plan = _Plan()
    known = manifest.files if manifest else {}
    shape = (manifest.layers, manifest.heads) if manifest and manifest.committed else None
    for path in found.files:
        key = dumps.file_key(path)
        source = os.path.relpath(path, found.base).replace(os.sep, "/")
        entry = known.get(key)
        if entry is not None:
            relaid = layout is not None and entry.layout not in (None, dumps.normalise_layout(layout))
            if not relaid and _unchanged(path, entry):
                report.files_unchanged += 1
                continue
            if not replace:
                why = (
                    f"was ingested with layout '{entry.layout}', now '{dumps.normalise_layout(layout)}'"
                    if relaid
                    else "changed since it was ingested (its content hash differs)"
                )
                report.rejected.append(Rejection(path, f"{why}; ingest it with replace to take the new content"))
                continue
        try:
            header = dumps.scan(path, layout, infer_padding=infer_padding)
        except DumpError as exc:
            report.rejected.append(Rejection(path, str(exc)))
            continue
        if shape is None:
            shape = (header.layers, header.heads)
        if (header.layers, header.heads) != shape:
            report.rejected.append(
                Rejection(
                    path,
                    f"has {header.layers} layers x {header.heads} heads; the store has {shape[0]} x {shape[1]}",
                )
            )
            continue
        if entry is not None:
            if header.batch != entry.stop - entry.start:
                count = entry.stop - entry.start
                reason = f"replacing needs the same number of samples ({count} ingested, {header.batch} now)"
                report.rejected.append(Rejection(path, reason))
                continue
            plan.replacements.append((_Named(key, source), header))
        else:
            plan.appends.append((_Named(key, source), header))
    _check_cross_attention(plan, manifest, report)
    return plan


def _unchanged(path: str, entry: store.FileEntry) -> bool:
    """Same size and mtime, or else the same content hash (read from the zip directory)."""
    stat = os.stat(path)
    if stat.st_size == entry.size and stat.st_mtime_ns == entry.mtime_ns:
        return True
    return dumps.content_hash(path) == entry.content_hash


def _check_cross_attention(plan: _Plan, manifest, report) -> None:
    """Self-attention dumps may be ragged; cross-attention (query != key) ones must all share
    one shape, the store's, since one `length` per sample cannot describe their valid block."""
    headers = [h for _, h in plan.appends + plan.replacements]
    if manifest is not None and manifest.committed:
        want = tuple(manifest.cross) if manifest.cross else None  # None: a self-attention store
    elif headers and any(h.query != h.key for h in headers):
        want = (headers[0].query, headers[0].key)
    else:
        return
    kept = {"appends": [], "replacements": []}
    for kind, items in kept.items():
        for name, h in getattr(plan, kind):
            if (h.query, h.key) == want or (want is None and h.query == h.key):
                items.append((name, h))
                continue
            shape = "query = key" if want is None else f"{want[0]} x {want[1]} (query x key)"
            report.rejected.append(Rejection(h.path, f"this store takes {shape}; this dump is {h.query} x {h.key}"))
    plan.appends, plan.replacements = kept["appends"], kept["replacements"]


def _validate_all(plan: _Plan, pool: ThreadPoolExecutor, report: IngestReport) -> None:
    """--strict: read and validate every planned file before anything is written."""

    def check(header):
        try:
            dumps.read(header)
        except DumpError as exc:
            return Rejection(header.path, str(exc))
        return None

    for rejection in pool.map(check, [h for _, h in plan.appends + plan.replacements]):
        if rejection is not None:
            report.rejected.append(rejection)


def _prepare(location, manifest, plan: _Plan, dtype: str):
    """Create the store (first commit) or grow it, for every planned sample at the longest length."""
    headers = [h for _, h in plan.appends + plan.replacements]
    query = max(h.query for h in headers)
    key = max(h.key for h in headers)
    if manifest is None or manifest.committed == 0:
        files, ingests = (manifest.files, manifest.ingests) if manifest else ({}, [])
        manifest = store.create(location, layers=headers[0].layers, heads=headers[0].heads, query=query, key=key, dtype=dtype)
        manifest.files, manifest.ingests = files, ingests
    group = store.open_group(location)
    planned = manifest.committed + sum(h.batch for _, h in plan.appends)
    grown = {spec.name: group[spec.name].shape for spec in store.present(group) if spec.batched and {"query", "key"} & set(spec.dims)}
    store.resize(group, batch=planned, query=query, key=key)
    for name, old_shape in grown.items():  # committed batches' chunks beyond their old query/key edge
        store.WholeChunks(location, group[name]).fill_new_chunks(old_shape, manifest.committed)
    manifest.max_length = max(manifest.max_length, query, key)
    if query != key:
        manifest.cross = [query, key]
    return group, manifest


# ---------------------------------------------------------------- writing


@dataclass
class _Sample:
    dump: dumps.Dump
    index: int  # position in the dump's batch axis
    source: str
    placed: bool = False  # its weights are in its chunk row already (`_read_placed`)


class _ChunkWriter:
    """Writes whole batch-chunks: new samples over whatever committed batches the chunk holds.

    Chunk by chunk, each filled into one reused buffer of the calling thread, encoded and
    written there (`store.WholeChunks`): memory is one chunk per writing thread whatever the
    sequence length, and no chunk waits on another thread.
    """

    #: Chunks written between two hand-backs of a mapped dump's pages (see `dumps.Dump.release`).
    RELEASE_EVERY = 8

    def __init__(self, location: store.Location, group):
        self.attention = group["attention"]
        self.attention_chunks = store.WholeChunks(location, self.attention)
        # the store's per-sample arrays (a store created before an optional one lacks it, and keeps no values for it)
        self.per_batch = {spec.name: (spec, group[spec.name]) for spec in store.present(group) if spec.batched and spec is not store.schema.ATTENTION}
        self.per_batch_chunks = {name: store.WholeChunks(location, array) for name, (_, array) in self.per_batch.items()}
        self._buffers = threading.local()

    def _buffer(self) -> np.ndarray:
        """This thread's chunk buffer: reused, so no chunk pays for fresh pages."""
        buffer = getattr(self._buffers, "chunk", None)
        if buffer is None:
            buffer = self._buffers.chunk = self.attention_chunks.empty()
        return buffer

    def _pieces(self, batch_chunk: int):
        """(grid position, layer, heads, queries, keys) of every attention chunk in one batch-chunk row."""
        _, layers, heads, query, key = self.attention.shape
        _, _, hc, qc, kc = self.attention.chunks
        for layer in range(layers):
            for h0 in range(0, heads, hc):
                for q0 in range(0, query, qc):
                    for k0 in range(0, key, kc):
                        yield (
                            (batch_chunk, layer, h0 // hc, q0 // qc, k0 // kc),
                            layer,
                            slice(h0, min(h0 + hc, heads)),
                            slice(q0, min(q0 + qc, query)),
                            slice(k0, min(k0 + kc, key)),
                        )

    def whole_samples(self) -> bool:
        """Whether each attention chunk holds whole (head, query, key) blocks of one layer, so
        that a batch-chunk row of them (`row_buffer`) takes each new sample as it is read."""
        shape, chunks = self.attention.shape, self.attention.chunks
        row_bytes = shape[1] * math.prod(chunks) * self.attention_chunks.dtype.itemsize
        return chunks[1] == 1 and tuple(chunks[2:]) == tuple(shape[2:]) and row_bytes <= ROW_BYTES

    def row_buffer(self) -> np.ndarray:
        """A batch-chunk row of attention chunks, (layer, batch, head, query, key): `row[layer]`
        is one chunk's bytes, and `row[:, i]` the place of the row's i-th sample."""
        _, layers, _, query, key = self.attention.shape
        batch, _, heads, _, _ = self.attention.chunks
        return np.empty((layers, batch, heads, query, key), dtype=self.attention_chunks.dtype)

    def write(self, start: int, samples: dict[int, _Sample], stop: int, committed: int, row: np.ndarray | None = None) -> None:
        """Write batches [start, stop) (`start` on a chunk boundary): `samples` by batch index,
        the rest from the store; the chunk's rows past `stop` hold the fill value. With `row`
        (`row_buffer`), the samples placed are in it already; the others are filled in here."""
        count = stop - start
        old = max(0, min(stop, committed) - start)
        if row is not None:
            whole = tuple(slice(0, n) for n in row.shape[2:])
            for layer, chunk in enumerate(row, 1):
                chunk[count:] = np.nan
                if old:
                    chunk[:old] = self.attention[start : start + old, layer - 1]
                for batch, sample in samples.items():
                    if not sample.placed:
                        _fill(chunk[batch - start], sample, layer - 1, *whole)
                self.attention_chunks.write((start // self.attention.chunks[0], layer - 1, 0, 0, 0), chunk[:, np.newaxis])
                if layer % self.RELEASE_EVERY == 0:
                    for sample in samples.values():
                        sample.dump.release()
            self._write_rows(start, samples, count, old)
            for sample in samples.values():
                sample.dump.release()
            return
        buffer = self._buffer()
        for done, (coords, layer, heads, queries, keys) in enumerate(self._pieces(start // self.attention.chunks[0]), 1):
            h, q, k = heads.stop - heads.start, queries.stop - queries.start, keys.stop - keys.start
            buffer[count:] = np.nan
            buffer[:count, :, h:] = np.nan  # past the array's edge: the fill value, as zarr writes it
            buffer[:count, :, :h, q:] = np.nan
            buffer[:count, :, :h, :q, k:] = np.nan
            if old:
                buffer[:old, :, :h, :q, :k] = self.attention[start : start + old, layer : layer + 1, heads, queries, keys]
            for batch, sample in samples.items():
                _fill(buffer[batch - start, 0, :h, :q, :k], sample, layer, heads, queries, keys)
            self.attention_chunks.write(coords, buffer)
            if done % self.RELEASE_EVERY == 0:
                for sample in samples.values():
                    sample.dump.release()  # a large dump's pages: read again only where needed
        self._write_rows(start, samples, count, old)

    def _write_rows(self, start: int, samples: dict[int, _Sample], count: int, old: int) -> None:
        """The per-sample arrays' chunk of rows [start, start + count)."""
        rows = {name: spec.empty((count, *array.shape[1:]), self.attention.dtype) for name, (spec, array) in self.per_batch.items()}
        if old:
            for name, values in rows.items():
                values[:old] = self.per_batch[name][1][start : start + old]
        for batch, sample in samples.items():
            _sample_rows(rows, batch - start, sample)
        for name, values in rows.items():
            self.per_batch_chunks[name].write_rows(start, values)
        for sample in samples.values():
            sample.dump.release()


def _sample_rows(rows: dict[str, np.ndarray], i: int, sample: _Sample) -> None:
    """Row `i` of every per-sample array of the store (`rows`, by name) from one sample; an array
    the dump has nothing for keeps the fill value there ("" tokens, -1 token ids)."""
    dump = sample.dump
    n = int(dump.lengths[sample.index])
    for name, value in (("length", n), ("source", sample.source), ("source_index", sample.index)):
        rows[name][i] = value
    width = min(n, dump.header.query)
    for name, per_token in (("token", dump.tokens), ("input_id", dump.input_ids)):
        if per_token is not None and name in rows:
            rows[name][i, :width] = per_token[sample.index, :width]


def _fill(out: np.ndarray, sample: _Sample, layer: int, heads: slice, queries: slice, keys: slice) -> None:
    """`out` (heads, queries, keys) from one sample: its valid block, NaN everywhere else."""
    attention = sample.dump.attention[sample.index, layer, heads]
    n = int(sample.dump.lengths[sample.index])
    q = max(0, min(queries.stop, n, attention.shape[-2]) - queries.start)
    k = max(0, min(keys.stop, n, attention.shape[-1]) - keys.start)
    out[:, :q, :k] = attention[:, queries.start : queries.start + q, keys.start : keys.start + k]
    out[:, q:, :] = np.nan
    out[:, :q, k:] = np.nan


def _replace(location, group, manifest: store.Manifest, replacements, report: IngestReport) -> None:
    """--replace: rewrite a changed file's batches in place, one whole chunk at a time."""
    writer = _ChunkWriter(location, group)
    for name, header in replacements:
        try:
            dump = dumps.read(header)
        except DumpError as exc:
            report.rejected.append(Rejection(header.path, str(exc)))
            continue
        entry = manifest.files[name.key]
        first, last = entry.start, entry.stop
        samples = {first + i: _Sample(dump, i, name.source) for i in range(header.batch)}
        chunk = manifest.batch_chunk
        for start in range(first - first % chunk, last, chunk):
            stop = min(start + chunk, manifest.committed)
            mine = {b: s for b, s in samples.items() if start <= b < stop}
            writer.write(start, mine, stop, manifest.committed)
        manifest.files[name.key] = _entry(header, name, dump.content_hash, first, last)
        report.files_replaced += 1
        report.bytes_read += header.samples_bytes


def _entry(header: dumps.DumpHeader, name: _Named, content_hash: str, start: int, stop: int,
           duplicate_of: str | None = None) -> store.FileEntry:
    return store.FileEntry(
        source=name.source,
        size=header.size,
        mtime_ns=header.mtime_ns,
        content_hash=content_hash,
        start=start,
        stop=stop,
        status=store.Status.INGESTED if duplicate_of is None else store.Status.DUPLICATE,
        duplicate_of=duplicate_of,
        layout=header.layout,
        dtype=header.dtype.name,  # the dump's own: check applies the row-sum tolerance ingest applied to it
        tokens=header.member(dumps.TOKENS) is not None,  # spares reading the token strings when no dump had them
    )


class _Assigner:
    """Gives batch indices, in file order, to the files that passed; a file whose content
    is already in the store under another name is recorded as a duplicate, not stored twice."""

    def __init__(self, manifest: store.Manifest, report: IngestReport):
        self.manifest, self.report = manifest, report
        self.next = manifest.committed
        files = manifest.files.items()
        self.seen = {entry.content_hash: rel for rel, entry in files if entry.ingested}

    def take(self, name: _Named, header: dumps.DumpHeader, result) -> int | None:
        """The first batch index for this file, or None when it is skipped."""
        if isinstance(result, Rejection):
            self.report.rejected.append(result)
            return None
        content_hash = result if isinstance(result, str) else result.content_hash
        original = self.seen.get(content_hash)
        if original is not None:
            self.report.duplicates.append(Rejection(header.path, f"same content as {original}; skipped"))
            kept = self.manifest.files[original]
            self.manifest.files[name.key] = _entry(header, name, content_hash, kept.start, kept.stop, original)
            return None
        self.seen[content_hash] = name.key
        first, self.next = self.next, self.next + header.batch
        self.manifest.files[name.key] = _entry(header, name, content_hash, first, self.next)
        self.report.files_ingested += 1
        self.report.bytes_read += header.samples_bytes
        self.report.inferred_lengths += getattr(result, "inferred", 0)
        return first


def _read(header: dumps.DumpHeader):
    try:
        return dumps.read(header)
    except DumpError as exc:
        return Rejection(header.path, str(exc))


def _read_placed(header: dumps.DumpHeader, places: list[np.ndarray]):
    """Read a dump's samples into their places in chunk rows (`_ChunkWriter.row_buffer`):
    straight from the file when `dumps.read_into` can, else read and copied there."""
    try:
        dump = dumps.read_into(header, places)
        if dump is None:
            dump = dumps.read(header)
            heads, queries, keys = (slice(0, n) for n in places[0].shape[1:])
            for index, place in enumerate(places):
                for layer, out in enumerate(place):
                    _fill(out, _Sample(dump, index, ""), layer, heads, queries, keys)
                dump.release()
            dump.attention = places
        return dump
    except DumpError as exc:
        return Rejection(header.path, str(exc))


class _Rows:
    """Chunk rows (`_ChunkWriter.row_buffer`) by their first batch, the place of each sample
    a file is read into; a written row's buffer is reused for the next."""

    def __init__(self, writer: _ChunkWriter, chunk: int):
        self.writer, self.chunk = writer, chunk
        self.rows: dict[int, np.ndarray] = {}
        self.free: list[np.ndarray] = []

    def place(self, batch: int) -> np.ndarray:
        """Batch `batch`'s (layer, head, query, key) place."""
        start = batch - batch % self.chunk
        return self.row(start)[:, batch - start]

    def row(self, start: int) -> np.ndarray:
        row = self.rows.get(start)
        if row is None:
            row = self.rows[start] = self.free.pop() if self.free else self.writer.row_buffer()
        return row

    def take(self, start: int) -> np.ndarray:
        """The row of `start`, to be written: no sample is placed in it any more."""
        row = self.rows.pop(start, None)
        return row if row is not None else self.writer.row_buffer()

    def write(self, start: int, samples: dict[int, _Sample], stop: int, committed: int, row: np.ndarray) -> None:
        """Write a row taken (on a writing thread), then keep its buffer for another."""
        try:
            self.writer.write(start, samples, stop, committed, row)
        finally:
            self.free.append(row)


def _finish(group, manifest: store.Manifest, report: IngestReport, next_batch: int) -> None:
    if next_batch != group["attention"].shape[0]:
        store.resize(group, batch=next_batch)
    report.batches_added = next_batch - manifest.committed
    manifest.committed = next_batch


def _append(location, group, manifest: store.Manifest, appends, pool, jobs, report: IngestReport, progress) -> None:
    """Read files in parallel, assign batch indices in file order, write each full chunk.

    When the chunks hold whole samples (`_ChunkWriter.whole_samples`), each file is read
    straight into the places its samples will take in chunk rows (`_Rows`), one copy less:
    a file is placed when its read is submitted, after those before it, as if all of them
    pass. A file that is rejected (or a duplicate) moves the files read after it back to
    their batch indices (a copy each) and holds new reads until they are placed. A file
    larger than `dumps.MAP_BYTES` is mapped and copied into its row when that is written.
    """
    writer = _ChunkWriter(location, group)
    assigner = _Assigner(manifest, report)
    committed = manifest.committed
    chunk = manifest.batch_chunk
    rows = _Rows(writer, chunk) if writer.whole_samples() else None
    chunk_start = committed - committed % chunk
    pending: dict[int, _Sample] = {}
    writes: deque[Future] = deque()
    reads: deque[tuple[str, dumps.DumpHeader, int | None, Future]] = deque()  # (..., its place, or None)
    todo = iter(appends)
    window = 2 * jobs + 2
    placed = committed  # the next batch index a submitted read's samples take
    moving = False  # a file was skipped: the reads in flight are placed too far

    def flush(stop: int) -> None:
        nonlocal pending, chunk_start
        if rows is None:
            writes.append(write_pool.submit(writer.write, chunk_start, pending, stop, committed))
        else:
            writes.append(write_pool.submit(rows.write, chunk_start, pending, stop, committed, rows.take(chunk_start)))
        pending, chunk_start = {}, stop
        while len(writes) > jobs:
            writes.popleft().result()

    def refill() -> None:
        nonlocal placed
        while len(reads) < window and not moving:
            item = next(todo, None)
            if item is None:
                return
            name, header = item
            if rows is not None and header.size <= dumps.MAP_BYTES:
                future = pool.submit(_read_placed, header, [rows.place(placed + i) for i in range(header.batch)])
                reads.append((name, header, placed, future))
            else:  # a large file is mapped and its pages handed back as its chunks are filled (see dumps.MAP_BYTES)
                reads.append((name, header, None, pool.submit(_read, header)))
            placed += header.batch

    # Chunk writes get threads of their own (each fills, compresses and writes its chunks,
    # most of it outside the GIL): a batch-chunk being written never holds back the reads.
    with ThreadPoolExecutor(jobs, thread_name_prefix="fastattn-chunk") as write_pool:
        refill()
        done = 0
        while reads:
            name, header, at, future = reads.popleft()
            refill()
            result = future.result()
            done += 1
            if progress:
                progress(done, len(appends))
            first = assigner.take(name, header, result)
            if first is None:
                moving = rows is not None
            else:
                if at is not None and first != at:
                    for index in range(header.batch):  # back, in order: a place is left before it is taken
                        rows.place(first + index)[...] = rows.place(at + index)
                for index in range(header.batch):
                    pending[first + index] = _Sample(result, index, name.source, placed=at is not None)
                    if (first + index + 1) % chunk == 0:
                        flush(first + index + 1)
            if moving and not reads:
                moving, placed = False, assigner.next
                refill()
        if pending:
            flush(assigner.next)
        while writes:
            writes.popleft().result()
    _finish(group, manifest, report, assigner.next)


# ---------------------------------------------------------------- on a dask cluster


def _hash_or_rejection(header: dumps.DumpHeader):
    """Worker side of pass 1: validate a file, send back only its content hash."""
    result = _read(header)
    return result if isinstance(result, Rejection) else result.content_hash


def _write_chunk(url: str, storage_options: dict, start: int, stop: int, committed: int, members: list) -> int:
    """Worker side of pass 2: read the files of one batch-chunk again and write it whole.

    A file whose content hash differs from pass 1 changed during the ingest: the task fails
    and nothing is committed.
    """
    location = store.Location(url, storage_options)
    loaded: dict[str, dumps.Dump] = {}
    samples = {}
    for source, header, index, batch, content_hash in members:
        if header.path not in loaded:
            loaded[header.path] = dumps.read(header)
        dump = loaded[header.path]
        if dump.content_hash != content_hash:
            raise DumpError(f"{header.path}: changed while being ingested")
        samples[batch] = _Sample(dump, index, source)
    _ChunkWriter(location, store.open_group(location)).write(start, samples, stop, committed)
    return stop - start


def _append_distributed(client, location, group, manifest, appends, report: IngestReport, progress) -> None:
    """Two passes, so attention never travels to the client: workers validate every file and
    return its content hash; the client assigns batch indices; workers write whole chunks,
    each reading its own files. Lost workers' tasks are retried by dask (the writes are
    idempotent); the client alone commits."""
    assigner = _Assigner(manifest, report)
    committed = manifest.committed
    chunk = manifest.batch_chunk
    futures = client.map(_hash_or_rejection, [h for _, h in appends], pure=False)
    members: dict[int, list] = {}
    for done, ((name, header), future) in enumerate(zip(appends, futures), start=1):
        result = future.result()
        if progress:
            progress(done, 2 * len(appends))
        first = assigner.take(name, header, result)
        if first is None:
            continue
        for index in range(header.batch):
            batch = first + index
            members.setdefault(batch - batch % chunk, []).append((name.source, header, index, batch, result))
    writes = [
        client.submit(
            _write_chunk, location.url, location.storage_options, start, min(start + chunk, assigner.next),
            committed, items, pure=False,
        )
        for start, items in sorted(members.items())
    ]
    for done, future in enumerate(writes, start=1):
        future.result()
        if progress:
            progress(len(appends) + round(done * len(appends) / len(writes)), 2 * len(appends))
    _finish(group, manifest, report, assigner.next)
