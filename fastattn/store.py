"""The Zarr schema: create, open, grow, lock and commit a fastattn store.

Layout of `store.zarr` (Zarr v3, opened by plain `xarray.open_zarr` too):

    attention     (batch, layer, head, query, key)  float32/float16, NaN outside valid blocks
    length        (batch,)                          int32, valid tokens of each sample
    source        (batch,)                          str, the dump it came from, relative to the common parent of its ingest's inputs
    source_index  (batch,)                          int32, position in that file's batch axis
    token         (batch, query)                    str, token strings when dumps carry them
    batch, layer, head, query, key                  int32 coordinates (positions)
    _fastattn/manifest.json                         the commit record (see below)
    _fastattn/lock                                  present while a writer works

The manifest is the commit record: readers trust its `committed` batch count and
`max_length`, never the array shapes, so whatever a crash left past the last commit
is invisible. Committing is one atomic write of `manifest.json` (a rename locally,
a single PUT on object storage).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import json
import os
import socket
import stat
import struct
import threading
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import google_crc32c  # zarr's own checksum library (a dependency of zarr)
import numpy as np
import zarr
from zarr.abc.codec import SupportsSyncCodec
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype

from .errors import StoreError

if TYPE_CHECKING:
    import xarray as xr

FORMAT_VERSION = 1
#: fastattn's own files live in a group of their own, so readers listing the root never meet them.
META = "_fastattn"
MANIFEST = f"{META}/manifest.json"
LOCK = f"{META}/lock"
DIMS = ("batch", "layer", "head", "query", "key")
PER_BATCH = ("length", "source", "source_index")
#: Target uncompressed size of one chunk: a few MB, so a chunk decodes in about a millisecond.
CHUNK_BYTES = 4 << 20
MAX_BATCH_CHUNK = 256


def compressors():
    """blosc lz4 with byte shuffle, then a crc32c checksum so flipped bits are found.

    Chosen by `python -m benchmarks.codecs` on the MiniLM samples (numbers in README):
    zstd-1 compresses ~10% smaller but decodes at about half the speed.
    """
    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_url(location: str) -> bool:
    return "://" in str(location)


# ---------------------------------------------------------------- manifest


@dataclass
class Manifest:
    """The commit record: committed batches, the store's shape, every ingested file."""

    committed: int = 0
    layers: int = 0
    heads: int = 0
    max_length: int = 0
    dtype: str = "float32"
    batch_chunk: int = 1
    files: dict | None = None  # absolute path -> {source, size, mtime_ns, content_hash, start, stop, status, layout}
    ingests: list | None = None  # one entry per ingest run
    cross: list | None = None  # [query, key] of a cross-attention store
    stats_committed: int = 0
    stats_k: int = 0

    def to_json(self) -> bytes:
        body = {"format": "fastattn-manifest", "version": FORMAT_VERSION, **self.__dict__}
        return json.dumps(body, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse and validate a manifest; a damaged one (cut short, not JSON, a field of the
        wrong type) is a StoreError saying what is wrong, without the path (callers add it)."""
        try:
            body = json.loads(data)
        except ValueError as exc:  # also bytes that are not UTF-8
            raise StoreError(f"damaged: not valid JSON ({exc})") from None
        if not isinstance(body, dict) or body.get("format") != "fastattn-manifest":
            raise StoreError("not a fastattn manifest")
        problem = _manifest_problem(body)
        if problem:
            raise StoreError(f"damaged: {problem}")
        fields = {k: v for k, v in body.items() if k in cls.__dataclass_fields__}
        manifest = cls(**fields)
        manifest.files = manifest.files or {}
        manifest.ingests = manifest.ingests or []
        return manifest


def source_name(key: str, entry: dict) -> str:
    """The `source` a file entry's batches show: its name relative to its run's inputs
    (entries of stores written before file keys were absolute paths: the key itself)."""
    return entry.get("source", key)


#: Readers trust the manifest, so every field is checked once, here, before anyone uses it.
_COUNTS = ("committed", "layers", "heads", "max_length", "batch_chunk", "stats_committed", "stats_k")
_REQUIRED = ("committed", "layers", "heads", "max_length", "dtype", "batch_chunk", "files")
_FILE_ENTRY = {"size": int, "mtime_ns": int, "content_hash": str, "start": int, "stop": int, "status": str}
_INGEST_ENTRY = {"time": str, "files": int, "batches": int, "rejected": int, "seconds": (int, float)}


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_problem(where: str, entry, spec: dict) -> str | None:
    if not isinstance(entry, dict):
        return f"{where} must be a mapping, not {type(entry).__name__}"
    for name, kind in spec.items():
        value = entry.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{where}['{name}'] is {value!r:.40}, not {getattr(kind, '__name__', 'a number')}"
    return None


def _manifest_problem(body: dict) -> str | None:
    """The first thing wrong with a parsed manifest, or None."""
    for name in _COUNTS:
        if name in body and not _is_count(body[name]):
            return f"'{name}' is {body[name]!r:.40}, not a count (a whole number >= 0)"
    if body.get("dtype", "float32") not in ("float32", "float16"):
        return f"'dtype' is {body['dtype']!r:.40}, not float32 or float16"
    missing = [name for name in _REQUIRED if name not in body]
    if missing:
        return f"{', '.join(repr(name) for name in missing)} missing"
    if body["batch_chunk"] < 1 or (body["committed"] and min(body["layers"], body["heads"], body["max_length"]) < 1):
        return "'batch_chunk', 'layers', 'heads' and 'max_length' must be at least 1"
    if not isinstance(body["files"], dict):
        return f"'files' is a {type(body['files']).__name__}, not a mapping of file entries"
    for rel, entry in body["files"].items():
        problem = _entry_problem(f"files['{rel}']", entry, _FILE_ENTRY)
        if problem:
            return problem
    ingests = body.get("ingests") or []
    if not isinstance(ingests, list):
        return f"'ingests' is a {type(ingests).__name__}, not a list"
    for i, entry in enumerate(ingests):
        problem = _entry_problem(f"ingests[{i}]", entry, _INGEST_ENTRY)
        if problem:
            return problem
    cross = body.get("cross")
    if cross is not None and not (isinstance(cross, list) and len(cross) == 2 and all(_is_count(v) for v in cross)):
        return f"'cross' is {cross!r:.40}, not [query, key]"
    return None


# ---------------------------------------------------------------- location


class Location:
    """Where a store lives: a local folder or an fsspec URL; knows how to commit there."""

    def __init__(self, location: str | os.PathLike, storage_options: dict | None = None):
        self.url = os.fspath(location)
        self.storage_options = storage_options or {}
        self.remote = is_url(self.url)
        if self.remote:
            self.fs, self.root = self._filesystem()
        else:
            if self.storage_options:
                raise StoreError(f"{self.url}: storage_options apply to store URLs (s3://...), not to a local path")
            self.fs, self.root = None, os.path.abspath(self.url)

    def _filesystem(self):
        """The fsspec filesystem of the URL, or one line on an unknown protocol, a missing
        package or a nested storage option given as a plain value."""
        import fsspec

        for protocol in self.url.split("://", 1)[0].split("::"):
            if protocol not in fsspec.available_protocols():
                raise StoreError(f"{self.url}: unknown protocol '{protocol}://' (fsspec has no filesystem for it)")
        for name, value in self.storage_options.items():
            if name.endswith("_kwargs") and not isinstance(value, dict):
                raise StoreError(
                    f"{self.url}: storage_options['{name}'] must be a mapping of options, not {value!r:.40}"
                    f" (e.g. {{'{name}': {{'region_name': ...}}}})"
                )
        try:
            return fsspec.core.url_to_fs(self.url, **self.storage_options)
        except ImportError as exc:  # e.g. "Install s3fs to access S3"
            raise StoreError(f"{self.url}: {_first_line(exc)}") from None
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{self.url}: storage options not accepted ({_first_line(exc)})") from None

    def __str__(self) -> str:
        return self.url

    def check_reachable(self) -> None:
        """One clear line for a store that cannot be reached: locally a path that is a file, a
        broken symbolic link or a loop; remotely a missing bucket, no or refused credentials,
        an endpoint that does not answer, storage options the filesystem rejects."""
        if not self.remote:
            _check_local_path(self.url, self.root)
            return
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.ls(bucket, refresh=True)
        except FileNotFoundError:
            raise StoreError(f"{self.url}: the bucket '{bucket}' does not exist") from None
        except PermissionError as exc:
            raise StoreError(f"{self.url}: access denied ({_first_line(exc)}); check the credentials") from None
        except OSError as exc:
            raise StoreError(f"{self.url}: cannot reach the store ({_first_line(exc)})") from None
        except (TypeError, AttributeError) as exc:  # an option of the wrong kind, found when the client is made
            raise StoreError(f"{self.url}: storage options not accepted ({_first_line(exc)})") from None
        except Exception as exc:  # each backend has its own errors (botocore's NoCredentialsError, ...)
            if "credential" in type(exc).__name__.lower():
                raise StoreError(f"{self.url}: no credentials found ({_first_line(exc)}); give key and secret in the"
                                 " storage options, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
            raise StoreError(f"{self.url}: cannot reach the store ({type(exc).__name__}: {_first_line(exc)})") from None

    def check_writable(self) -> None:
        """Before a writer takes the lock: one line for a local store that cannot be written (a
        read-only mount, no permission), instead of the first write failing. Object stores
        have no cheap probe; their first write reports it."""
        if self.remote:
            return
        target = self.root
        while not os.path.exists(target):  # a new store: its nearest existing parent must be writable
            target = os.path.dirname(target)
        folders = [target, os.path.join(target, META)] if target == self.root else [target]
        for folder in folders:
            if os.path.isdir(folder) and not os.access(folder, os.W_OK):
                why = "it is on a read-only file system" if os.statvfs(folder).f_flag & os.ST_RDONLY else "no permission to write it"
                where = "" if folder == self.root else f" ({folder})"
                raise StoreError(f"{self.url}: cannot write the store{where}: {why}; nothing was changed")

    def zarr_store(self, read_only: bool = False):
        if self.remote:
            return zarr.storage.FsspecStore.from_url(
                self.url, storage_options=self.storage_options or None, read_only=read_only
            )
        return zarr.storage.LocalStore(self.root, read_only=read_only)

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def exists(self, key: str = "") -> bool:
        if self.remote:
            return self.fs.exists(self._path(key) if key else self.root)
        return os.path.exists(os.path.join(self.root, key))

    def read(self, key: str) -> bytes | None:
        try:
            if self.remote:
                return self.fs.cat_file(self._path(key))
            return Path(self.root, key).read_bytes()
        except FileNotFoundError:
            return None

    def write_atomic(self, key: str, data: bytes) -> None:
        """Write `key` so a reader sees the old or the new bytes, never a torn file."""
        if self.remote:
            self.fs.pipe_file(self._path(key), data)  # one PUT: atomic on S3-compatible stores
            return
        target = Path(self.root, key)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no half-written file behind
            raise

    def write_chunk(self, key: str, buffers) -> None:
        """Write one chunk file whole from `buffers` (written one after the other), as zarr's
        stores do: locally a temporary `*.partial` file renamed over the key (a kill leaves the
        old or the new bytes, and at worst a `*.partial` that `check --repair` removes), remotely
        one PUT. No fsync, like zarr: the manifest's commit is what is made durable."""
        if self.remote:
            self.fs.pipe_file(self._path(key), b"".join(buffers))
            return
        write_file(os.path.join(self.root, key), buffers)

    def is_new(self) -> bool:
        """Missing, empty, or holding only fastattn's own folder (a first ingest that stopped early)."""
        if self.remote:
            names = self.fs.ls(self.root) if self.fs.exists(self.root) else []
            return all(n.rstrip("/").rsplit("/", 1)[-1] == META for n in names)
        if not os.path.exists(self.root):
            return True
        # a `*.partial` is zarr's temporary file of a write killed before its rename (the root zarr.json)
        return os.path.isdir(self.root) and {n for n in os.listdir(self.root) if not n.endswith(".partial")} <= {META}

    def remove(self) -> None:
        """Delete everything under the store (only ever a store this run created)."""
        if self.remote:
            if self.fs.exists(self.root):
                self.fs.rm(self.root, recursive=True)
            return
        for dirpath, dirs, files in os.walk(self.root, topdown=False):
            for name in files:
                path = os.path.join(dirpath, name)
                if path != os.path.join(self.root, LOCK):  # the lock goes when it is released
                    os.remove(path)
            for name in dirs:
                with contextlib.suppress(OSError):  # the lock's folder stays until then
                    os.rmdir(os.path.join(dirpath, name))

    def nbytes(self, prefix: str = "") -> int:
        """Bytes stored under `prefix` (the size on disk of an array's chunks)."""
        if self.remote:
            return int(self.fs.du(self._path(prefix) if prefix else self.root))
        total = 0
        for dirpath, _dirs, files in os.walk(os.path.join(self.root, prefix)):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        return total


def write_file(path: str, buffers) -> None:
    """`path` replaced whole by the bytes of `buffers`, through a temporary file renamed over it
    (zarr's LocalStore writes the same way), its folder made when missing."""
    tmp = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        f = open(tmp, "wb")
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(tmp, "wb")
    try:
        with f:
            for buffer in buffers:
                f.write(buffer)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)  # e.g. a full disk: leave no half-written file behind
        raise


