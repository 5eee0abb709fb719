"""Fuzzing the dump reader: malformed `.npz` files either read as a valid dump or raise
DumpError — never another exception, never an allocation beyond what the file holds, never
an unpickled object — and an ingest of them only rejects them.

Bounded by default (hypothesis profile "ci"); `FASTATTN_FUZZ=long` runs the long profile
(see docs/reliability.md).
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import softmax_rows, store_snapshot
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fastattn import dumps
from fastattn.check import store_problems
from fastattn.errors import DumpError
from fastattn.ingest import ingest

settings.register_profile(
    "ci", max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile("long" if os.environ.get("FASTATTN_FUZZ") == "long" else "ci")
#: the ingest-a-folder property costs an ingest per example
FOLDERS = settings(PROFILE, max_examples=max(3, PROFILE.max_examples // 20))

MB = 1 << 20
MARKER = Path("/tmp") / f"fastattn-fuzz-unpickled-{os.getpid()}"


class _Exploit:
    """Unpickling this creates MARKER: the proof that something was unpickled."""

    def __reduce__(self):
        return (open, (str(MARKER), "w"))


# ---------------------------------------------------------------- valid dumps to start from


def _savez(compress: bool = False, **arrays) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def _bases() -> dict[str, bytes]:
    rng = np.random.default_rng(11)
    batched = np.zeros((2, 3, 2, 6, 6), dtype=np.float32)
    mask = np.zeros((3, 6), dtype=np.int8)
    for b, n in enumerate((6, 4, 2)):
        batched[:, b, :, :, :n] = softmax_rows(rng, (2, 2, 6, n))
        mask[b, :n] = 1
    tokens = np.array([[f"w{b}{i}" for i in range(6)] for b in range(3)])
    plain = softmax_rows(rng, (2, 2, 6, 6))
    return {
        "plain": _savez(attention_weights=plain),
        "batched": _savez(attention_weights=batched, attention_mask=mask, tokens=tokens),
        "half": _savez(attention_weights=softmax_rows(rng, (1, 2, 5, 5)).astype(np.float16)),
        "fortran": _savez(attention_weights=np.asfortranarray(plain)),
        "left_padded": _savez(attention_weights=batched[..., ::-1, ::-1].copy(), attention_mask=mask[:, ::-1].copy()),
        "deflated": _savez(True, attention_weights=batched, attention_mask=mask, tokens=tokens),
    }


BASES = _bases()
STORED = [name for name in BASES if name != "deflated"]


def _layout(data: bytes) -> list[dict]:
    """Where each member's local header, central header and .npy header start."""
    out = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        end = data.rfind(b"PK\x05\x06")
        cd = struct.unpack_from("<I", data, end + 16)[0]
        central = cd
        for info in zf.infolist():
            local = info.header_offset
            name_len, extra_len = struct.unpack_from("<HH", data, local + 26)
            out.append({"local": local, "central": central, "npy": local + 30 + name_len + extra_len, "end": end})
            n, e, c = struct.unpack_from("<HHH", data, central + 28)
            central += 46 + n + e + c
    return out


# (offset within the record, struct format) of every field worth lying in
LOCAL_FIELDS = [(4, "<H"), (6, "<H"), (8, "<H"), (14, "<I"), (18, "<I"), (22, "<I"), (26, "<H"), (28, "<H")]
CENTRAL_FIELDS = [(6, "<H"), (8, "<H"), (10, "<H"), (16, "<I"), (20, "<I"), (24, "<I"), (28, "<H"), (30, "<H"), (42, "<I")]
END_FIELDS = [(8, "<H"), (10, "<H"), (12, "<I"), (16, "<I"), (20, "<H")]
NPY_FIELDS = [(6, "<B"), (7, "<B"), (8, "<H")]  # version major, minor, header length


@st.composite
def field_lies(draw):
    """A valid dump with zip or .npy header fields overwritten (sizes, offsets, methods, flags...)."""
    data = bytearray(BASES[draw(st.sampled_from(sorted(BASES)))])
    layout = _layout(bytes(data))
    for _ in range(draw(st.integers(1, 3))):
        member = draw(st.sampled_from(layout))
        record, fields = draw(
            st.sampled_from(
                [
                    ("local", LOCAL_FIELDS),
                    ("central", CENTRAL_FIELDS),
                    ("end", END_FIELDS),
                    ("npy", NPY_FIELDS),
                ]
            )
        )
        offset, fmt = draw(st.sampled_from(fields))
        at = member[record] + offset
        width = struct.calcsize(fmt)
        if at + width > len(data):
            continue
        (old,) = struct.unpack_from(fmt, data, at)
        top = (1 << (8 * width)) - 1
        value = draw(
            st.one_of(
                st.sampled_from([0, 1, 8, 12, 14, 99, top, top - 1, len(data), 1 << 31]),
                st.integers(max(0, old - 64), min(top, old + 64)),
                st.integers(0, top),
            )
        )
        struct.pack_into(fmt, data, at, min(value, top))
    return bytes(data)


