"""Files read straight into chunk rows (`dumps.read_into`, `ingest._Rows`): the same samples,
and the same chunk files, as reading each file and copying its samples into the chunks."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_store, batched_dump, softmax_rows, write_dump

from fastattn import dumps
from fastattn.errors import DumpError
from fastattn.ingest import _ChunkWriter, ingest
from fastattn.store import schema


def stored_form(dump: dumps.Dump, index: int, query: int, key: int) -> np.ndarray:
    """Sample `index` of a `dumps.read` as a store keeps it: its valid block, NaN elsewhere."""
    n = int(dump.lengths[index])
    out = np.full(dump.attention.shape[1:3] + (query, key), np.nan, dtype=dump.attention.dtype)
    q, k = min(n, query), min(n, key)
    out[:, :, :q, :k] = dump.attention[index, :, :, :q, :k]
    return out


def places_for(header: dumps.DumpHeader, dtype=None) -> list[np.ndarray]:
    shape = (header.layers, header.heads, header.query, header.key)
    return [np.full(shape, -7.0, dtype=dtype or header.dtype) for _ in range(header.batch)]  # not NaN: every value must be written


def dump_kinds(folder: Path, rng) -> dict[str, tuple[Path, str | None]]:
    """One dump of each kind `read_into` takes, with the layout to scan it with."""
    kinds = {}
    kinds["plain"] = (write_dump(folder / "plain.npz", softmax_rows(rng, (2, 3, 7, 7))), None)
    kinds["masked"] = (batched_dump(rng, folder / "masked.npz", [5, 9, 2], layers=2, heads=3, size=9), None)
    att = np.zeros((2, 3, 3, 8, 8), dtype=np.float32)  # a mask with holes: left padding and a gap
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1, 1, 1], [1] * 8], dtype=np.int8)
    for b, row in enumerate(mask):
        valid = np.flatnonzero(row)
        att[:, b, :, :, valid] = np.moveaxis(softmax_rows(rng, (2, 3, 8, len(valid))), -1, 0)
    tokens = np.array([[f"t{b}{k}" for k in range(8)] for b in range(3)])
    ids = rng.integers(0, 30000, size=(3, 8))
    kinds["holes"] = (write_dump(folder / "holes.npz", att, attention_mask=mask, tokens=tokens, input_ids=ids), None)
    zero_keys = softmax_rows(rng, (2, 3, 6, 6))
    zero_keys[..., 4:] = 0.0  # padding saved without a mask: its length is inferred
    zero_keys /= zero_keys.sum(axis=-1, keepdims=True)
    kinds["inferred"] = (write_dump(folder / "inferred.npz", zero_keys), None)
    kinds["batch first"] = (write_dump(folder / "blhqk.npz", softmax_rows(rng, (4, 2, 3, 5, 5))), "blhqk")
    kinds["cross"] = (write_dump(folder / "cross.npz", softmax_rows(rng, (2, 3, 4, 6))), None)
    return kinds


def test_read_into_leaves_what_read_gives_as_a_store_keeps_it(tmp_path, rng):
    for kind, (path, layout) in dump_kinds(tmp_path, rng).items():
        header = dumps.scan(str(path), layout)
        expected = dumps.read(header)
        places = places_for(header)
        got = dumps.read_into(header, places)
        assert got is not None, kind
        assert got.content_hash == expected.content_hash and got.inferred == expected.inferred, kind
        np.testing.assert_array_equal(got.lengths, expected.lengths, err_msg=kind)
        for name in ("tokens", "input_ids"):
            a, b = getattr(got, name), getattr(expected, name)
            assert (a is None and b is None) or np.array_equal(a, b), (kind, name)
        for index, place in enumerate(places):
            np.testing.assert_array_equal(place, stored_form(expected, index, header.query, header.key), err_msg=kind)
        assert got.attention is places


def test_read_into_declines_what_it_cannot_place(tmp_path, rng):
    att = softmax_rows(rng, (2, 3, 7, 7))
    path = write_dump(tmp_path / "a.npz", att)
    header = dumps.scan(str(path))
    assert dumps.read_into(header, places_for(header, np.float16)) is None  # another dtype: read and cast
    assert dumps.read_into(header, [np.zeros((2, 3, 9, 9), np.float32)]) is None  # a longer store: read and padded
    np.savez_compressed(tmp_path / "z.npz", attention_weights=att)
    compressed = dumps.scan(str(tmp_path / "z.npz"))
    places = places_for(compressed)
    assert dumps.read_into(compressed, places) is None and (places[0] == -7.0).all()  # nothing read
    fortran = write_dump(tmp_path / "f.npz", np.asfortranarray(att))
    assert dumps.read_into(dumps.scan(str(fortran)), places_for(header)) is None
    keys_first = write_dump(tmp_path / "k.npz", np.ascontiguousarray(att.transpose(0, 1, 3, 2)))
    assert dumps.read_into(dumps.scan(str(keys_first), "lhkq"), places_for(header)) is None


def flip_a_weight_byte(path: Path) -> None:
    """Change one byte of the attention's data, not its zip directory: only the CRC-32 tells."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("attention_weights.npy")
    data = bytearray(path.read_bytes())
    name_len, extra_len = np.frombuffer(bytes(data[info.header_offset + 26 : info.header_offset + 30]), "<u2")
    data[info.header_offset + 30 + name_len + extra_len + info.compress_size - 5] ^= 0x40
    path.write_bytes(bytes(data))


