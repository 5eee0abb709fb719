"""Finding, scanning and reading `.npz` attention dumps (no store code here).

A dump is untrusted input. Scanning reads only the zip directory and the `.npy`
headers, so planning thousands of files costs milliseconds each; reading checks
the declared sizes first, never unpickles (`allow_pickle=False`), verifies each
member's CRC and validates the values of every sample's valid block.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import io
import lzma
import math
import mmap
import os
import re
import struct
import tokenize
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import DumpError, FastattnError

CANONICAL = "blhqk"  # batch, layer, head, query, key
ATTENTION = "attention_weights"
MASK = "attention_mask"
TOKENS = "tokens"
INPUT_IDS = "input_ids"

#: |row sum - 1| allowed over a sample's valid block. float32 softmax rows sum to 1
#: within ~1e-6; weights that miss by more than this are logits or were renormalised
#: over padding. float16 dumps get the wider tolerance their 11-bit mantissa needs.
ROW_SUM_TOLERANCE = {2: 1e-2, 4: 1e-3, 8: 1e-3}
#: Magic, version, length field and the longest header NumPy reads (its max_header_size).
NPY_HEADER_MAX = 12 + 10_000
#: A member may not declare more than this many bytes uncompressed per compressed byte:
#: deflated attention shrinks 1-3x (NaN padding a little more); zip bombs reach ~1000x.
MAX_COMPRESSION_RATIO = 200
#: Files larger than this are memory-mapped, not read, and their pages are handed back as
#: they are used: ingest's memory is then a few chunks, whatever the size of one dump.
MAP_BYTES = 64 << 20
#: Bytes checked (CRC, values) between two hand-backs of a mapped file's pages.
SLAB_BYTES = 16 << 20
#: No single array may declare more than this (an absurd shape is refused unread).
MAX_ARRAY_BYTES = 64 << 30


@dataclass(frozen=True)
class Member:
    """One `.npy` member of a dump, as declared by its header (no data read)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class DumpHeader:
    """What a scan learns about a dump: enough to plan an ingest, nothing more."""

    path: str
    size: int
    mtime_ns: int
    layout: str  # letters of CANONICAL in the file's axis order, e.g. "lbhqk"
    batch: int
    layers: int
    heads: int
    query: int
    key: int
    dtype: np.dtype
    content_hash: str = ""
    members: tuple[Member, ...] = field(default=())
    #: Read without a mask, a sample's length comes from its zero trailing key columns
    #: (`infer_lengths`); False keeps every sample at the full length. The reader's choice, like `layout`.
    infer_padding: bool = True

    @property
    def samples_bytes(self) -> int:
        return self.batch * self.layers * self.heads * self.query * self.key * self.dtype.itemsize

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)


@dataclass
class Dump:
    """The validated contents of one dump, in canonical (batch, layer, head, query, key) order.

    Every sample's valid tokens come first: `attention[b, :, :, :lengths[b], :lengths[b]]`
    is its valid block (a mask with holes is compacted on reading). `inferred`: how many
    samples got their length from zero key columns (`infer_lengths`), not from a mask.
    Read by `read_into`, `attention` is the list of each sample's (layer, head, query, key)
    arrays it was given, `attention[b][:, :, :lengths[b], :lengths[b]]` the valid block.
    """

    header: DumpHeader
    content_hash: str
    attention: np.ndarray | list[np.ndarray]
    lengths: np.ndarray
    tokens: np.ndarray | None = None
    #: The dump's `input_ids` as int32 (batch, key), compacted like the tokens; None without them.
    input_ids: np.ndarray | None = None
    release: Callable[[], None] = field(default=lambda: None, repr=False)  # hand a mapped file's pages back
    inferred: int = 0


# ---------------------------------------------------------------- finding files


def natural_key(text: str) -> list:
    """Sort key that orders `batch_2` before `batch_10`."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


@dataclass
class Found:
    """The dump files named by the user's inputs, the folder their display names are
    relative to, and the inputs that could not be used."""

    files: list[str]
    base: str
    problems: list[tuple[str, str]]


def file_key(path: str) -> str:
    """A dump's identity in a store's manifest: its absolute path with symlinks resolved.

    Names relative to each run's inputs (what `source` shows) collide across runs: a
    second folder of same-named files looked like changed files, and replacing them
    overwrote the first folder's batches."""
    return os.path.realpath(path)