def _first_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).strip().splitlines()[0]


def _check_local_path(url: str, root: str) -> None:
    """A local store path must be a folder or not exist yet (ingest creates it)."""
    try:
        mode = os.stat(root).st_mode
    except FileNotFoundError:
        if os.path.islink(root):
            raise StoreError(f"{url}: a symbolic link to {os.readlink(root)}, which does not exist") from None
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(f"{url}: a loop of symbolic links, which leads to no folder") from None
        if exc.errno == errno.ENOTDIR:
            raise StoreError(f"{url}: a part of the path is a file, not a folder") from None
        raise StoreError(f"{url}: cannot be opened ({exc.strerror or exc})") from None
    if not stat.S_ISDIR(mode):
        raise StoreError(f"{url}: a file, not a store (a store is a folder)")


# ---------------------------------------------------------------- store


def _key_url(location: Location, key: str) -> str:
    return f"{str(location).rstrip('/')}/{key}"


def read_manifest(location: Location) -> Manifest | None:
    """The committed manifest, None before the first commit; a damaged one is a StoreError naming it."""
    data = location.read(MANIFEST)
    if data is None:
        return None
    try:
        return Manifest.from_json(data)
    except StoreError as exc:
        raise StoreError(f"{_key_url(location, MANIFEST)}: {exc}") from None