@st.composite
def flipped(draw):
    data = bytearray(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] ^= draw(st.integers(1, 255))
    return bytes(data)


@st.composite
def truncated(draw):
    data = BASES[draw(st.sampled_from(sorted(BASES)))]
    layout = _layout(data)
    # every kind of offset: inside a local header, a .npy header, the data, the central directory, the end record
    marks = sorted({0, len(data)} | {m[k] + d for m in layout for k in ("local", "npy", "central", "end") for d in (0, 1, 4, 11, 29)})
    cut = draw(st.one_of(st.sampled_from([m for m in marks if m < len(data)]), st.integers(0, len(data) - 1)))
    return data[:cut]


def _npy(header: str, data: bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    text = header.encode("latin1", "replace")
    if version[0] == 1:
        return b"\x93NUMPY" + bytes(version) + struct.pack("<H", len(text)) + text + data
    return b"\x93NUMPY" + bytes(version) + struct.pack("<I", len(text)) + text + data


DESCRS = ["<f4", "<f2", "<f8", ">f4", "<f16", "|b1", "<i8", "|u1", "<U5", "|O", "<c8", "|V4", "<M8[s]", "f4", "x9", "[('a', '<f4')]"]
SIZES = [0, 1, 2, 3, 6, -1, 2**31, 2**62, 10**12]


@st.composite
def npy_lies(draw):
    """Archives whose zip layer is valid but whose .npy members lie: wrong dtype strings,
    huge or negative shapes, data shorter or longer than declared, odd versions, raw text."""
    members = {}
    names = draw(st.lists(st.sampled_from(["attention_weights", "attention_mask", "tokens", "other"]), min_size=1, max_size=3, unique=True))
    for name in names:
        descr = draw(st.sampled_from(DESCRS))
        shape = tuple(draw(st.lists(st.sampled_from(SIZES), min_size=0, max_size=6)))
        fortran = draw(st.sampled_from(["False", "True", "1", "'no'"]))
        header = draw(
            st.one_of(
                st.just(f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}"),
                st.just(f"{{'descr': {descr!r}, 'shape': {shape}}}"),
                st.text(max_size=60),
            )
        )
        header = header + " " * (-(len(header) + 11) % 64) + "\n"
        try:
            count = int(np.prod(shape, dtype=np.int64)) * np.dtype(descr).itemsize if descr not in ("x9",) else 0
        except (TypeError, ValueError, OverflowError):
            count = 0
        honest = 0 <= count <= 4096
        length = draw(st.one_of(st.just(count if honest else 0), st.integers(0, 256)))
        data = draw(st.binary(min_size=length, max_size=length)) if draw(st.booleans()) else bytes(length)
        version = draw(st.sampled_from([(1, 0), (2, 0), (3, 0), (4, 0), (1, 7)]))
        members[name + ".npy"] = _npy(header, data, version)
    compress = draw(st.booleans())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return buffer.getvalue()


@st.composite
def pickles(draw):
    """Object arrays: numpy's own pickled members, and a member whose pickle would run code."""
    if draw(st.booleans()):
        return _savez(attention_weights=np.array([{"a": 1}, None, _Exploit()], dtype=object))
    payload = pickle.dumps(np.array([_Exploit()], dtype=object))
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    body = _npy(header + " " * (-(len(header) + 11) % 64) + "\n", payload)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(draw(st.sampled_from(["attention_weights.npy", "attention_mask.npy", "tokens.npy"])), body)
        if draw(st.booleans()):
            zf.writestr("attention_weights.npy", BASES["plain"][0:0] + _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 1, 1), }" + " " * 5 + "\n", np.float32(1).tobytes()))
    return buffer.getvalue()


