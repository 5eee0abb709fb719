"""Chunks stay a few MB at any sequence length; large dumps are read a slab at a time."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import zarr

from conftest import batched_dump, softmax_rows, write_dump
import fastattn
from fastattn import check, dumps, store
from fastattn.errors import StoreError
from fastattn.ingest import ingest


@pytest.mark.parametrize(
    ("heads", "length", "want"),
    [
        (12, 64, (21, 1, 12, 64, 64)),  # short: batches of all heads' planes
        (16, 1024, (1, 1, 1, 1024, 1024)),  # one plane per chunk
        (16, 2048, (1, 1, 1, 512, 2048)),  # a plane is split by queries
        (4, 8192, (1, 1, 1, 128, 8192)),
        (32, 256, (1, 1, 16, 256, 256)),  # heads split
    ],
)
def test_a_chunk_is_a_few_mb_at_any_length(heads, length, want):
    shape = store.attention_chunks(heads, length, length, 4)
    assert shape == want
    assert math.prod(shape) * 4 <= store.schema.CHUNK_BYTES
    assert shape[-1] == length  # kernels always see whole rows


@pytest.mark.parametrize("budget", [3 * 9 * 9 * 4, 9 * 9 * 4, 4 * 9 * 4])  # by batch, by head, by query
def test_split_chunks_hold_exactly_what_was_ingested(tmp_path, rng, monkeypatch, budget):
    monkeypatch.setattr(store.schema, "CHUNK_BYTES", budget)
    batched_dump(rng, tmp_path / "d" / "a.npz", [9, 5, 7], layers=2, heads=3)
    batched_dump(rng, tmp_path / "d" / "b.npz", [6, 9], layers=2, heads=3)
    target = tmp_path / "s.zarr"
    assert ingest([tmp_path / "d" / "a.npz"], target, jobs=2).ok
    assert ingest([tmp_path / "d"], target, jobs=2).ok  # an append into a partly filled chunk row
    chunks = zarr.open_array(str(target / "attention"), mode="r").chunks
    assert math.prod(chunks) * 4 <= budget
    got = store.open_store(target)
    want = []
    for name in ("a.npz", "b.npz"):
        with np.load(tmp_path / "d" / name, allow_pickle=False) as z:
            weights, mask = z["attention_weights"], z["attention_mask"]
        for b in range(weights.shape[1]):
            n = int(mask[b].sum())
            plane = np.full((2, 3, 9, 9), np.nan, dtype=np.float32)
            plane[:, :, :n, :n] = weights[:, b, :, :n, :n]
            want.append(plane)
    np.testing.assert_array_equal(got.attention.values, np.stack(want))
    assert check.store_problems(target) == []


def test_a_large_dump_is_mapped_and_checked_slab_by_slab(tmp_path, rng, monkeypatch):
    """The mapped path (files above MAP_BYTES) accepts what the read path accepts, and
    finds a bad value in its last layer just the same."""
    monkeypatch.setattr(dumps, "MAP_BYTES", 0)
    monkeypatch.setattr(dumps, "SLAB_BYTES", 1000)
    good = softmax_rows(rng, (3, 4, 16, 16))
    write_dump(tmp_path / "d" / "good.npz", good)
    bad = good.copy()
    bad[2, 3, 15, 0] = -0.5
    write_dump(tmp_path / "d" / "bad.npz", bad)
    report = ingest([tmp_path / "d"], tmp_path / "s.zarr")
    assert [r.reason for r in report.rejected] == [
        "attention_weights has a negative weight -0.5 (sample 0, layer 2, head 3, query 15, key 0)"
    ]
    np.testing.assert_array_equal(store.open_store(tmp_path / "s.zarr").attention.values[0], good)
    header = dumps.scan(str(tmp_path / "d" / "good.npz"))
    dump = dumps.read(header)
    dump.release()  # hands the pages back; the values read again from the page cache
    np.testing.assert_array_equal(dump.attention[0], good)


@pytest.mark.parametrize("route", ["chunk files", "zarr"])
def test_statistics_of_batches_larger_than_a_block_are_read_plane_by_plane(route, tmp_path, rng, monkeypatch):
    """A batch larger than the stats block is read one chunk's heads of a layer at a time, from
    the chunk files (a local store) or through zarr (`_Planes`, e.g. a remote one); the
    statistics are bit for bit those of whole blocks."""
    import shutil

    from fastattn import stats

    batched_dump(rng, tmp_path / "d" / "a.npz", [9, 5, 7], layers=2, heads=4)
    with monkeypatch.context() as patch:
        patch.setattr(store.schema, "CHUNK_BYTES", 2 * 9 * 9 * 4)  # two heads' planes a chunk
        ingest([tmp_path / "d"], tmp_path / "s.zarr")
    shutil.copytree(tmp_path / "s.zarr", tmp_path / "whole.zarr")
    assert stats.write_stats(tmp_path / "whole.zarr")["computed"] == 3
    reads = []
    if route == "zarr":
        monkeypatch.setattr(store.WholeChunks, "decodes_here", lambda self: False)
        planes_iter = stats._Planes.__iter__

        def counted(self):
            for piece, offset in planes_iter(self):
                reads.append(piece.shape)
                yield piece, offset

        monkeypatch.setattr(stats._Planes, "__iter__", counted)
    else:
        read = store.WholeChunks.read

        def counted(self, coords):
            chunk = read(self, coords)
            if self.path == "attention":  # not the per-batch lengths, read the same way
                reads.append(chunk.shape)
            return chunk

        monkeypatch.setattr(store.WholeChunks, "read", counted)
    monkeypatch.setattr(stats, "BLOCK_BYTES", 2 * 9 * 9 * 4)  # less than one batch (2 layers x 4 heads)
    assert stats.write_stats(tmp_path / "s.zarr")["computed"] == 3
    assert reads and set(reads) == {(1, 1, 2, 9, 9)}  # one chunk's planes at a time
    if route == "chunk files":
        assert len(reads) == 3 * 2 * 2  # each chunk read once: 3 batches x 2 layers x 2 pairs of heads
    a, b = stats.open_stats(tmp_path / "s.zarr").compute(), stats.open_stats(tmp_path / "whole.zarr").compute()
    for name in b.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


# ---------------------------------------------------------------- whole chunks written without zarr's write path

WHOLE_CHUNK_ARRAYS = [
    # (dtype, fill, shape, chunks, rows written): attention-like with NaN fill, per-batch arrays, tokens
    ("float32", np.nan, (10, 2, 3, 5, 7), (4, 1, 3, 5, 7), (0, 4, 8)),  # the last chunk row past the array's end
    ("float16", np.nan, (6, 2, 3, 9, 9), (3, 1, 2, 4, 9), (0, 3)),  # heads and queries split, edge chunks
    ("int32", -1, (10,), (4,), (0, 4, 8)),
    (str, "", (10,), (4,), (0, 4, 8)),
    (str, "", (9, 6), (4, 4), (0, 4, 8)),
]


def _random_values(rng, dtype, shape):
    if dtype is str:
        words = np.array(["", "a", "héllo", "tok", "Ġthe", "x" * 40])
        return words[rng.integers(0, len(words), shape)].astype(object)
    if np.dtype(dtype).kind == "f":
        values = rng.random(shape).astype(dtype)
        values[rng.random(shape) < 0.2] = np.nan  # NaN padding as the store has it
        return values
    return rng.integers(-5, 1000, shape).astype(dtype)


@pytest.mark.parametrize("weights", [False, True], ids=["shuffle", "noshuffle"])
@pytest.mark.parametrize("blosc_into", [True, False], ids=["blosc-into", "codec-encode"])
@pytest.mark.parametrize(("dtype", "fill", "shape", "chunks", "starts"), WHOLE_CHUNK_ARRAYS)
def test_whole_chunks_are_the_bytes_zarr_writes(tmp_path, rng, monkeypatch, blosc_into, weights, dtype, fill, shape, chunks, starts):
    """store.WholeChunks (fastattn's own encode and write, on random data) and `array[...] = values`
    (zarr's) leave byte-identical chunk files, edge chunks included, with blosc writing into
    fastattn's buffer or through the codec, with byte shuffle (statistics) and without (weights)."""
    if not blosc_into:
        monkeypatch.setattr(store.chunks, "_BLOSC_INTO", None)
    assert blosc_into is (store.chunks._BLOSC_INTO is not None)  # the fast path is really there on this machine
    values = _random_values(rng, dtype, shape)
    arrays = []
    for name in ("zarr", "fastattn"):
        group = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w", zarr_format=3)
        # write_empty_chunks is read when the array is opened, so it goes in the array's config:
        # a chunk that happens to hold only fill values (a 1-in-36 edge chunk of strings) is still written
        arrays.append(
            group.create_array(
                "a", shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, compressors=store.compressors(weights), config={"write_empty_chunks": True}
            )
        )
    by_zarr, ours = arrays
    by_zarr[...] = values
    whole = store.WholeChunks(store.Location(tmp_path / "fastattn.zarr"), ours)
    for start in starts:
        whole.write_rows(start, values[start : start + chunks[0]])
    files = sorted(p.relative_to(tmp_path / "zarr.zarr") for p in (tmp_path / "zarr.zarr" / "a" / "c").rglob("*") if p.is_file())
    assert len(files) == math.prod(-(-n // c) for n, c in zip(shape, chunks))
    for rel in files:
        assert (tmp_path / "fastattn.zarr" / rel).read_bytes() == (tmp_path / "zarr.zarr" / rel).read_bytes(), rel
    assert not list((tmp_path / "fastattn.zarr").rglob("*.partial"))
    got = zarr.open_array(str(tmp_path / "fastattn.zarr" / "a"), mode="r")[...]
    if dtype is str:
        assert got.tolist() == values.tolist()
    else:
        np.testing.assert_array_equal(got, values)


@pytest.mark.parametrize("weights", [False, True], ids=["shuffle", "noshuffle"])
@pytest.mark.parametrize(("dtype", "fill", "shape", "chunks", "starts"), WHOLE_CHUNK_ARRAYS)
def test_whole_chunks_read_what_zarr_reads(tmp_path, rng, weights, dtype, fill, shape, chunks, starts):
    """store.WholeChunks.read (the chunk file decoded by fastattn) gives every chunk zarr wrote
    from random data, edge chunks with their fill value, and a chunk never written as the fill
    value, with byte shuffle (statistics, and attention of older stores) and without (attention
    weights); arrays it cannot decode (strings) say so, for zarr to read them."""
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    array = group.create_array("a", shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, compressors=store.compressors(weights))
    whole = store.WholeChunks(store.Location(tmp_path / "s.zarr"), array)
    if dtype is str:
        assert not whole.decodes_here()
        return
    assert whole.decodes_here()
    values = _random_values(rng, dtype, shape)
    array[: shape[0] - chunks[0]] = values[: shape[0] - chunks[0]]  # the last row of chunks is never written
    grid = [range(-(-n // c)) for n, c in zip(shape, chunks)]
    for coords in itertools.product(*grid):
        got = whole.read(coords)
        assert got.shape == chunks and got.dtype == np.dtype(dtype)
        want = np.full(chunks, fill, dtype=dtype)
        part = array[tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, chunks))]
        want[tuple(slice(0, n) for n in part.shape)] = part
        np.testing.assert_array_equal(got, want, err_msg=str(coords))


def test_weights_blosc_stored_as_they_were_are_read_in_place(tmp_path, rng, samples):
    """Attention weights blosc could not compress (random floats; unpadded softmax weights) are
    stored verbatim after blosc's header: `read` returns them as a view of the file's bytes, no
    copy, equal to what zarr reads; a chunk that compresses (NaN padding) is decoded as before.
    The MiniLM samples ingested (padded: every chunk compresses) read as zarr reads them."""
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    array = group.create_array("a", shape=(2, 16, 64), chunks=(1, 16, 64), dtype="float32", fill_value=np.nan, compressors=store.compressors(weights=True))
    values = rng.random((2, 16, 64), dtype=np.float32)
    values[1, :, 8:] = np.nan  # padding: compresses
    array[...] = values
    whole = store.WholeChunks(store.Location(tmp_path / "s.zarr"), array)
    stored = (tmp_path / "s.zarr" / "a" / "c" / "0" / "0" / "0").read_bytes()
    assert stored[2] & store.chunks._BLOSC_MEMCPYED and len(stored) == 16 + values[0].nbytes + 4  # header, data, checksum
    first = whole.read((0, 0, 0))
    assert first.base is not None and first.flags.aligned  # a view of the file buffer
    np.testing.assert_array_equal(first, values[:1])
    second = whole.read((1, 0, 0))
    assert second.base is None  # decoded into the chunk buffer
    np.testing.assert_array_equal(second, values[1:])

    out = tmp_path / "m.zarr"
    assert ingest([samples / "batched", samples / "fixed"], out).ok
    attention = zarr.open_group(str(out), mode="r")["attention"]
    assert attention.metadata.codecs[1].shuffle.value == "noshuffle"
    whole = store.WholeChunks(store.Location(out), attention)
    for coords in itertools.product(*(range(-(-n // c)) for n, c in zip(attention.shape, attention.chunks))):
        got = whole.read(coords)
        want = attention[tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, attention.chunks))]
        np.testing.assert_array_equal(got[tuple(slice(0, n) for n in want.shape)], want, err_msg=str(coords))


def test_the_checksum_is_zarrs_crc32c_codec_output(tmp_path, rng):
    """The 4 bytes written after a chunk are what zarr's Crc32cCodec appends to the same
    compressed bytes (random data, several sizes)."""
    from zarr.codecs import Crc32cCodec
    from zarr.core.buffer import default_buffer_prototype

    for size in (1, 7, 4096, 100_003):
        group = zarr.open_group(str(tmp_path / f"{size}.zarr"), mode="w", zarr_format=3)
        array = group.create_array("a", shape=(size,), chunks=(size,), dtype="float32", compressors=store.compressors())
        whole = store.WholeChunks(store.Location(tmp_path / f"{size}.zarr"), array)
        payload, checksum = whole.encode(rng.standard_normal(size).astype(np.float32))
        spec = array.metadata.get_chunk_spec((0,), array.config, default_buffer_prototype())
        by_zarr = Crc32cCodec()._encode_sync(default_buffer_prototype().buffer.from_bytes(bytes(payload)), spec)
        assert bytes(payload) + checksum == by_zarr.to_bytes()


def test_a_flipped_bit_in_a_chunk_fails_every_read(samples, tmp_path):
    """A bit flipped in the compressed bytes, or in the checksum after them, of a chunk that
    ingest wrote: fastattn's read and plain zarr's raise a checksum error; check names the chunk."""
    out = tmp_path / "s.zarr"
    assert ingest([samples / "fixed"], out).ok
    chunk = out / "attention" / "c.0.3.0.0.0"
    clean = chunk.read_bytes()
    for offset in (len(clean) // 2, len(clean) - 2):
        damaged = bytearray(clean)
        damaged[offset] ^= 0x10
        chunk.write_bytes(bytes(damaged))
        with pytest.raises(ValueError, match="checksum"):
            store.open_store(out).attention.values
        with pytest.raises(ValueError, match="checksum"):
            zarr.open_array(str(out / "attention"), mode="r")[0, 3]
        attention = zarr.open_group(str(out), mode="r")["attention"]
        with pytest.raises(StoreError, match=r"attention/c\.0\.3\.0\.0\.0: does not decode \(crc32c checksum mismatch"):
            store.WholeChunks(store.Location(out), attention).read((0, 3, 0, 0, 0))
        with pytest.raises(StoreError, match=r"attention/c\.0\.3\.0\.0\.0: does not decode \(crc32c"):
            fastattn.write_stats(out)  # one line naming the chunk, from the command too
        assert [p.where for p in check.store_problems(out)] == ["attention/c.0.3.0.0.0"]
    chunk.write_bytes(clean)
    assert check.store_problems(out) == []


def test_plain_zarr_reads_an_ingested_store_without_fastattn(samples, tmp_path):
    """Another process with stock zarr (fastattn never imported) reads every array ingest wrote."""
    import subprocess
    import sys

    out = tmp_path / "s.zarr"
    assert ingest([samples / "fixed", samples / "batched"], out).ok
    script = (
        "import sys, numpy as np, zarr\n"
        "g = zarr.open_group(sys.argv[1], mode='r', use_consolidated=False)\n"
        "np.savez(sys.argv[2], attention=g['attention'][...], length=g['length'][...], source_index=g['source_index'][...],"
        " source=np.array(g['source'][...].tolist()), token=np.array(g['token'][...].tolist()))\n"
        "assert not [m for m in sys.modules if m.startswith('fastattn')], 'fastattn was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "read.npz")], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    want = store.open_store(out).compute()
    with np.load(tmp_path / "read.npz", allow_pickle=False) as got:
        assert got["attention"].shape == want.attention.shape and not np.isnan(want.attention.values).all()
        np.testing.assert_array_equal(got["attention"], want.attention.values)
        for name in ("length", "source_index", "source", "token"):
            np.testing.assert_array_equal(got[name], want[name].values.astype(got[name].dtype), err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.bool_, np.float64])
def test_read_rows_is_what_zarr_reads(tmp_path, rng, dtype):
    """`WholeChunks.read_rows` (the statistics' reader) gives zarr's values, across chunk edges
    in every dim, for rows starting inside a chunk and short of the array's end, and the fill value in a chunk never written."""
    values = rng.normal(size=(11, 5, 7)) > 0 if dtype is np.bool_ else (rng.normal(size=(11, 5, 7)) * 100).astype(dtype)
    array = zarr.open_group(str(tmp_path), mode="w").create_array(
        "a", shape=values.shape, chunks=(3, 2, 4), dtype=dtype, compressors=zarr.codecs.BloscCodec(cname="lz4"), fill_value=0)
    array[:9] = values[:9]  # rows 9 and 10 of chunk row 3: never written
    reader = store.WholeChunks(store.as_location(tmp_path), array)
    assert reader.decodes_here()
    for start, stop in ((0, 11), (0, 8), (0, 1), (4, 11), (3, 6), (7, 8), (5, 5)):
        np.testing.assert_array_equal(reader.read_rows(stop, start), array[start:stop], err_msg=f"{start}:{stop}")
    assert (reader.read_rows(11)[9:] == 0).all() and reader.read_rows(11)[:9].any()