def _read_json(location: Location, key: str):
    """A metadata file as JSON, None when missing or not JSON."""
    data = location.read(key)
    try:
        return None if data is None else json.loads(data)
    except ValueError:
        return None


def is_fastattn(location: Location) -> bool:
    root = _read_json(location, "zarr.json")
    attrs = root.get("attributes") if isinstance(root, dict) else None
    return isinstance(attrs, dict) and isinstance(attrs.get("fastattn"), dict)


def check_store(location: Location) -> Manifest:
    """The manifest of an existing fastattn store, or a one-line StoreError."""
    location.check_reachable()
    if not location.exists():
        raise StoreError(f"{location}: no such store")
    if not is_fastattn(location):
        raise StoreError(f"{location}: not a fastattn store (no fastattn metadata in zarr.json)")
    manifest = read_manifest(location)
    if manifest is None:
        raise StoreError(f"{location}: store has no committed ingest yet (run fastattn ingest)")
    version = _read_json(location, "zarr.json")["attributes"]["fastattn"].get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(f"{location}: store format {version}, this fastattn reads {FORMAT_VERSION}")
    _check_attention_metadata(location, manifest)
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
    meta = _read_json(location, key)
    if not isinstance(meta, dict) or meta.get("node_type") != "array":
        raise StoreError(f"{_key_url(location, key)}: missing or not valid Zarr array metadata")
    if meta.get("data_type") != manifest.dtype:
        raise StoreError(
            f"{_key_url(location, key)}: data_type is {meta.get('data_type')!r:.40}, but the manifest says"
            f" {manifest.dtype} (restore data_type to {manifest.dtype})"
        )
    if tuple(meta.get("dimension_names") or ()) != DIMS:
        raise StoreError(f"{_key_url(location, key)}: dimension_names are {meta.get('dimension_names')!r:.60}, not {list(DIMS)}")


