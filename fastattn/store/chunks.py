"""Writing and reading chunks: whole chunks encoded here by the array's own codecs
(`WholeChunks`), and several zarr reads or writes at once (`write_all`, `read_all`)."""

from __future__ import annotations

import itertools
import os
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from crc32c import crc32c  # the same checksum as zarr's google_crc32c, computed without holding the GIL
import numcodecs.blosc
import numpy as np
import zarr
from zarr.abc.codec import SupportsSyncCodec
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype

from ..errors import ChecksumError, StoreError
from .location import Location


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
#: c-blosc 1's frame: a 16-byte header, whose flags (byte 2) say when the data follows verbatim.
_BLOSC_HEADER = 16
_BLOSC_MEMCPYED = 0x02


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
        return [payload, struct.pack("<I", crc32c(payload))]  # the crc32c codec: little-endian, last

    def decodes_here(self) -> bool:
        """Whether `read` can decode this array's chunks: the bytes codec in this machine's byte
        order (or none) then blosc, as fastattn writes them; otherwise read through zarr."""
        codecs = self.codecs
        native = "little" if sys.byteorder == "little" else "big"
        return (
            len(codecs) == 2
            and isinstance(codecs[0], BytesCodec)
            and (codecs[0].endian is None or codecs[0].endian.value == native)
            and isinstance(codecs[1], BloscCodec)
        )

    def read(self, coords: tuple[int, ...]) -> np.ndarray:
        """The chunk at grid position `coords`, in this thread's buffers for this array (valid
        until the thread's next `read` of it); the fill value if it was never written.

        What zarr's read of one whole chunk does, without its event loop and thread hops or a new
        array per chunk: the file read into a reused buffer, its crc32c checked, blosc decoding
        straight into the chunk's buffer, or, when blosc stored the chunk verbatim, the file
        buffer itself (`decodes_here` must hold)."""
        key = f"{self.path}/{self._key(coords)}"
        out = getattr(self._outputs, "chunk", None)
        if out is None:
            out = self._outputs.chunk = self.empty()
        data = self._read_file(key)
        if data is None:
            out.fill(self.fill)
            return out
        payload = data
        if self.checksum:
            payload = data[:-4]
            if struct.pack("<I", crc32c(payload)) != bytes(data[-4:]):
                raise ChecksumError(
                    f"{self.location.key_url(key)}: does not decode (crc32c checksum mismatch: the bytes on disk changed);"
                    " fastattn check names every damaged chunk"
                )
        if len(payload) < _BLOSC_HEADER or struct.unpack_from("<I", payload, 4)[0] != out.nbytes:  # blosc's header: the size decoded
            raise StoreError(f"{self.location.key_url(key)}: does not decode to a chunk of {self.chunks} {self.dtype}")
        if payload[2] & _BLOSC_MEMCPYED and len(payload) == _BLOSC_HEADER + out.nbytes:
            # Stored verbatim after the header (blosc found nothing to compress): the chunk is
            # the file buffer itself, no copy (docs/performance.md, "Attention without byte shuffle").
            return np.frombuffer(payload, dtype=self.dtype, count=out.size, offset=_BLOSC_HEADER).reshape(self.chunks)
        numcodecs.blosc.decompress(payload, out)
        return out

    def read_rows(self, stop: int, start: int = 0) -> np.ndarray:
        """Rows [start, stop) of the array, every other dim whole, as a new array: chunk by
        chunk with `read`, on this thread. For the small arrays of a store's statistics, where
        zarr's per-chunk hops cost more than the reads (docs/performance.md)."""
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        rows = self.chunks[0]
        inner = [range(0, size, step) for size, step in zip(self.shape[1:], self.chunks[1:])]
        for first in range(start - start % rows, stop, rows):
            lo, hi = max(first, start), min(first + rows, stop)
            for offsets in itertools.product(*inner):
                part = tuple(min(step, size - o) for o, step, size in zip(offsets, self.chunks[1:], self.shape[1:]))
                chunk = self.read((first // rows, *(o // step for o, step in zip(offsets, self.chunks[1:]))))
                out[(slice(lo - start, hi - start), *(slice(o, o + n) for o, n in zip(offsets, part)))] = chunk[
                    (slice(lo - first, hi - first), *(slice(0, n) for n in part))
                ]
        return out

    def _read_file(self, key: str) -> np.ndarray | None:
        """A chunk file's bytes, read into this thread's reused buffer (locally), or fetched."""
        path = self.location.local_path(key)
        if path is None:
            data = self.location.read(key)
            return None if data is None else np.frombuffer(data, dtype=np.uint8)
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            return None
        with f:
            size = os.fstat(f.fileno()).st_size
            buffer = getattr(self._outputs, "file", None)
            if buffer is None or len(buffer) < size:
                buffer = self._outputs.file = bytearray(size)
            view = memoryview(buffer)[:size]
            done = 0
            while done < size:
                n = f.readinto(view[done:])
                if not n:
                    raise StoreError(f"{self.location.key_url(key)}: the file got shorter while it was read")
                done += n
        return np.frombuffer(buffer, dtype=np.uint8, count=size)

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
            if part.shape == tuple(self.chunks) and part.dtype == self.dtype:
                chunk = part  # a whole chunk: encoded as it is, not copied into a new one
            else:
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