def test_read_into_checks_the_crc_on_what_it_placed(tmp_path, rng):
    path = write_dump(tmp_path / "a.npz", softmax_rows(rng, (2, 3, 7, 7)))
    header = dumps.scan(str(path))
    flip_a_weight_byte(path)
    with pytest.raises(DumpError, match="bad CRC-32 for 'attention_weights'"):
        dumps.read_into(header, places_for(header))
    with pytest.raises(DumpError, match="bad CRC-32 for 'attention_weights'"):
        dumps.read(header)
    os.truncate(path, header.size - 100)
    with pytest.raises(DumpError, match="changed while being ingested"):
        dumps.read_into(header, places_for(header))


def corpus(folder: Path, rng) -> Path:
    """Files that cross chunk rows (3 samples each, 4 to a row), with rejected files and a
    duplicate early and in the middle, so that later reads in flight are moved back; ragged
    and float64 files are copied into their places."""
    folder.mkdir()
    for i in range(14):
        path = folder / f"f{i:02d}.npz"
        if i in (1, 8):
            bad = softmax_rows(rng, (2, 3, 3, 9, 9))
            bad[1, 2, 0, 4] *= 3  # a row far from 1
            write_dump(path, bad)
        elif i == 5:
            good = batched_dump(rng, path, [9, 4, 7], layers=2, heads=3, size=9)
            flip_a_weight_byte(good)
        elif i == 10:
            shutil.copy(folder / "f03.npz", path)  # same content as f03: recorded, not stored twice
        elif i == 12:
            write_dump(path, softmax_rows(rng, (2, 3, 6, 6)))  # shorter than the store: copied, padded
        elif i == 13:
            write_dump(path, softmax_rows(rng, (2, 3, 9, 9), dtype=np.float64))  # cast: copied
        elif i % 3 == 0:
            write_dump(path, softmax_rows(rng, (2, 3, 9, 9)))
        else:
            batched_dump(rng, path, list(rng.integers(2, 10, size=3)), layers=2, heads=3, size=9)
    return folder


def chunk_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json" and p != root / "zarr.json"  # those two hold times
    }


@pytest.mark.parametrize("mapped", [False, True])
def test_rows_read_into_make_the_chunks_that_copying_makes(mapped, tmp_path, rng, monkeypatch):
    """Both ways, first into a new store, then appended to it (its first row part committed).
    `mapped`: the 3-sample files are mapped, and copied into rows that others are read into."""
    monkeypatch.setattr(schema, "CHUNK_BYTES", 4 * 3 * 9 * 9 * 4)  # 4 samples to a chunk row
    if mapped:
        monkeypatch.setattr(dumps, "MAP_BYTES", 4000)  # more than a 1-sample file, less than a 3-sample one
    first, second = corpus(tmp_path / "one", rng), corpus(tmp_path / "two", rng)
    placed_reads = []
    read_into = dumps.read_into

    def counted(header, places):
        dump = read_into(header, places)
        placed_reads.append(dump is not None)
        return dump

    monkeypatch.setattr(dumps, "read_into", counted)

    def run(out: Path):
        reports = [ingest([folder], out, jobs=2) for folder in (first, second)]
        return [(sorted(map(str, r.rejected)), sorted(map(str, r.duplicates)), r.batches_added) for r in reports]

    placed = run(tmp_path / "placed.zarr")
    # all but the rejected (by their values), the shorter and the float64 ones; mapped: the 1-sample files
    assert sum(placed_reads) == (2 * 5 if mapped else 2 * 9)
    monkeypatch.setattr(_ChunkWriter, "whole_samples", lambda self: False)
    copied = run(tmp_path / "copied.zarr")
    assert placed == copied
    assert [len(rejected) for rejected, _, _ in placed] == [3, 3] and [len(d) for _, d, _ in placed] == [1, 1]
    assert placed[0][2] == placed[1][2] == 4 * 3 + 6  # 4 files of 3 samples, 6 of 1
    assert chunk_files(tmp_path / "placed.zarr") == chunk_files(tmp_path / "copied.zarr")
    assert_same_store(tmp_path / "placed.zarr", tmp_path / "copied.zarr")


def test_read_into_declines_places_it_cannot_read_into(tmp_path, rng):
    path = write_dump(tmp_path / "a.npz", softmax_rows(rng, (2, 3, 7, 7)))
    header = dumps.scan(str(path))
    strided = np.zeros((2, 3, 7, 14), np.float32)[..., ::2]  # a plane that is not one block of memory
    assert dumps.read_into(header, [strided]) is None and (strided == 0).all()


def test_the_crc32_ingest_checks_is_zips(rng):
    """`dumps.crc32` (ISA-L's) gives zlib's values, chained and on any buffer."""
    import zlib

    data = rng.integers(0, 256, size=3_000_001, dtype=np.uint8).tobytes()
    for size in (0, 1, 15, 4096, 65_537, len(data)):
        assert dumps.crc32(data[:size]) == zlib.crc32(data[:size]), size
    start = zlib.crc32(b"PK header")
    assert dumps.crc32(memoryview(data)[7:200_007], start) == zlib.crc32(data[7:200_007], start)
    plane = np.frombuffer(data[: 4 * 240_000], np.float32).reshape(3, 400, 200)
    assert dumps.crc32(plane[1], 12345) == zlib.crc32(plane[1].tobytes(), 12345)
