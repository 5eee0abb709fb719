"""Statistics of a store against a plain float64 numpy reference; incremental runs; the CLI."""

from __future__ import annotations

import json
import shutil

import dask
import numba
import numpy as np
import pytest
import xarray as xr
from conftest import SAMPLES, batched_dump, softmax_rows, write_dump
from typer.testing import CliRunner

import fastattn
from fastattn import stats, store
from fastattn.ingest import ingest
from fastattn_cli.main import app

FLAGS = stats.FLAGS


def reference_plane(a: np.ndarray, n: int) -> dict:
    """Every statistic of one plane, written plainly in float64 from the valid block."""
    q_size, k_size = a.shape
    cross = q_size != k_size
    nq, nk = (q_size, k_size) if cross else (n, n)
    block = a[:nq, :nk].astype(np.float64)
    logs = np.log(np.where(block > 0, block, 1.0))
    entropy = -(block * logs).sum(axis=1)
    col = block.sum(axis=0)
    diag = np.full(nq, np.nan) if cross else np.diag(block)
    distance = (block * np.abs(np.arange(nq)[:, None] - np.arange(nk)[None, :])).sum(axis=1)
    u = 1.0 / nk
    scale = 8 * u
    valid = n > 1
    out = {
        "row_sum": block.sum(axis=1),
        "entropy": entropy,
        "max_weight": block.max(axis=1),
        "distance": distance,
        "col_sum": col,
        "entropy_mean": entropy.mean(),
        "entropy_norm": entropy.mean() / np.log(nk) if nk > 1 else np.nan,
        "self_attention": diag.mean(),
        "diag_share": diag.sum() / block.sum() if not cross else np.nan,
        "peak_key": int(np.argmax(col)),
        "peak_incoming": col.max(),
        "confidence": block.max(axis=1).mean(),
        "distance_mean": distance.mean(),
        "row_sum_error": np.abs(block.sum(axis=1) - 1).max(),
    }
    out["uniform"] = valid and block.std() < 0.01 * scale
    out["diagonal_only"] = valid and not cross and out["diag_share"] > 0.8
    out["dominant_key"] = valid and col.max() / nq > 3.0 / 8
    out["weak"] = valid and block.max() < 0.15 * scale
    out["critical_key"] = valid and col.max() / nq > 1.5 / 8
    out["strong_self"] = valid and not cross and diag.mean() > 0.15 * scale
    return out


def check_against_reference(st: xr.Dataset, ds: xr.Dataset) -> None:
    st = st.compute()
    attention, lengths = ds.attention.values, ds.length.values
    for b in range(attention.shape[0]):
        n = int(lengths[b])
        for layer in range(attention.shape[1]):
            for head in range(attention.shape[2]):
                ref = reference_plane(attention[b, layer, head], n)
                got = st.isel(batch=b, layer=layer, head=head)
                for name in ("row_sum", "entropy", "max_weight", "distance"):
                    values = got[name].values
                    np.testing.assert_allclose(values[: len(ref[name])], ref[name], rtol=1e-6, atol=1e-7, err_msg=name)
                    assert np.isnan(values[len(ref[name]) :]).all()
                np.testing.assert_allclose(got.col_sum.values[: len(ref["col_sum"])], ref["col_sum"], rtol=1e-6)
                for name in ("entropy_mean", "entropy_norm", "self_attention", "diag_share", "peak_incoming",
                             "confidence", "distance_mean"):
                    np.testing.assert_allclose(float(got[name]), ref[name], rtol=1e-6, atol=1e-7, err_msg=name)
                np.testing.assert_allclose(float(got.row_sum_error), ref["row_sum_error"], atol=2e-7)
                assert int(got.peak_key) == ref["peak_key"]
                for flag in FLAGS:
                    assert bool(got[flag]) == ref[flag], (flag, b, layer, head)


@pytest.fixture(scope="module")
def samples_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "s.zarr"
    assert ingest([SAMPLES], path).ok
    return path


def test_real_samples_match_the_reference(samples_store):
    ds = fastattn.open_store(samples_store)
    check_against_reference(fastattn.compute_stats(ds), ds)