def _walk_npz(folder: str, problems: list) -> list[str]:
    """Every `*.npz` under `folder`, following symlinked folders (each real folder once,
    so a link loop ends)."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        for name in dirnames:
            if name.endswith(".npz"):
                problems.append((os.path.join(dirpath, name), "is a directory, not an .npz file"))
        found.extend(os.path.join(dirpath, name) for name in filenames if name.endswith(".npz"))
    return sorted(found, key=natural_key)


def find_dumps(inputs: list[str | os.PathLike]) -> Found:
    """Expand folders (recursive `*.npz`, through symlinked folders too), files and glob
    patterns, in natural order.

    `base` is the common parent of the inputs (a folder counts as its own parent): names
    relative to it are the `source` a store shows for each dump.
    """
    files: list[str] = []
    roots: list[str] = []
    problems: list[tuple[str, str]] = []
    for raw in inputs:
        entry = os.fspath(raw)
        if os.path.isdir(entry):
            roots.append(os.path.abspath(entry))
            files.extend(os.path.abspath(path) for path in _walk_npz(entry, problems))
        elif os.path.exists(entry):
            roots.append(os.path.dirname(os.path.abspath(entry)))
            files.append(os.path.abspath(entry))
        elif glob.has_magic(entry):
            matches = sorted(glob.glob(entry, recursive=True), key=natural_key)
            if not matches:
                problems.append((entry, "the pattern matches no file"))
            for match in matches:
                if os.path.isdir(match):
                    problems.append((match, "is a directory, not an .npz file"))
                    continue
                roots.append(os.path.dirname(os.path.abspath(match)))
                files.append(os.path.abspath(match))
        elif os.path.islink(entry):
            problems.append((entry, "a symbolic link to nothing (its target does not exist)"))
        else:
            problems.append((entry, "no such file or folder"))
    unique = list(dict.fromkeys(files))
    base = os.path.commonpath(roots) if roots else os.getcwd()
    return Found(files=unique, base=base, problems=problems)


# ---------------------------------------------------------------- scanning headers


def _content_hash(zf: zipfile.ZipFile) -> str:
    """sha256 of the zip directory: every member's name, size and CRC-32.

    Reading verifies each member's CRC against its bytes, so this identifies the content
    while costing no data read: a changed file is found from its directory alone.
    """
    digest = hashlib.sha256()
    for info in sorted(zf.infolist(), key=lambda i: i.filename):
        digest.update(f"{info.filename}\0{info.file_size}\0{info.CRC:08x}\n".encode())
    return digest.hexdigest()


def content_hash(path: str) -> str:
    """The content hash of a dump on disk (reads its zip directory only)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return _content_hash(zf)
    except (OSError, zipfile.BadZipFile):
        return ""


#: What zipfile and its decompressors raise on archives they cannot read (besides BadZipFile):
#: unsupported methods or versions, encryption, corrupt deflate/lzma streams, bad field encodings.
ZIP_ERRORS = (NotImplementedError, RuntimeError, zlib.error, lzma.LZMAError, EOFError, ValueError, struct.error)


def _zip_reason(exc: BaseException) -> str:
    text = str(exc)
    if "encrypted" in text:
        return "encrypted zip member; fastattn reads unencrypted .npz files"
    if isinstance(exc, NotImplementedError):
        return f"unsupported zip archive ({text})"
    return f"corrupt zip archive ({text})"


#: Bytes of the field that holds a .npy header's length, by format version.
NPY_LENGTH_FIELD = {(1, 0): 2, (2, 0): 4, (3, 0): 4}  # 3.0 only allows utf-8 field names, which no attention dump has


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy header at `f`'s position; `f` is left just after it."""
    version = np.lib.format.read_magic(f)
    if version not in NPY_LENGTH_FIELD:
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    field = f.read(NPY_LENGTH_FIELD[version])
    length = int.from_bytes(field, "little") if len(field) == NPY_LENGTH_FIELD[version] else 0
    return _parse_npy_header(version, field + f.read(min(length, NPY_HEADER_MAX)))


