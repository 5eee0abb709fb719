"""Ingest against the real samples and synthetic dumps: exact values, idempotence, growth."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import xarray as xr
from conftest import assert_same_store, batched_dump, softmax_rows, store_snapshot, write_dump

from fastattn import dumps, store
from fastattn.errors import FastattnError, StoreError
from fastattn.ingest import ingest


def test_samples_bit_for_bit(samples, tmp_path):
    out = tmp_path / "s.zarr"
    report = ingest([samples / "fixed", samples / "batched"], out, jobs=2)
    assert report.ok and report.files_ingested == 5
    ds = store.open_store(out).compute()
    assert ds.sizes["batch"] == 3 + 8
    assert dict(ds.attention.sizes) == {"batch": 11, "layer": 6, "head": 12, "query": 39, "key": 39}
    seen = set()
    for b in range(ds.sizes["batch"]):
        source, index, n = str(ds.source.values[b]), int(ds.source_index.values[b]), int(ds.length.values[b])
        seen.add((source, index))
        with np.load(samples / source, allow_pickle=False) as z:
            raw = z["attention_weights"]
            if raw.ndim == 5:
                assert n == int(z["attention_mask"][index].sum())
                raw = raw[:, index]
            else:
                assert index == 0 and n == raw.shape[-1]
        values = ds.attention.values[b]
        np.testing.assert_array_equal(values[:, :, :n, :n], raw[:, :, :n, :n])
        assert np.isnan(values[:, :, n:, :]).all() and np.isnan(values[:, :, :n, n:]).all()
    assert len(seen) == 11
    assert {s.split("/")[0] for s, _ in seen} == {"fixed", "batched"}  # relative to the common parent
    keys = store.read_manifest(store.Location(out)).files
    assert sorted(keys) == sorted(os.path.realpath(samples / s) for s, _ in seen if _ == 0)  # known by absolute path


def test_plain_xarray_opens_the_store(samples, tmp_path):
    out = tmp_path / "s.zarr"
    ingest([samples / "fixed"], out)
    ds = xr.open_zarr(out)
    assert ds.attention.dims == ("batch", "layer", "head", "query", "key")
    np.testing.assert_array_equal(ds.attention.values, store.open_store(out).attention.values)


def test_rerun_adds_nothing_and_new_files_append(samples, tmp_path):
    out = tmp_path / "s.zarr"
    first = ingest([samples / "fixed"], out)
    before = store_snapshot(out)
    again = ingest([samples / "fixed"], out)
    assert again.batches_added == 0 and again.files_unchanged == 3 and not again.written
    assert_same_store(out, out)
    np.testing.assert_array_equal(store_snapshot(out)["attention"], before["attention"])
    os.utime(samples / "fixed" / "attention_batch_0000.npz")  # touched, not changed: still unchanged
    assert ingest([samples / "fixed"], out).batches_added == 0
    new = samples / "fixed" / "attention_batch_0100.npz"
    new.write_bytes((samples / "batched" / "attention_batch_0002.npz").read_bytes())
    added = ingest([samples / "fixed"], out)
    assert added.batches_added == 4 and first.committed == 3 and added.committed == 7


def test_longer_sequences_grow_the_store_and_keep_old_values(tmp_path, rng):
    out = tmp_path / "s.zarr"
    batched_dump(rng, tmp_path / "a" / "short.npz", [5, 8, 6])
    ingest([tmp_path / "a"], out)
    old = store_snapshot(out)
    batched_dump(rng, tmp_path / "a" / "zlong.npz", [30, 12])
    report = ingest([tmp_path / "a"], out)
    assert report.batches_added == 2
    new = store_snapshot(out)
    assert new["attention"].shape[-1] == 30
    np.testing.assert_array_equal(new["attention"][:3, :, :, :8, :8], old["attention"])
    assert np.isnan(new["attention"][:3, :, :, 8:, :]).all()
    np.testing.assert_array_equal(new["length"], [5, 8, 6, 30, 12])


def test_float16_store_halves_and_is_close(samples, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    ingest([samples / "fixed"], a)
    ingest([samples / "fixed"], b, dtype="float16")
    full, half = store.open_store(a), store.open_store(b)
    assert half.attention.dtype == np.float16
    np.testing.assert_allclose(half.attention.values.astype(np.float32), full.attention.values, rtol=1e-3, atol=1e-7)
    assert store.Location(b).nbytes("attention") < 0.75 * store.Location(a).nbytes("attention")


def test_changed_file_is_rejected_unless_replace(tmp_path, rng):
    out = tmp_path / "s.zarr"
    folder = tmp_path / "d"
    write_dump(folder / "a.npz", softmax_rows(rng, (2, 3, 4, 4)))
    write_dump(folder / "b.npz", softmax_rows(rng, (2, 3, 4, 4)))
    ingest([folder], out)
    changed = softmax_rows(rng, (2, 3, 4, 4))
    time.sleep(0.01)
    write_dump(folder / "a.npz", changed)
    before = store_snapshot(out)
    report = ingest([folder], out)
    assert [r.path for r in report.rejected] == [str(folder / "a.npz")]
    assert "changed since it was ingested" in report.rejected[0].reason and "with replace" in report.rejected[0].reason
    np.testing.assert_array_equal(store_snapshot(out)["attention"], before["attention"])
    report = ingest([folder], out, replace=True)
    assert report.ok and report.files_replaced == 1 and report.committed == 2
    values = store.open_store(out).attention.values
    np.testing.assert_array_equal(values[0], changed)
    np.testing.assert_array_equal(values[1], before["attention"][1])


def test_same_content_under_another_name_is_not_duplicated(tmp_path, rng):
    out = tmp_path / "s.zarr"
    att = softmax_rows(rng, (2, 3, 4, 4))
    write_dump(tmp_path / "d" / "a.npz", att)
    write_dump(tmp_path / "d" / "copy.npz", att)
    report = ingest([tmp_path / "d"], out)
    assert report.committed == 1 and len(report.duplicates) == 1 and report.ok
    assert ingest([tmp_path / "d"], out).files_unchanged == 2


def test_layer_head_mismatch_names_both(tmp_path, rng):
    out = tmp_path / "s.zarr"
    write_dump(tmp_path / "d" / "a.npz", softmax_rows(rng, (2, 3, 4, 4)))
    write_dump(tmp_path / "d" / "b.npz", softmax_rows(rng, (2, 5, 4, 4)))
    report = ingest([tmp_path / "d"], out)
    assert report.committed == 1
    assert report.rejected[0].reason == "has 2 layers x 5 heads; the store has 2 x 3"


def test_layout_override_and_left_padding(tmp_path, rng):
    out = tmp_path / "s.zarr"
    att = softmax_rows(rng, (2, 2, 3, 5, 5))  # saved as (batch, layer, head, q, k)
    write_dump(tmp_path / "d" / "blhqk.npz", att)
    ingest([tmp_path / "d"], out, layout="blhqk")
    np.testing.assert_array_equal(store.open_store(out).attention.values, att)
    # left padding: valid tokens are moved to the front
    left = np.zeros((2, 1, 3, 6, 6), dtype=np.float32)
    left[:, 0, :, :, 2:] = softmax_rows(rng, (2, 3, 6, 4))
    mask = np.array([[0, 0, 1, 1, 1, 1]], dtype=np.int8)
    write_dump(tmp_path / "e" / "left.npz", left, attention_mask=mask)
    out2 = tmp_path / "t.zarr"
    ingest([tmp_path / "e"], out2)
    ds = store.open_store(out2)
    assert int(ds.length.values[0]) == 4
    np.testing.assert_array_equal(ds.attention.values[0, :, :, :4, :4], left[:, 0, :, 2:, 2:])


def test_strict_writes_nothing_when_any_file_is_bad(tmp_path, rng):
    out = tmp_path / "s.zarr"
    write_dump(tmp_path / "d" / "a.npz", softmax_rows(rng, (2, 3, 4, 4)))
    bad = softmax_rows(rng, (2, 3, 4, 4))
    bad[0, 0, 0, 0] = np.nan
    write_dump(tmp_path / "d" / "b.npz", bad)
    report = ingest([tmp_path / "d"], out, strict=True)
    assert not report.written and len(report.rejected) == 1 and "NaN" in report.rejected[0].reason
    assert not (out / store.MANIFEST).exists()
    report = ingest([tmp_path / "d"], out)
    assert report.committed == 1 and not report.ok


def test_cross_attention_is_stored_with_its_shape(tmp_path, rng):
    out = tmp_path / "s.zarr"
    write_dump(tmp_path / "d" / "a.npz", softmax_rows(rng, (2, 3, 4, 7)))
    write_dump(tmp_path / "d" / "b.npz", softmax_rows(rng, (2, 3, 5, 7)))
    report = ingest([tmp_path / "d"], out)
    assert report.committed == 1 and "this store takes 4 x 7" in report.rejected[0].reason
    ds = store.open_store(out)
    assert (ds.sizes["query"], ds.sizes["key"]) == (4, 7)


def test_store_that_is_not_fastattn_is_refused(tmp_path, rng):
    write_dump(tmp_path / "d" / "a.npz", softmax_rows(rng, (2, 3, 4, 4)))
    foreign = tmp_path / "foreign.zarr"
    xr.Dataset({"x": ("t", np.arange(3))}).to_zarr(foreign, consolidated=False)
    listing = sorted(p.name for p in foreign.rglob("*"))
    with pytest.raises(StoreError, match="not a fastattn store"):
        ingest([tmp_path / "d"], foreign)
    assert sorted(p.name for p in foreign.rglob("*")) == listing
    with pytest.raises(StoreError, match="not a fastattn store"):
        store.open_store(foreign)


def test_no_dumps_found(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastattnError, match="no .npz dumps found"):
        ingest([tmp_path / "empty"], tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_natural_order_and_common_parent(tmp_path, rng):
    for name in ("batch_10.npz", "batch_2.npz", "batch_1.npz"):
        write_dump(tmp_path / "x" / name, softmax_rows(rng, (1, 1, 2, 2)))
    found = dumps.find_dumps([tmp_path / "x"])
    assert [os.path.basename(f) for f in found.files] == ["batch_1.npz", "batch_2.npz", "batch_10.npz"]
    assert found.base == str(tmp_path / "x")
    found = dumps.find_dumps([str(tmp_path / "x" / "batch_*.npz")])
    assert len(found.files) == 3


def test_lock_refuses_a_second_writer_and_takes_over_a_dead_one(tmp_path, rng):
    out = tmp_path / "s.zarr"
    write_dump(tmp_path / "d" / "a.npz", softmax_rows(rng, (1, 1, 2, 2)))
    ingest([tmp_path / "d"], out)
    lock = out / store.LOCK
    with store.Lock(store.Location(out), "fastattn ingest"):
        with pytest.raises(StoreError, match=rf"pid {os.getpid()} on"):
            ingest([tmp_path / "d"], out)
    # a record naming a live process that holds no lock (a reused pid) blocks nobody
    lock.write_text('{"pid": %d, "host": "%s", "since": "then", "purpose": "fastattn ingest"}' % (os.getpid(), os.uname().nodename))
    assert ingest([tmp_path / "d"], out).files_unchanged == 1
    assert not lock.exists()

def test_longer_sequences_after_many_batches_leave_no_chunk_unwritten(tmp_path, rng):
    """More than one batch-chunk row of short samples, then longer ones: the committed rows'
    chunks beyond their old query/key edge are written (NaN), so the store checks clean."""
    import fastattn
    from fastattn.check import store_problems

    short = batched_dump(rng, tmp_path / "a" / "short.npz", [8] * 300, layers=2, heads=2)
    long = batched_dump(rng, tmp_path / "b" / "long.npz", [40, 33], layers=2, heads=2)
    store = tmp_path / "s.zarr"
    fastattn.ingest(short.parent, store)
    assert fastattn.open_store(store)["attention"].encoding["chunks"][0] < 300  # the case: two rows of chunks
    fastattn.ingest(long.parent, store)
    assert store_problems(store) == []
    ds = fastattn.open_store(store)
    attention = ds["attention"].values
    with np.load(short, allow_pickle=False) as z:
        np.testing.assert_array_equal(attention[:300, :, :, :8, :8], z["attention_weights"].transpose(1, 0, 2, 3, 4))
    assert np.isnan(attention[:300, :, :, 8:]).all() and np.isnan(attention[:300, :, :, :, 8:]).all()
    assert (ds["token"].values[:300, 8:] == "").all()
    assert list(ds["length"].values[300:]) == [40, 33]