def test_random_ragged_and_length_one(tmp_path, rng):
    batched_dump(rng, tmp_path / "d" / "a.npz", [1, 7, 12, 3], layers=2, heads=3)
    batched_dump(rng, tmp_path / "d" / "b.npz", [12, 2], layers=2, heads=3)
    ingest([tmp_path / "d"], tmp_path / "s.zarr")
    ds = fastattn.open_store(tmp_path / "s.zarr")
    st = fastattn.compute_stats(ds).compute()
    check_against_reference(st, ds)
    assert np.isnan(st.entropy_norm.values[0]).all()  # length 1: ln(1) = 0, undefined
    assert not st[list(FLAGS)].isel(batch=0).to_array().values.any()


def test_cross_attention_has_no_diagonal(tmp_path, rng):
    write_dump(tmp_path / "d" / "a.npz", softmax_rows(rng, (2, 3, 4, 9)))
    ingest([tmp_path / "d"], tmp_path / "s.zarr")
    ds = fastattn.open_store(tmp_path / "s.zarr")
    st = fastattn.compute_stats(ds).compute()
    check_against_reference(st, ds)
    assert np.isnan(st.self_attention.values).all() and not st.strong_self.values.any()


def test_flags_give_the_seed_numbers_at_eight_tokens():
    """At 8 tokens each rescaled rule is exactly the seed's: check both sides of each threshold."""

    def flags_of(plane):
        da = xr.DataArray(plane[None].astype(np.float32), dims=("batch", "query", "key"))
        return {f: bool(v) for f, v in fastattn.compute_stats(da).isel(batch=0)[list(FLAGS)].compute().items()}

    uniform = np.full((8, 8), 1 / 8)
    assert flags_of(uniform)["uniform"] and flags_of(uniform)["weak"]
    peaked = uniform.copy()
    peaked[:, 0] += 0.04
    peaked[:, 1:] -= 0.04 / 7
    assert not flags_of(peaked)["uniform"] and not flags_of(peaked)["weak"]  # max 0.165 > 0.15
    diagonal = np.eye(8) * 0.85 + (1 - np.eye(8)) * 0.15 / 7
    assert flags_of(diagonal)["diagonal_only"] and flags_of(diagonal)["strong_self"]
    key = np.full((8, 8), 0.6 / 7)
    key[:, 3] = 0.4  # key 3 receives 3.2 of 8: dominant (> 3.0) and critical (> 1.5)
    got = flags_of(key)
    assert got["dominant_key"] and got["critical_key"]
    key[:, 3] = 0.2
    key[:, [0, 1, 2, 4, 5, 6, 7]] = 0.8 / 7  # key 3 receives 1.6: critical only
    got = flags_of(key)
    assert got["critical_key"] and not got["dominant_key"]


def test_same_results_with_any_threads_and_scheduler(samples_store):
    ds = fastattn.open_store(samples_store)
    results = []
    for scheduler, threads in (("threads", 2), ("threads", 1), ("synchronous", 1)):
        numba.set_num_threads(threads)
        with dask.config.set(scheduler=scheduler, num_workers=threads):
            results.append(fastattn.compute_stats(ds).compute())
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    in_memory = fastattn.compute_stats(ds.compute())  # the parallel Numba path, no dask
    for other in results[1:] + [in_memory]:
        xr.testing.assert_identical(results[0], other)


@pytest.fixture(params=["one block", "many blocks"])
def blocks(request, monkeypatch):
    """write_stats on one block, or on blocks of 2 store chunks of 2 batches (appends land mid-chunk)."""
    if request.param == "many blocks":
        monkeypatch.setattr(store, "CHUNK_BYTES", 2000)  # 3 heads x 9 x 9 float32: 2 batches a chunk
        monkeypatch.setattr(stats, "BLOCK_BYTES", 8000)  # x 2 layers: 2 chunks a block
    return request.param