@functools.lru_cache(maxsize=64)
def _parse_npy_header(version: tuple[int, int], raw: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """NumPy's parse of a header (its length field, then the text), once per distinct header:
    the text is Python literal syntax and takes ~0.2 ms to parse, and a dump's header is met
    twice (scan, read), in a thousand dumps of one shape a thousand times."""
    try:
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(io.BytesIO(raw))
        return np.lib.format.read_array_header_2_0(io.BytesIO(raw))
    except (SyntaxError, tokenize.TokenError, TypeError, KeyError, IndexError, UnicodeError) as exc:
        raise ValueError(f"unreadable .npy header ({exc})") from None  # numpy parses the header as Python


def _scan_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Member:
    name = info.filename.removesuffix(".npy")
    if info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1) + (1 << 20):
        raise DumpError(
            f"'{name}' declares {info.file_size:,} bytes from {info.compress_size:,} compressed"
            " (a zip bomb?); refusing to read it"
        )
    try:
        with zf.open(info) as f:
            shape, _fortran, dtype = _read_npy_header(f)
            header_len = f.tell()
    except zipfile.BadZipFile as exc:
        raise DumpError(f"corrupt zip archive ({exc})") from None
    except (NotImplementedError, RuntimeError, zlib.error, lzma.LZMAError) as exc:
        raise DumpError(_zip_reason(exc)) from None
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise DumpError(f"'{name}' is not a valid .npy array ({exc})") from None
    if dtype.hasobject:
        raise DumpError(f"'{name}' is a pickled object array; fastattn never unpickles")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise DumpError(f"'{name}' declares an absurd shape {shape} ({nbytes:,} bytes)")
    if header_len + nbytes != info.file_size:
        raise DumpError(
            f"'{name}' declares shape {shape} {dtype} ({nbytes:,} bytes)"
            f" but its member holds {info.file_size - header_len:,}"
        )
    return Member(name=name, shape=tuple(int(n) for n in shape), dtype=dtype)


def normalise_layout(layout: str) -> str:
    """'L,B,H,Q,K' -> 'lbhqk'."""
    return layout.lower().replace(",", "").replace(" ", "")


def parse_layout(layout: str, ndim: int) -> str:
    """Check a layout like 'lbhqk' (letters: batch, layer, head, query, key)."""
    letters = normalise_layout(layout)
    if sorted(letters) not in (sorted(CANONICAL), sorted("lhqk")) or len(set(letters)) != len(letters):
        raise FastattnError(
            f"layout '{layout}' must name each of l(ayer), h(ead), q(uery), k(ey) once,"
            " and b(atch) at most once, e.g. 'lbhqk' or 'lhqk'"
        )
    if len(letters) != ndim:
        raise DumpError(f"attention_weights has {ndim} dims but layout '{letters}' names {len(letters)}")
    return letters


def scan(path: str, layout: str | None = None, *, infer_padding: bool = True) -> DumpHeader:
    """Read a dump's zip directory and `.npy` headers (never the data) and check them.
    `layout` and `infer_padding` are recorded in the header: `read` honours them."""
    if os.path.isdir(path):
        raise DumpError("is a directory, not an .npz file")
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise DumpError(f"cannot read it ({exc.strerror})") from None
    if stat.st_size == 0:
        raise DumpError("empty file (0 bytes)")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if i.filename.endswith(".npy")]
            members = tuple(_scan_member(zf, info) for info in infos)
            digest = _content_hash(zf)
    except zipfile.BadZipFile as exc:
        with open(path, "rb") as f:
            looks_like_zip = f.read(4) == b"PK\x03\x04"
        if "File is not a zip file" not in str(exc):
            reason = f"corrupt zip archive ({exc})"
        elif looks_like_zip:
            reason = "truncated or corrupt zip archive (no central directory)"
        else:
            reason = "not an .npz archive (no zip signature)"
        raise DumpError(reason) from None
    except OSError as exc:
        raise DumpError(f"cannot read it ({exc})") from None
    except ZIP_ERRORS as exc:
        raise DumpError(_zip_reason(exc)) from None
    names = [m.name for m in members]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # zipfile would read the last one, a scan checks the first: refuse to guess
        raise DumpError(f"'{twice[0]}' appears twice in the archive")
    attn = next((m for m in members if m.name == ATTENTION), None)
    if attn is None:
        found = ", ".join(names) if names else "no arrays"
        raise DumpError(f"no '{ATTENTION}' array (found: {found})")
    if attn.dtype.kind != "f" or attn.dtype.itemsize not in (2, 4, 8):
        raise DumpError(f"{ATTENTION} has dtype {attn.dtype}; expected float16, float32 or float64")
    if layout is None:
        layout = {4: "lhqk", 5: "lbhqk"}.get(len(attn.shape))
        if layout is None:
            raise DumpError(
                f"{ATTENTION} has {len(attn.shape)} dims {attn.shape}; expected 4 (layer, head, query, key)"
                " or 5 (layer, batch, head, query, key), or give its layout"
            )
    else:
        layout = parse_layout(layout, len(attn.shape))
    sizes = dict(zip(layout, attn.shape))
    sizes.setdefault("b", 1)
    if min(sizes.values()) == 0:
        raise DumpError(f"{ATTENTION} is empty: shape {attn.shape}")
    header = DumpHeader(
        path=path,
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        layout=layout,
        batch=sizes["b"],
        layers=sizes["l"],
        heads=sizes["h"],
        query=sizes["q"],
        key=sizes["k"],
        dtype=attn.dtype,
        content_hash=digest,
        members=members,
        infer_padding=infer_padding,
    )
    _check_per_token(header, MASK, integer_or_bool=True)
    _check_per_token(header, TOKENS, integer_or_bool=False)
    _check_per_token(header, INPUT_IDS, integer_or_bool=True)
    mask = header.member(MASK)
    if mask is not None and header.query != header.key:
        raise DumpError(f"{MASK} given for cross-attention (query {header.query} != key {header.key})")
    return header


