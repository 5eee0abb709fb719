"""Chunks stay a few MB at any sequence length; large dumps are read a slab at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zarr

from conftest import batched_dump, softmax_rows, write_dump
from fastattn import check, dumps, store
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
    assert check.check_store(target) == []


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


def test_statistics_of_batches_larger_than_a_block_are_read_plane_by_plane(tmp_path, rng, monkeypatch):
    """A batch larger than the stats block is read one chunk's heads of a layer at a time;
    the statistics are bit for bit those of whole blocks."""
    import shutil

    from fastattn import stats

    batched_dump(rng, tmp_path / "d" / "a.npz", [9, 5, 7], layers=2, heads=4)
    with monkeypatch.context() as patch:
        patch.setattr(store.schema, "CHUNK_BYTES", 2 * 9 * 9 * 4)  # two heads' planes a chunk
        ingest([tmp_path / "d"], tmp_path / "s.zarr")
    shutil.copytree(tmp_path / "s.zarr", tmp_path / "whole.zarr")
    assert stats.write_stats(tmp_path / "whole.zarr")["computed"] == 3
    reads = []
    planes_iter = stats._Planes.__iter__

    def counted(self):
        for piece, offset in planes_iter(self):
            reads.append(piece.shape)
            yield piece, offset

    monkeypatch.setattr(stats._Planes, "__iter__", counted)
    monkeypatch.setattr(stats, "BLOCK_BYTES", 2 * 9 * 9 * 4)  # less than one batch (2 layers x 4 heads)
    assert stats.write_stats(tmp_path / "s.zarr")["computed"] == 3
    assert reads and set(reads) == {(1, 1, 2, 9, 9)}  # one chunk's planes at a time
    a, b = stats.open_stats(tmp_path / "s.zarr").compute(), stats.open_stats(tmp_path / "whole.zarr").compute()
    for name in b.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