def test_write_stats_is_incremental(tmp_path, rng, blocks):
    folder = tmp_path / "d"
    for i in range(3):
        batched_dump(rng, folder / f"a{i}.npz", [9, 6], layers=2, heads=3, size=9)
    target = tmp_path / "s.zarr"
    ingest([folder], target)
    assert fastattn.write_stats(target) == {"computed": 6, "total": 6}
    first = fastattn.open_stats(target).compute()
    assert fastattn.write_stats(target) == {"computed": 0, "total": 6}
    batched_dump(rng, folder / "a3.npz", [8, 9, 4], layers=2, heads=3, size=9)
    ingest([folder], target)
    seen = []
    assert fastattn.write_stats(target, progress=lambda done, total: seen.append((done, total))) == {"computed": 3, "total": 9}
    assert seen == ([(2, 3), (3, 3)] if blocks == "many blocks" else [(3, 3)])  # blocks [6, 8) and [8, 9)
    st = fastattn.open_stats(target).compute()
    xr.testing.assert_equal(st.isel(batch=slice(0, 6)), first)
    check_against_reference(st, fastattn.open_store(target))
    assert fastattn.write_stats(target, k=3) == {"computed": 9, "total": 9}  # another k: all again
    assert fastattn.open_stats(target).sizes["rank"] == 3


def test_longer_sequences_lay_statistics_out_again(tmp_path, rng):
    batched_dump(rng, tmp_path / "d" / "a.npz", [5, 4], layers=1, heads=2)
    ingest([tmp_path / "d"], tmp_path / "s.zarr")
    fastattn.write_stats(tmp_path / "s.zarr")
    batched_dump(rng, tmp_path / "d" / "b.npz", [11], layers=1, heads=2)
    ingest([tmp_path / "d"], tmp_path / "s.zarr")
    assert fastattn.write_stats(tmp_path / "s.zarr") == {"computed": 3, "total": 3}
    check_against_reference(fastattn.open_stats(tmp_path / "s.zarr"), fastattn.open_store(tmp_path / "s.zarr"))


def test_accessor_on_a_plain_dataarray(rng):
    a = softmax_rows(rng, (3, 2, 6, 6))
    da = xr.DataArray(a, dims=("batch", "head", "query", "key"))
    ref = [[reference_plane(a[b, h], 6) for h in range(2)] for b in range(3)]
    np.testing.assert_allclose(da.attn.entropy().values, [[r["entropy"] for r in row] for row in ref], rtol=1e-6)
    np.testing.assert_allclose(da.attn.incoming().values, [[r["col_sum"] for r in row] for row in ref], rtol=1e-6)
    np.testing.assert_allclose(da.attn.self_attention().values, [[r["self_attention"] for r in row] for row in ref],
                               rtol=1e-6)
    top = da.chunk({"batch": 1}).attn.topk(2)
    assert top.topk_index.chunks is not None  # lazy on dask
    expected = np.argsort(-a, axis=-1, kind="stable")[..., :2]
    np.testing.assert_array_equal(top.topk_index.values, expected)
    assert set(FLAGS) <= set(da.attn.stats())


def test_stats_cli_table_json_csv(samples_store, tmp_path):
    target = tmp_path / "s.zarr"
    shutil.copytree(samples_store, target)
    runner = CliRunner()
    table = runner.invoke(app, ["stats", str(target)])
    assert table.exit_code == 0, table.output
    assert "11 batches computed now" in table.stderr and "peak key" in table.stdout
    assert "of batches" in table.stdout  # findings in plain words
    again = runner.invoke(app, ["stats", str(target), "--format", "json", "--layer", "5"])
    body = json.loads(again.stdout)
    assert body["computed"] == 0 and len(body["heads"]) == 12 and {r["layer"] for r in body["heads"]} == {5}
    csv = runner.invoke(app, ["stats", str(target), "--format", "csv", "--head", "0"])
    lines = csv.stdout.strip().splitlines()
    assert lines[0].startswith("layer,head,entropy_mean") and len(lines) == 1 + 6
    bad = runner.invoke(app, ["stats", str(tmp_path / "nothing.zarr")])
    assert bad.exit_code == 1 and bad.stderr.startswith("error: ") and "no such store" in bad.stderr