def attention_chunks(heads: int, query: int, key: int, itemsize: int) -> tuple[int, int, int, int, int]:
    """The attention's chunk shape: about CHUNK_BYTES at any sequence length, whole key rows.

    Short sequences: one layer's planes of all heads, for as many batches as fit. When one
    sample's layer is larger than that, heads are split, and when one plane is, queries:
    (2 layers, 16 heads, 2048 x 2048) float32 gets (1, 1, 1, 256, 2048) chunks of 2 MB, not
    one of 256 MB. Readers take the shape from the array, so stores of any chunking open.
    """
    row = key * itemsize
    plane = query * row
    if heads * plane <= CHUNK_BYTES:
        return (int(min(MAX_BATCH_CHUNK, CHUNK_BYTES // (heads * plane))), 1, heads, query, key)
    if plane <= CHUNK_BYTES:
        return (1, 1, int(CHUNK_BYTES // plane), query, key)
    return (1, 1, 1, int(max(1, CHUNK_BYTES // row)), key)


def create(location: Location, *, layers: int, heads: int, query: int, key: int, dtype: str) -> Manifest:
    """Lay out an empty store (batch 0), replacing the arrays an uncommitted crash left
    (array by array, so the lock file beside them stays)."""
    chunks = attention_chunks(heads, query, key, np.dtype(dtype).itemsize)
    chunk = chunks[0]
    attrs = {"format_version": FORMAT_VERSION, "created": now()}
    # the root's first write already carries the attributes: a kill right after it leaves a store
    # the next ingest recognises as its own, not a foreign folder it must refuse
    group = zarr.open_group(
        location.zarr_store(), mode="a", zarr_format=3, use_consolidated=False, attributes={"fastattn": attrs}
    )
    group.attrs["fastattn"] = attrs
    group.require_group(META)
    # every array carries the checksum: a flipped byte in `length` or `source` must fail too, not decode to wrong values
    new_array = functools.partial(group.create_array, overwrite=True, compressors=compressors())
    new_array(
        "attention",
        shape=(0, layers, heads, query, key),
        chunks=chunks,
        dtype=dtype,
        fill_value=np.nan,
        dimension_names=DIMS,
        attributes={"long_name": "attention weight", "valid": "NaN outside each sample's length x length block"},
    )
    for name, dt, fill in (("length", "int32", 0), ("source_index", "int32", -1)):
        new_array(name, shape=(0,), chunks=(chunk,), dtype=dt, fill_value=fill, dimension_names=("batch",))
    new_array("source", shape=(0,), chunks=(chunk,), dtype=str, dimension_names=("batch",))
    new_array("token", shape=(0, query), chunks=(chunk, chunks[3]), dtype=str, dimension_names=("batch", "query"))
    for dim, size in zip(DIMS, (0, layers, heads, query, key)):
        new_array(dim, shape=(size,), chunks=(max(size, chunk),), dtype="int32", dimension_names=(dim,))
        if size:
            group[dim][:] = np.arange(size, dtype=np.int32)
    return Manifest(layers=layers, heads=heads, max_length=max(query, key), dtype=dtype, batch_chunk=chunk, files={}, ingests=[])


def open_group(location: Location, mode: str = "r+") -> zarr.Group:
    # Never the consolidated metadata: it describes the last commit, and writers need the arrays as they are.
    return zarr.open_group(location.zarr_store(read_only=mode == "r"), mode=mode, use_consolidated=False)


def resize(group: zarr.Group, *, batch: int, query: int = 0, key: int = 0) -> None:
    """Resize every array to `batch` batches; query and key only ever grow. Old values stay."""
    attention = group["attention"]
    _, layers, heads, q0, k0 = attention.shape
    query, key = max(query, q0), max(key, k0)
    attention.resize((batch, layers, heads, query, key))
    for name in PER_BATCH:
        group[name].resize((batch,))
    group["token"].resize((batch, query))
    for dim, size in (("batch", batch), ("query", query), ("key", key)):
        if group[dim].shape[0] != size:
            group[dim].resize((size,))
        if size:  # always: a run killed while writing them leaves the right size with a chunk missing
            group[dim][:] = np.arange(size, dtype=np.int32)


class _BloscInto:
    """c-blosc's `blosc_compress_ctx` from the library numcodecs ships, writing into a buffer of
    ours. zarr's BloscCodec calls the same function through numcodecs, with the same arguments,
    but into a new bytes object per chunk: its first writes to fresh memory cost a page fault
    every 4 KB, about 1 CPU-second per GB (docs/performance.md). None when that library does
    not export the function; the codec's own encoding is used then."""

    #: c-blosc 1's BLOSC_MAX_OVERHEAD: the output may exceed the input by its 16-byte header.
    OVERHEAD = 16
    #: zarr's shuffle names as c-blosc's numbers.
    SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}

    def __init__(self, function):
        self.function = function

    @classmethod
    def load(cls) -> _BloscInto | None:
        import ctypes

        import numcodecs
        import numcodecs.blosc
        from packaging.version import Version

        if Version(numcodecs.__version__) < Version("0.16"):
            return None  # zarr passes the codec's typesize to blosc from numcodecs 0.16 on; before, the buffer's (1)
        try:
            function = ctypes.CDLL(numcodecs.blosc.__file__).blosc_compress_ctx
        except (OSError, AttributeError):
            return None
        c = ctypes
        function.argtypes = [c.c_int, c.c_int, c.c_size_t, c.c_size_t, c.c_void_p, c.c_void_p, c.c_size_t, c.c_char_p, c.c_size_t, c.c_int]
        function.restype = c.c_int
        return cls(function)

    def compress(self, codec: BloscCodec, source: np.ndarray, out: np.ndarray) -> np.ndarray:
        """`source` (contiguous bytes) compressed as `codec` does, into `out`; the used part of it."""
        if len(out) < source.nbytes + self.OVERHEAD:
            raise ValueError(f"the output buffer holds {len(out)} bytes, not {source.nbytes + self.OVERHEAD}")
        size = self.function(
            codec.clevel, self.SHUFFLE[codec.shuffle.value], codec.typesize, source.nbytes, source.ctypes.data,
            out.ctypes.data, source.nbytes + self.OVERHEAD, codec.cname.value.encode(), codec.blocksize,
            1,  # no threads of blosc's own, as zarr has it (numcodecs.blosc.use_threads = False)
        )
        if size <= 0:
            raise RuntimeError(f"error during blosc compression: {size}")
        return out[:size]


_BLOSC_INTO = _BloscInto.load()


class WholeChunks:
    """Writes whole chunks of one array: encoded on the calling thread by the array's own
    codecs (as recorded in its metadata), then one file write or PUT per chunk.

    Why not `array[...] = values`: every zarr write hops to zarr's event loop, and from there
    to threads for the compression and for the file; on 2 cores those hops cost more CPU than
    the compression itself (docs/performance.md). And zarr's Crc32cCodec copies the whole
    chunk to append its 4 bytes; here the checksum is written after the chunk instead. The
    bytes on disk are the ones zarr writes (tests/test_chunks.py compares them), so any zarr
    reads them.
    """

    def __init__(self, location: Location, array: zarr.Array):
        meta = array.metadata
        self.location = location
        self.path = array.path
        self.shape = array.shape
        self.chunks = array.chunks
        self.dtype = meta.dtype.to_native_dtype()
        self.fill = meta.fill_value
        self._key = meta.encode_chunk_key
        self._spec = meta.get_chunk_spec((0,) * array.ndim, array.config, default_buffer_prototype())
        self._outputs = threading.local()
        codecs = list(meta.codecs)
        self.checksum = isinstance(codecs[-1], Crc32cCodec)
        self.codecs = codecs[:-1] if self.checksum else codecs
        for codec in self.codecs:
            if not isinstance(codec, SupportsSyncCodec):
                raise StoreError(f"{location}/{self.path}: its codec {type(codec).__name__} cannot encode here")

    def empty(self) -> np.ndarray:
        """A buffer of one chunk's shape and dtype, uninitialised."""
        return np.empty(self.chunks, dtype=self.dtype)

    def _blosc_buffer(self, size: int) -> np.ndarray:
        """This thread's output buffer for blosc, reused from chunk to chunk."""
        out = getattr(self._outputs, "blosc", None)
        if out is None or len(out) < size:
            out = self._outputs.blosc = np.empty(size, dtype=np.uint8)
        return out

    def encode(self, chunk: np.ndarray) -> list:
        """The stored bytes of one chunk, as buffers to write one after the other (valid until
        this thread's next `encode`: blosc's output buffer is reused)."""
        spec = self._spec
        data = spec.prototype.nd_buffer.from_numpy_array(chunk)
        for codec in self.codecs:
            if isinstance(codec, BloscCodec) and _BLOSC_INTO is not None:
                source = np.ascontiguousarray(data.as_numpy_array()).view(np.uint8).reshape(-1)
                out = self._blosc_buffer(source.nbytes + _BloscInto.OVERHEAD)
                data = spec.prototype.buffer.from_array_like(_BLOSC_INTO.compress(codec, source, out))
            else:
                data = codec._encode_sync(data, spec)
            spec = codec.resolve_metadata(spec)
        payload = data.as_numpy_array()
        if not self.checksum:
            return [payload]
        return [payload, struct.pack("<I", google_crc32c.value(payload))]  # the crc32c codec: little-endian, last

    def write(self, coords: tuple[int, ...], chunk: np.ndarray) -> None:
        """Write the chunk at grid position `coords`; `chunk` has the full chunk shape."""
        self.location.write_chunk(f"{self.path}/{self._key(coords)}", self.encode(chunk))

    def fill_new_chunks(self, old_shape: tuple[int, ...], rows: int) -> None:
        """Write the fill value into each chunk of rows [0, rows) that growing the array from
        `old_shape` added (longer sequences arrived). Unwritten, they would read as the fill
        value too, but `fastattn check` holds every chunk of a committed batch to exist."""
        old = [-(-size // step) for size, step in zip(old_shape, self.chunks)]
        new = [-(-size // step) for size, step in zip(self.shape, self.chunks)]
        row_chunks = range(-(-rows // self.chunks[0]))
        added = [
            position
            for position in itertools.product(row_chunks, *(range(n) for n in new[1:]))
            if any(i >= o for i, o in zip(position[1:], old[1:]))
        ]
        if added:
            payload = self.encode(np.full(self.chunks, self.fill, dtype=self.dtype))
            for position in added:
                self.location.write_chunk(f"{self.path}/{self._key(position)}", payload)

    def write_rows(self, start: int, values: np.ndarray) -> None:
        """Rows `start ..` of the array from `values` (at most one chunk of rows, `start` on a
        chunk boundary, every other dim whole): whole chunks, the fill value past `values`."""
        rows = self.chunks[0]
        if start % rows or len(values) > rows:
            raise ValueError(f"rows {start}..{start + len(values)} are not within one chunk of {rows}")
        inner = [range(0, size, step) for size, step in zip(self.shape[1:], self.chunks[1:])]
        for offsets in itertools.product(*inner):
            part = values[(slice(None), *(slice(o, o + c) for o, c in zip(offsets, self.chunks[1:])))]
            chunk = np.full(self.chunks, self.fill, dtype=self.dtype)
            chunk[tuple(slice(0, n) for n in part.shape)] = part
            self.write((start // rows, *(o // c for o, c in zip(offsets, self.chunks[1:]))), chunk)


#: Threads for `write_all` and `read_all`; created on first use, shared by the whole process.
_WRITES = ThreadPoolExecutor(8, thread_name_prefix="fastattn-write")


def write_all(writes) -> None:
    """Several zarr writes `(array, selection, values)` at once, waiting for all of them.

    Why: one zarr write spends most of its time waiting for its thread hops (encode, then
    store), ~5 ms on this VM even for a small array, so ten writes one after another cost
    ten times that, and ten at once barely more than one. Never call it from a task that is
    itself running on this pool.
    """
    for future in [_WRITES.submit(array.__setitem__, selection, values) for array, selection, values in writes]:
        future.result()


def read_all(reads) -> list[np.ndarray]:
    """Several zarr reads `(array, orthogonal selection)` at once, for the reason `write_all`
    gives; their values, in order."""
    futures = [_WRITES.submit(array.get_orthogonal_selection, selection) for array, selection in reads]
    return [future.result() for future in futures]


def commit(location: Location, manifest: Manifest) -> None:
    """The commit point: one atomic manifest write. Then refresh the consolidated metadata
    that plain `xr.open_zarr` reads (it may lag a crash behind; fastattn never reads it)."""
    try:
        location.write_atomic(MANIFEST, manifest.to_json())
    except OSError as exc:
        raise StoreError(
            f"{location}: writing the manifest failed ({exc.strerror or exc}); nothing was committed,"
            " the store still opens at its last commit"
        ) from None
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


# ---------------------------------------------------------------- lock


class Lock:
    """One writer at a time: the operating system's advisory lock (`flock`) on
    `_fastattn/lock`, held for the whole run.

    The kernel drops an flock when its holder exits, however it dies, so a dead process
    can never hold the lock and a reused pid can never look like a writer. The file also
    records pid, host, time and purpose, for the message a refused writer prints. Where
    the filesystem has no flock, an exclusive create with that record stands in, and a
    record naming a process that no longer runs on this host is taken over. Object stores
    have neither: remote stores rely on one writer by convention (README).
    """

    def __init__(self, location: Location, purpose: str):
        self.location = location
        self.purpose = purpose
        self.path = None if location.remote else os.path.join(location.root, LOCK)
        self._fd: int | None = None

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now(), "purpose": self.purpose}).encode()

    def __enter__(self) -> Lock:
        if self.path is None:
            return self
        try:
            self._fd = _flock(self.path)
        except BlockingIOError:
            raise self._busy(lock_holder(self.location) or {}) from None
        except NotImplementedError:  # no flock on this filesystem
            self._fd = None
            self._enter_exclusive_create()
            return self
        except OSError as exc:
            raise StoreError(f"{self.location}: cannot take the lock ({exc.strerror or exc})") from None
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, self._record(), 0)
        except OSError as exc:
            self.__exit__()
            raise StoreError(f"{self.location}: cannot take the lock ({exc.strerror or exc})") from None
        return self

    def _busy(self, holder: dict) -> StoreError:
        return StoreError(
            f"{self.location}: being written by {holder.get('purpose', 'another fastattn')}"
            f" (pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')});"
            " wait for it to finish"
        )

    def _enter_exclusive_create(self) -> None:
        for _attempt in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock_record(self.path)
                if holder is not None and _alive(holder):
                    raise self._busy(holder) from None
                _unlink(self.path)
                continue
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(self._record())
            except OSError as exc:
                _unlink(self.path)
                raise StoreError(f"{self.location}: cannot take the lock ({exc.strerror or exc})") from None
            return
        raise StoreError(f"{self.location}: could not take the lock {self.path}")

    def __exit__(self, *exc) -> None:
        if self.path is None:
            return
        # unlink while still holding the flock: a writer waiting on this file then finds it
        # gone (its inode check fails) and retries on a fresh one, so no two ever hold it
        _unlink(self.path)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not os.path.exists(os.path.join(self.location.root, "zarr.json")):
            # nothing was created: leave no trace, so the path stays usable for a store
            for folder in (os.path.dirname(self.path), self.location.root):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


#: errno values of a filesystem that has no flock: fall back to exclusive create.
_NO_FLOCK_ERRNO = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _flock(path: str) -> int:
    """Open `path` and take its flock without waiting; the fd holds it until closed.

    Raises BlockingIOError while another process holds it. Loops when the file was
    unlinked or replaced between open and lock (its holder released it that way)."""
    while True:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # a releasing writer removed the empty folder between the two calls
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in _NO_FLOCK_ERRNO:
                    raise NotImplementedError from None
                raise
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)


def lock_holder(location: Location) -> dict | None:
    """The record of the writer holding the store's lock now, or None when nobody does.

    A lock file that nobody holds (its writer died) is no holder: the next writer takes
    it over. An unreadable record of a held lock is an empty dict."""
    if location.remote:
        return None
    path = os.path.join(location.root, LOCK)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_lock_record(path) or {}
        except OSError as exc:
            if exc.errno not in _NO_FLOCK_ERRNO:
                raise
            holder = read_lock_record(path)  # no flock here: the record and the pid tell
            return holder if holder is not None and _alive(holder) else None
        return None
    finally:
        os.close(fd)


def read_lock_record(path: str) -> dict | None:
    """The pid/host/time/purpose record in a lock file, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None  # empty or unreadable: a writer killed between create and write


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _alive(holder: dict) -> bool:
    """For filesystems without flock only: does the recorded process still run?"""
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell for another host: assume it is still writing
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


# ---------------------------------------------------------------- reading


def open_committed(location: Location, limits: dict[str, int], group: str | None = None) -> xr.Dataset:
    """A group's arrays cut to `limits` (dim -> committed size), even when a writer stopped
    while resizing them left the arrays at different lengths (xarray refuses those whole)."""
    import xarray as xr  # here, not at the top: the command line reads the store without xarray

    def committed(ds: xr.Dataset) -> xr.Dataset:
        return ds.isel({dim: slice(0, limit) for dim, limit in limits.items() if dim in ds.dims})

    import xarray as xr  # here, not at the top: ingest and the writers never need xarray (a second to import)

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


def open_store(location: str | os.PathLike, *, storage_options: dict | None = None) -> xr.Dataset:
    """The committed batches of a store as a lazy, dask-backed `xarray.Dataset`.

    Dims `batch, layer, head, query, key`; each `(query, key)` plane is one dask chunk
    (kernels need whole planes), batches are chunked as stored.
    """
    loc = location if isinstance(location, Location) else Location(location, storage_options)
    manifest = check_store(loc)
    n, size = manifest.committed, manifest.max_length
    ds = open_committed(loc, {"batch": n, "query": size, "key": size})
    ds = ds.chunk({"query": -1, "key": -1})
    ds.attrs = {
        "fastattn_format": FORMAT_VERSION,
        "store": str(loc),
        "committed": n,
        "max_length": size,
        "dtype": manifest.dtype,
        "files": len(manifest.files),
    }
    return ds
