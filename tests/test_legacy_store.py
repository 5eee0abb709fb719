"""A store written by an earlier fastattn (tests/data/store_v1, made at commit f1c431f from the
dumps beside it: 3 files of 2 samples, masks, tokens, statistics with k=3 and a rollout) must
keep opening, checking, appending and computing statistics with today's code."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

import fastattn
from fastattn.check import store_problems

from conftest import DATA, softmax_rows, write_dump

FIXTURE = DATA / "store_v1"


@pytest.fixture
def old_store(tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(FIXTURE / "store.zarr", store)
    return store


def fixture_batches():
    """The fixture's samples as ingest orders them: (attention (b, layer, head, q, k), length, tokens)."""
    attention, length, tokens = [], [], []
    for path in sorted((FIXTURE / "dumps").glob("*.npz")):
        with np.load(path, allow_pickle=False) as z:
            attention.append(z["attention_weights"].transpose(1, 0, 2, 3, 4))
            length.append(z["attention_mask"].sum(-1))
            tokens.append(z["tokens"])
    return np.concatenate(attention), np.concatenate(length), np.concatenate(tokens)


def test_old_store_opens_with_its_values(old_store):
    ds = fastattn.open_store(old_store)
    attention, length, tokens = fixture_batches()
    assert dict(ds.sizes) == {"batch": 6, "layer": 2, "head": 2, "query": 6, "key": 6}
    np.testing.assert_array_equal(ds["length"].values, length)
    for b, n in enumerate(length):
        np.testing.assert_array_equal(ds["attention"].values[b, :, :, :n, :n], attention[b, :, :, :n, :n])
        assert np.isnan(ds["attention"].values[b, :, :, n:, :]).all()
        assert list(ds["token"].values[b, :n]) == list(tokens[b, :n])


def test_old_store_checks_clean(old_store):
    assert store_problems(old_store) == []


def test_old_statistics_read_and_match_the_kernel(old_store):
    st = fastattn.open_stats(old_store)
    assert st.attrs["k"] == 3
    fresh = fastattn.compute_stats(fastattn.open_store(old_store), k=3).compute()
    for name in ("col_sum", "topk_index", "self_attention", "peak_key", "uniform"):
        np.testing.assert_array_equal(st[name].values, fresh[name].values, err_msg=name)
    # the float32 log changed since (Cephes logf for musl's): the entropy moves by at most the
    # logs' difference, ~2e-7 relative, and not at all where both logs are exact
    for name in ("entropy", "entropy_mean"):
        np.testing.assert_allclose(st[name].values, fresh[name].values, rtol=3e-7, atol=0, err_msg=name)


def test_old_store_appends_and_recomputes_statistics(old_store, tmp_path, rng, cli):
    # the fixture's own dumps, from another folder: known by content, nothing stored twice
    again = cli("ingest", FIXTURE / "dumps", old_store)
    assert again.exit_code == 0, again.output
    assert fastattn.open_store(old_store).sizes["batch"] == 6
    new = tmp_path / "new"
    new.mkdir()
    weights = softmax_rows(rng, (2, 3, 2, 6, 6))  # (layer, batch, head, q, k)
    write_dump(new / "extra.npz", weights, attention_mask=np.ones((3, 6), np.int64))
    added = cli("ingest", new, old_store)
    assert added.exit_code == 0, added.output
    ds = fastattn.open_store(old_store)
    assert ds.sizes["batch"] == 9
    np.testing.assert_array_equal(ds["attention"].values[6:], weights.transpose(1, 0, 2, 3, 4))
    stats = cli("stats", old_store, "-k", "3", "--format", "json")
    assert stats.exit_code == 0, stats.output
    st = fastattn.open_stats(old_store)
    assert st.sizes["batch"] == 9
    fresh = fastattn.compute_stats(ds, k=3).compute()
    np.testing.assert_array_equal(st["entropy"].values, fresh["entropy"].values)
    assert store_problems(old_store) == []
    manifest = json.loads((old_store / "_fastattn" / "manifest.json").read_text())
    assert manifest["committed"] == 9
    # the old store keeps its attention codec (byte shuffle) for the batches appended, and its
    # statistics chunk keys follow the group's metadata, whichever encoding it has
    group = zarr.open_group(str(old_store), mode="r")
    assert group["attention"].metadata.codecs[1].shuffle.value == "shuffle"
    # ... and its chunk keys: folders (c/2/0/0/0/0), not the files new stores get (c.2.0.0.0.0)
    attention = group["attention"]
    assert attention.metadata.chunk_key_encoding.separator == "/"
    assert (old_store / "attention" / attention.metadata.encode_chunk_key((8 // attention.chunks[0], 0, 0, 0, 0))).is_file()
    assert not list((old_store / "attention").glob("c.*"))
    for name in ("entropy", "peak_key"):
        array = group["stats"][name]
        separator = array.metadata.chunk_key_encoding.separator
        files = sorted(p.relative_to(old_store / "stats" / name).as_posix() for p in (old_store / "stats" / name).rglob("*") if p.is_file())
        assert files == sorted(["zarr.json", *(array.metadata.encode_chunk_key((i, *[0] * (array.ndim - 1))) for i in range(-(-9 // array.chunks[0])))]), (separator, files)