@st.composite
def zip_oddities(draw):
    """Valid zips with odd members: duplicates, directories, encryption flags, other compressors."""
    kind = draw(st.sampled_from(["duplicate", "directory", "encrypted", "bzip2", "lzma", "many", "empty_member"]))
    good = BASES[draw(st.sampled_from(STORED))]
    with zipfile.ZipFile(io.BytesIO(good)) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    buffer = io.BytesIO()
    method = {"bzip2": zipfile.ZIP_BZIP2, "lzma": zipfile.ZIP_LZMA}.get(kind, zipfile.ZIP_STORED)
    with zipfile.ZipFile(buffer, "w", method) as zf:
        for name, body in members.items():
            zf.writestr(name, body)
        if kind == "duplicate":
            other = np.full((2, 2, 6, 6), 1 / 6, dtype=np.float32)
            with warnings.catch_warnings():  # zipfile warns about the duplicate name
                warnings.simplefilter("ignore", UserWarning)
                zf.writestr("attention_weights.npy", _savez_member(other))
        elif kind == "directory":
            zf.writestr("attention_weights.npy/", b"")
        elif kind == "many":
            for i in range(draw(st.integers(1, 200))):
                zf.writestr(f"x{i}.npy", b"")
        elif kind == "empty_member":
            zf.writestr("tokens.npy", b"")
    data = bytearray(buffer.getvalue())
    if kind == "encrypted":  # set the "encrypted" flag bit of every header
        for m in _layout(bytes(data)):
            for at in (m["local"] + 6, m["central"] + 8):
                data[at] |= 1
    if method != zipfile.ZIP_STORED and draw(st.booleans()):  # and corrupt the compressed stream
        m = _layout(bytes(data))[0]
        data[m["npy"] + 3] ^= 0xFF
    return bytes(data)


def _savez_member(array) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    return buffer.getvalue()


random_bytes = st.one_of(st.binary(max_size=2048), st.binary(max_size=512).map(lambda b: b"PK\x03\x04" + b))
MALFORMED = st.one_of(random_bytes, truncated(), flipped(), field_lies(), npy_lies(), pickles(), zip_oddities())


# ---------------------------------------------------------------- the properties


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _read(path: Path) -> str:
    """'ok' for a dump that reads and validates, 'rejected' for a DumpError; anything else raises."""
    try:
        header = dumps.scan(str(path))
        dump = dumps.read(header)
    except DumpError as exc:
        assert str(exc) and "\n" not in str(exc)
        return "rejected"
    b, l, h, q, k = header.batch, header.layers, header.heads, header.query, header.key
    assert dump.attention.shape == (b, l, h, q, k)
    assert dump.lengths.shape == (b,) and ((dump.lengths >= 1) & (dump.lengths <= max(q, k))).all()
    for i, n in enumerate(dump.lengths):
        assert np.isfinite(dump.attention[i, :, :, :n, :n]).all()
    return "ok"


def _fits(path: Path, snapshot: dict) -> bool:
    """Whether a valid dump can join the (self-attention) store: same layers and heads, query == key."""
    header = dumps.scan(str(path))
    layers, heads = snapshot["attention"].shape[1:3]
    return (header.layers, header.heads) == (layers, heads) and header.query == header.key