def _check_per_token(header: DumpHeader, name: str, *, integer_or_bool: bool) -> None:
    member = header.member(name)
    if member is None:
        return
    expected = [(header.batch, header.key)]
    if "b" not in header.layout or header.batch == 1:
        expected.append((header.key,))
    if member.shape not in expected:
        want = " or ".join(str(e) for e in expected)
        raise DumpError(f"{name} has shape {member.shape}; expected {want} to fit {ATTENTION}")
    if integer_or_bool and member.dtype.kind not in "biu":
        raise DumpError(f"{name} has dtype {member.dtype}; expected integers or booleans")
    if not integer_or_bool and member.dtype.kind != "U":
        raise DumpError(f"{name} has dtype {member.dtype}; expected strings")


# ---------------------------------------------------------------- reading data


def _releaser(data) -> Callable[[], None] | None:
    """For a memory-mapped file: drop its pages from this process (the page cache keeps
    them, and the next access maps them back), so what was read counts once, not for good."""
    if not isinstance(data, mmap.mmap):
        return None
    return lambda: data.madvise(mmap.MADV_DONTNEED)


def _fast_crc32() -> Callable:
    """zip's CRC-32 from ISA-L (the `isal` package): ~3x the speed of zlib 1.2.13's here, and
    that CRC was a tenth of an ingest's CPU time (docs/performance.md). The same values as
    `zlib.crc32`, on any buffer, without holding the GIL; zlib's where isal has no wheel."""
    try:
        from isal.isal_zlib import crc32 as isal_crc32
    except ImportError:
        return zlib.crc32
    return isal_crc32


#: `zlib.crc32(data, value)`, from ISA-L.
crc32 = _fast_crc32()


def _crc32(member: memoryview, release: Callable[[], None] | None) -> int:
    if release is None:
        return crc32(member)
    crc = 0
    for offset in range(0, len(member), SLAB_BYTES):
        crc = crc32(member[offset : offset + SLAB_BYTES], crc)
        release()
    return crc


def _read_member(data: bytes, zf: zipfile.ZipFile, name: str, expected: Member) -> np.ndarray:
    """One member's array. A stored (uncompressed) member, as `np.savez` writes, is a
    zero-copy view of the file's bytes after one CRC check; a deflated one is decompressed."""
    info = zf.getinfo(name + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return _read_member_stream(zf, name, expected)
    local = info.header_offset
    if data[local : local + 4] != b"PK\x03\x04":
        raise DumpError(f"corrupt zip archive (bad local header for '{name}')")
    name_len, extra_len = struct.unpack_from("<HH", data, local + 26)
    start = local + 30 + name_len + extra_len
    member = memoryview(data)[start : start + info.compress_size]
    if len(member) != info.compress_size or _crc32(member, _releaser(data)) != info.CRC:
        raise DumpError(f"corrupt zip archive (bad CRC-32 for '{name}')")
    f = io.BytesIO(member[:NPY_HEADER_MAX])  # the header only: BytesIO copies what it is given
    shape, fortran, dtype = _read_npy_header(f)
    _check_unchanged(shape, dtype, expected)
    array = np.frombuffer(member, dtype=dtype, count=math.prod(shape), offset=f.tell())
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def _read_member_stream(zf: zipfile.ZipFile, name: str, expected: Member) -> np.ndarray:
    """One member's array through zipfile's own reading (decompressing; it checks the CRC)."""
    with zf.open(name + ".npy") as f:
        shape, fortran, dtype = _read_npy_header(f)
        _check_unchanged(shape, dtype, expected)
        # what the stream really holds (at most the declared size), never an allocation the headers ask for
        body = f.read()  # to the end of the member, so zipfile checks its CRC
    if len(body) != math.prod(shape) * dtype.itemsize:
        raise DumpError(f"corrupt zip archive ('{name}' holds {len(body):,} bytes of data, not {math.prod(shape) * dtype.itemsize:,})")
    array = np.frombuffer(body, dtype=dtype)
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def _check_unchanged(shape, dtype, expected: Member) -> None:
    if shape != expected.shape or dtype != expected.dtype:
        raise DumpError("changed while being ingested (its arrays differ from the scan)")


@contextlib.contextmanager
def _zip_errors():
    """What reading a zip archive can raise, as one DumpError with the reason."""
    try:
        yield
    except zipfile.BadZipFile as exc:
        raise DumpError(f"corrupt zip archive ({exc})") from None
    except (NotImplementedError, RuntimeError, zlib.error, lzma.LZMAError) as exc:
        raise DumpError(_zip_reason(exc)) from None
    except (ValueError, OSError, EOFError, struct.error) as exc:
        raise DumpError(f"unreadable array ({exc})") from None


def _checked_hash(zf: zipfile.ZipFile, header: DumpHeader) -> str:
    digest = _content_hash(zf)
    if digest != header.content_hash:
        raise DumpError("changed while being ingested (its content hash differs from the scan)")
    return digest


def read(header: DumpHeader) -> Dump:
    """Load and validate a scanned dump; raise DumpError with the reason when it is bad."""
    try:
        with open(header.path, "rb") as f:
            big = header.size > MAP_BYTES and os.fstat(f.fileno()).st_size == header.size
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if big else f.read()
    except OSError as exc:
        raise DumpError(f"cannot read it ({exc.strerror})") from None
    release = _releaser(data)
    if len(data) != header.size:
        raise DumpError("changed while being ingested (its size differs from the scan)")
    with _zip_errors(), zipfile.ZipFile(data if release else io.BytesIO(data)) as zf:  # BytesIO would copy a map
        digest = _checked_hash(zf, header)
        raw, mask, tokens, ids = (
            _read_member(data, zf, name, header.member(name)) if header.member(name) else None
            for name in (ATTENTION, MASK, TOKENS, INPUT_IDS)
        )
    layout = header.layout if "b" in header.layout else "b" + header.layout
    attention = raw if "b" in header.layout else raw[np.newaxis]
    attention = np.transpose(attention, [layout.index(c) for c in CANONICAL])
    return _checked(header, digest, attention, mask, tokens, ids, release)


def _checked(header: DumpHeader, digest: str, attention, mask, tokens, ids, release=None) -> Dump:
    """The Dump of arrays read from a file: lengths found, samples compacted, values validated.
    `attention`: canonical (batch, layer, head, query, key), or a list of each sample's
    (layer, head, query, key) arrays, compacted in place."""
    lengths, order = _lengths(header, mask)
    if mask is None and header.query == header.key and header.infer_padding:
        lengths = infer_lengths(attention, release)
    if tokens is not None:
        tokens = tokens.reshape(header.batch, header.key)
    if ids is not None:
        ids = ids.reshape(header.batch, header.key)
    if order is not None:
        compacted, tokens, ids = _compact(np.asarray(attention), tokens, ids, order, lengths)
        if isinstance(attention, list):
            for sample, values in zip(attention, compacted):
                sample[...] = values
        else:
            attention = compacted
    _validate(attention, lengths, header.dtype, release)
    if ids is not None:
        ids = _token_ids(ids, lengths)
    dump = Dump(header=header, content_hash=digest, attention=attention, lengths=lengths, tokens=tokens, input_ids=ids,
                inferred=int(np.count_nonzero(lengths < header.key)) if mask is None else 0)
    if release is not None:
        dump.release = release
    return dump


#: Buffers per `os.preadv` call (Linux takes up to 1024).
IOV_BATCH = 512


def read_into(header: DumpHeader, samples: list[np.ndarray]) -> Dump | None:
    """`read`, with the weights read by the kernel straight into `samples[i]`, sample i's
    (layer, head, query, key) array in a store's chunk buffer, with no copy in between; each
    is left as a store keeps it, NaN outside the sample's valid block. The dump's `attention`
    is `samples`. The zip CRC-32 is computed on those buffers.

    None, with nothing read into `samples`, when the dump cannot be read so: its attention
    compressed or in Fortran order, of another dtype or sequence length than `samples`, heads,
    queries and keys not its last three axes in that order, or large enough to be mapped (or
    where the system has no `preadv`; each sample's (head, query, key) planes must be contiguous)."""
    shape = (header.layers, header.heads, header.query, header.key)
    if not (
        hasattr(os, "preadv")
        and header.size <= MAP_BYTES
        and header.layout.endswith("hqk")
        and len(samples) == header.batch
        and all(s.dtype == header.dtype and s.shape == shape and s[0].flags.c_contiguous for s in samples)
    ):
        return None
    try:
        f = open(header.path, "rb", buffering=0)
    except OSError as exc:
        raise DumpError(f"cannot read it ({exc.strerror})") from None
    with f, _zip_errors():
        if os.fstat(f.fileno()).st_size != header.size:
            raise DumpError("changed while being ingested (its size differs from the scan)")
        with zipfile.ZipFile(f) as zf:
            digest = _checked_hash(zf, header)
            if not _read_stored_into(f.fileno(), zf.getinfo(ATTENTION + ".npy"), header, samples):
                return None
            mask, tokens, ids = (
                _read_member_stream(zf, name, header.member(name)) if header.member(name) else None
                for name in (MASK, TOKENS, INPUT_IDS)
            )
    dump = _checked(header, digest, samples, mask, tokens, ids)
    for sample, n in zip(samples, dump.lengths):
        q, k = min(n, header.query), min(n, header.key)
        sample[:, :, q:, :] = np.nan
        sample[:, :, :q, k:] = np.nan
    return dump


def _read_stored_into(fd: int, info: zipfile.ZipInfo, header: DumpHeader, samples: list[np.ndarray]) -> bool:
    """The attention member's planes read into `samples` (see `read_into`), its CRC-32 checked;
    False, nothing read, when the member is compressed or in Fortran order."""
    if info.compress_type != zipfile.ZIP_STORED:
        return False
    local = os.pread(fd, 30, info.header_offset)
    if local[:4] != b"PK\x03\x04":
        raise DumpError(f"corrupt zip archive (bad local header for '{ATTENTION}')")
    name_len, extra_len = struct.unpack_from("<HH", local, 26)
    start = info.header_offset + 30 + name_len + extra_len
    head = os.pread(fd, min(NPY_HEADER_MAX, info.compress_size), start)
    f = io.BytesIO(head)
    shape, fortran, dtype = _read_npy_header(f)
    _check_unchanged(shape, dtype, header.member(ATTENTION))
    if fortran:
        return False
    offset = f.tell()
    lead = header.layout[:-3]  # "l", "lb" or "bl": one (head, query, key) block each, in file order
    sizes = {"l": header.layers, "b": header.batch}
    planes = [
        samples[index.get("b", 0)][index["l"]]
        for index in (dict(zip(lead, i)) for i in np.ndindex(*(sizes[c] for c in lead)))
    ]
    if offset + sum(p.nbytes for p in planes) != info.compress_size:
        raise DumpError(f"corrupt zip archive ('{ATTENTION}' holds {info.compress_size - offset:,} bytes of data)")
    crc = crc32(head[:offset])
    position = start + offset
    for first in range(0, len(planes), IOV_BATCH):
        group = planes[first : first + IOV_BATCH]
        expected = sum(p.nbytes for p in group)
        if os.preadv(fd, group, position) != expected:
            raise DumpError("changed while being ingested (it got shorter)")
        for plane in group:
            crc = crc32(plane, crc)
        position += expected
    if crc != info.CRC:
        raise DumpError(f"corrupt zip archive (bad CRC-32 for '{ATTENTION}')")
    return True


def _lengths(header: DumpHeader, mask: np.ndarray | None) -> tuple[np.ndarray, list | None]:
    """Valid tokens per sample, and (when a mask has holes) the valid positions of each."""
    full = max(header.query, header.key)
    if mask is None:
        return np.full(header.batch, full, dtype=np.int32), None
    mask = mask.reshape(header.batch, header.key)
    odd = (mask != 0) & (mask != 1)
    if odd.any():
        b, k = np.argwhere(odd)[0]
        raise DumpError(f"{MASK} holds {mask[b, k]} (sample {b}, token {k}); expected 1 for a token and 0 for padding")
    mask = mask.astype(bool)
    lengths = mask.sum(axis=1).astype(np.int32)
    if np.any(lengths == 0):
        raise DumpError(f"{MASK} marks no valid token in sample {int(np.argmin(lengths))}")
    prefix = np.arange(header.key)[np.newaxis, :] < lengths[:, np.newaxis]
    if np.array_equal(mask, prefix):
        return lengths, None
    return lengths, [np.flatnonzero(row) for row in mask]


def infer_lengths(attention: np.ndarray, release: Callable[[], None] | None = None) -> np.ndarray:
    """Valid tokens per sample of a self-attention dump saved without an `attention_mask`.

    A model that masks padding gives the padded keys exactly zero weight (the mask adds
    −inf, or the dtype's minimum, before the softmax), for every query of every layer and
    head, padded queries included. So a sample's length is `K − t`, where `t` is the number
    of trailing key columns that are exactly 0 in every row of every layer and head of that
    sample; with no such column it is the full length `K`. Causal maps are untouched (the
    last row gives the last key a weight), and so is left padding (its zero columns lead).
    Real tokens that no query of any head attends are indistinguishable from padding and are
    cut too; only a saved mask keeps them (or reading with `infer_padding=False`, which
    keeps every sample whole). A sample whose keys are all 0 keeps the full
    length (its rows fail validation). Reads
    one head's last column first, and the trailing columns of the rest only when that is
    all 0. `attention` is canonical `(batch, layer, head, query, key)` with query == key, or
    a list of each sample's `(layer, head, query, key)`.
    """
    B, (L, H, Q, K) = len(attention), attention[0].shape
    lengths = np.full(B, K, dtype=np.int32)
    for b in range(B):
        head = attention[b][0, 0]
        if head[:, K - 1].any():  # the usual answer: the last key is attended
            continue
        used = np.flatnonzero(head.any(axis=0))
        n = int(used[-1]) + 1 if used.size else 0
        for layer in range(L):  # a layer at a time: memory is one layer's tail at most
            tail = attention[b][layer, :, :, n:]
            if tail.any():  # rare: this layer attends past the first head's last key
                n += int(np.flatnonzero(tail.any(axis=(0, 1)))[-1]) + 1
            if release is not None:
                release()
        lengths[b] = n if n > 0 else K
    return lengths


def _compact(attention, tokens, ids, order, lengths):
    """Move each sample's valid tokens to the front (left padding, holes), NaN after; the token
    strings and ids with them ("" and -1 after)."""
    out = np.full(attention.shape, np.nan, dtype=attention.dtype)
    tok = None if tokens is None else np.full(tokens.shape, "", dtype=tokens.dtype)
    kept = None if ids is None else np.full(ids.shape, -1, dtype=ids.dtype)
    for b, idx in enumerate(order):
        n = lengths[b]
        out[b, :, :, :n, :n] = attention[b][:, :, idx[:, None], idx]
        if tok is not None:
            tok[b, :n] = tokens[b, idx]
        if kept is not None:
            kept[b, :n] = ids[b, idx]
    return out, tok, kept


#: Token ids a store keeps: int32, and never negative (the store's -1 means "no id here").
MAX_TOKEN_ID = np.iinfo(np.int32).max


def _token_ids(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`input_ids` as int32, -1 past each sample's length; a valid position must hold an id in
    [0, 2**31 - 1] (padding may hold anything: it is never stored)."""
    valid = np.arange(ids.shape[1])[np.newaxis, :] < lengths[:, np.newaxis]
    bad = valid & ((ids < 0) | (ids > MAX_TOKEN_ID))
    if bad.any():
        b, k = np.argwhere(bad)[0]
        raise DumpError(f"{INPUT_IDS} holds {ids[b, k]} (sample {b}, token {k}); expected token ids in [0, {MAX_TOKEN_ID}]")
    return np.where(valid, ids, -1).astype(np.int32)


def row_sum_tolerance(dtype=None, stored_as=None) -> float:
    """|row sum - 1| allowed over a sample's valid block: the one rule ingest and check share.

    Ingest allows a dump of `dtype` ROW_SUM_TOLERANCE by its itemsize; a dtype that is not
    known (a manifest entry written before dtypes were recorded) gets the loosest, so a check
    never flags what some ingest accepted. `stored_as`, the store's dtype, adds what rounding
    each weight to it can add to a row sum (at most one epsilon per unit of sum).
    """
    try:
        size = np.dtype(dtype).itemsize if dtype is not None else None
    except TypeError:
        size = None
    tolerance = ROW_SUM_TOLERANCE.get(size, max(ROW_SUM_TOLERANCE.values()))
    return tolerance + (float(np.finfo(stored_as).eps) if stored_as is not None else 0.0)


def _validate(attention: np.ndarray, lengths: np.ndarray, dtype: np.dtype, release=None) -> None:
    """Finite, non-negative rows that sum to 1 over each sample's valid block.

    Two NumPy reductions screen each sample: its minimum (NaN when any weight is) and its
    row sums (`_rows_sum_to_one`). Only a sample that fails is looked at again, to say what
    is wrong and where. (A Numba kernel screens a file ~0.25 ms faster, but importing Numba
    and loading the kernel costs an ingest process more than that saves on a thousand files.)
    A mapped file is screened one sample's layer at a time, its pages handed back after each.
    `attention` as `infer_lengths` takes it."""
    tolerance = row_sum_tolerance(dtype)
    for b, sample in enumerate(attention):
        n = lengths[b]
        for layer in [slice(None)] if release is None else range(len(sample)):
            block = sample[layer, ..., :n, :n]
            bad = not (block.min() >= 0 and _rows_sum_to_one(block, tolerance))
            if release is not None:
                release()
            if bad:
                _explain(sample[:, :, :n, :n], b, tolerance)


def _rows_sum_to_one(block: np.ndarray, tolerance: float) -> bool:
    """Whether every row of `block` (non-negative weights) sums to 1 within `tolerance`, as in
    float64. A float32 block is summed in float32 first (einsum: ~2x faster than a float64
    sum, whose cast and short rows cost an ingest ~0.3 CPU-s per GB); a sum of n non-negative
    float32 weights is within n * 2**-24 * (its value) of the exact one, so only when the
    float32 answer lands that close to the tolerance are the rows summed again in float64."""
    if block.dtype == np.float32:
        error = float(np.abs(np.einsum("...k->...", block) - np.float32(1.0)).max())
        slack = block.shape[-1] * 2.0**-23 * (1.0 + tolerance)  # twice the rounding bound, the subtraction's included
        if error <= tolerance - slack:
            return True
        if error > tolerance + slack:
            return False
    return float(np.abs(block.sum(axis=-1, dtype=np.float64) - 1.0).max()) <= tolerance


def _explain(block: np.ndarray, b: int, tolerance: float) -> None:
    """Raise what is wrong with sample `b`'s valid block (layer, head, query, key), and where."""
    finite = np.isfinite(block)
    if not finite.all():
        where = _where(np.argwhere(~finite)[0])
        raise DumpError(f"{ATTENTION} has NaN or Inf in its valid block (sample {b}, {where})")
    low = block.min()
    if low < 0:
        where = _where(np.argwhere(block == low)[0])
        raise DumpError(f"{ATTENTION} has a negative weight {low:.3g} (sample {b}, {where})")
    error = np.abs(block.sum(axis=-1, dtype=np.float64) - 1.0)
    worst = error.max()
    if worst > tolerance:
        l, h, q = np.unravel_index(np.argmax(error), error.shape)
        raise DumpError(
            f"rows do not sum to 1 (off by {worst:.3g} at sample {b}, layer {l}, head {h}, query {q};"
            f" tolerance {tolerance:g}): logits saved instead of softmax weights?"
        )


def _where(index) -> str:
    l, h, q, k = (int(i) for i in index)
    return f"layer {l}, head {h}, query {q}, key {k}"


def describe(path: str, layout: str | None = None) -> dict:
    """What `fastattn info` says about one dump: its arrays and the layout detected."""
    header = scan(path, layout)
    return {
        "path": path,
        "size": header.size,
        "layout": header.layout,
        "samples": header.batch,
        "layers": header.layers,
        "heads": header.heads,
        "query": header.query,
        "key": header.key,
        "arrays": [{"name": m.name, "shape": list(m.shape), "dtype": str(m.dtype)} for m in header.members],
        "used": [m.name for m in header.members if m.name in (ATTENTION, MASK, TOKENS, INPUT_IDS)],
    }