def _stored_only(data: bytes) -> bool:
    """True when no member is compressed: then nothing may allocate more than ~the file's size."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    except Exception:
        return True  # not a zip zipfile can read: nothing can be decompressed from it


@settings(PROFILE)
@given(data=MALFORMED)
def test_malformed_dumps_are_rejected_or_valid(data, scratch):
    path = scratch / "fuzzed.npz"
    path.write_bytes(data)
    MARKER.unlink(missing_ok=True)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        _read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not MARKER.exists(), "an object was unpickled"
    if _stored_only(data):
        assert peak < 4 * len(data) + MB, f"{peak:,} bytes allocated for a {len(data):,}-byte file"


@pytest.mark.parametrize("name", sorted(BASES))
def test_the_bases_are_valid(name, scratch):
    path = scratch / f"{name}.npz"
    path.write_bytes(BASES[name])
    assert _read(path) == "ok"


def test_a_deflated_member_that_lies_about_its_size_allocates_what_it_holds(scratch):
    """A member declaring 8 MB (within the zip-bomb ratio) whose stream holds 130 kB:
    reading allocates about what is really there, not what the headers claim."""
    real = softmax_rows(np.random.default_rng(0), (2, 2, 64, 64))  # 131 kB
    body = bytearray(_savez_member(real))
    header_len = len(body) - real.nbytes
    claimed = (2, 2, 1024, 512)  # 8 MB
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {claimed}, }}"
    text += " " * (header_len - 11 - len(text)) + "\n"
    body[:header_len] = _npy(text, b"")[:header_len]
    assert len(_npy(text, b"")) == header_len
    compressed = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = compressed.compress(bytes(body)) + compressed.flush()
    declared = header_len + 4 * int(np.prod(claimed))
    assert declared <= dumps.MAX_COMPRESSION_RATIO * len(stream) + MB, "must pass the zip-bomb check"
    path = scratch / "liar.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("attention_weights.npy", bytes(body))
    data = bytearray(path.read_bytes())
    for m in _layout(bytes(data)):  # make the headers claim 8 MB
        struct.pack_into("<I", data, m["local"] + 22, declared)
        struct.pack_into("<I", data, m["central"] + 24, declared)
    path.write_bytes(bytes(data))
    header = dumps.scan(str(path))
    assert header.query == 1024
    tracemalloc.start()
    try:
        with pytest.raises(DumpError):
            dumps.read(header)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * (len(data) + len(body)) + MB, f"{peak:,} bytes allocated"


def test_found_by_fuzzing(scratch):
    """Each of these once escaped as another exception (or was misreported); now one DumpError line."""
    plain = BASES["plain"]
    layout = _layout(plain)[0]
    cases = {}
    v3 = bytearray(plain)  # numpy 2 has no np.lib.format._read_array_header for .npy 3.0
    v3[layout["npy"] + 6] = 3
    cases["npy 3.0"] = (bytes(v3), None)
    for field, value, says in [
        ((layout["central"] + 10, "<H"), 99, "unsupported zip archive"),  # compression method 99
        ((layout["central"] + 8, "<H"), 1, "encrypted zip member"),  # the encrypted flag
        ((layout["central"] + 8, "<H"), 1 << 5, "unsupported zip archive"),  # compressed patched data
        ((layout["central"] + 6, "<H"), 64, "unsupported zip archive"),  # zip version 6.4
    ]:
        data = bytearray(plain)
        struct.pack_into(field[1], data, field[0], value)
        cases[says + str(value)] = (bytes(data), says)
    broken = bytearray(BASES["deflated"])  # a corrupt deflate stream: zlib.error
    broken[_layout(bytes(broken))[0]["npy"] + 3] ^= 0xFF
    cases["deflate"] = (bytes(broken), "corrupt zip archive")
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2,"  # tokenize.TokenError in numpy's header parser
    cases["header"] = (_one_member(_npy(text + " " * (-(len(text) + 11) % 64) + "\n", b"")), "not a valid .npy array")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        twice = _one_member(_savez_member(np.full((2, 2, 3, 3), 1 / 3, dtype=np.float32)), extra=_savez_member(np.ones(1)))
    cases["twice"] = (twice, "'attention_weights' appears twice in the archive")
    for name, (data, says) in cases.items():
        path = scratch / "found.npz"
        path.write_bytes(data)
        try:
            dumps.read(dumps.scan(str(path)))
        except DumpError as exc:
            assert says is None or says in str(exc), (name, str(exc))
        else:
            assert says is None, name


def _one_member(body: bytes, extra: bytes | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("attention_weights.npy", body)
        if extra is not None:
            zf.writestr("attention_weights.npy", extra)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzstore")
    good = root / "good"
    good.mkdir()
    for i in range(2):
        (good / f"g{i}.npz").write_bytes(BASES["batched"])  # the same content twice: a duplicate
    (good / "plain.npz").write_bytes(_savez(attention_weights=np.full((2, 2, 6, 6), 1 / 6, dtype=np.float32)))
    path = root / "s.zarr"
    assert ingest([good], path).ok
    return path, store_snapshot(path)


@FOLDERS
@given(files=st.lists(MALFORMED, min_size=3, max_size=8))
def test_ingesting_fuzzed_files_only_rejects_them(files, committed, scratch):
    path, before = committed
    folder = scratch / "folder"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    verdicts = {}
    for i, data in enumerate(files):
        f = folder / f"f{i}.npz"
        f.write_bytes(data)
        verdicts[str(f)] = _read(f)
        if verdicts[str(f)] == "ok" and not _fits(f, before):
            verdicts[str(f)] = "misfit"  # a valid dump of another model: ingest must refuse it too
    assume(any(v == "rejected" for v in verdicts.values()))
    target = scratch / "s.zarr"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(path, target)
    report = ingest([folder], target, jobs=2)
    rejected = {r.path for r in report.rejected}
    assert rejected == {f for f, v in verdicts.items() if v != "ok"} - {d.path for d in report.duplicates}
    after = store_snapshot(target)
    n = before["committed"]
    np.testing.assert_array_equal(after["attention"][:n, ..., : before["attention"].shape[-1], : before["attention"].shape[-1]], before["attention"])
    assert {k: v for k, v in after["files"].items() if k in before["files"]} == before["files"]
    assert not set(after["files"]) & {Path(f).name for f in rejected}
    assert store_problems(target) == []
