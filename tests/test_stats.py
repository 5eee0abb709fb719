"""Statistics of a store against a plain float64 numpy reference; incremental runs; the CLI."""

from __future__ import annotations

import json
import shutil

import dask
import numba
import numpy as np
import pytest
import xarray as xr
import zarr
from benchmarks import reference as ref
from conftest import SAMPLES, batched_dump, softmax_rows, write_dump
from click.testing import CliRunner

import fastattn
from fastattn import stats, store, summary
from fastattn.check import store_problems
from fastattn.ingest import ingest
from fastattn_cli.main import app

FLAGS = stats.FLAGS


def reference_plane(a: np.ndarray, n: int) -> dict:
    """Every statistic of one plane, written plainly in float64 from the valid block."""
    q_size, k_size = a.shape
    nq, nk = ref.valid_block(q_size, k_size, n)
    block = a[:nq, :nk].astype(np.float64)
    logs = np.log(np.where(block > 0, block, 1.0))
    out = {
        "row_sum": block.sum(axis=1),
        "entropy": -(block * logs).sum(axis=1),
        "max_weight": block.max(axis=1),
        "distance": (block * np.abs(np.arange(nq)[:, None] - np.arange(nk)[None, :])).sum(axis=1),
        "col_sum": block.sum(axis=0),
    }
    out.update(ref.plane_summary(block, min(n, max(q_size, k_size)), q_size == k_size))
    return out


def check_against_reference(st: xr.Dataset, ds: xr.Dataset) -> None:
    """Per-query values are float32 (rtol 1e-6); per-plane ones float64, exact sums but for the
    entropy's float32 log (a float32 weight is only known to 6e-8 anyway)."""
    st = st.compute()
    attention, lengths = ds.attention.values, ds.length.values
    for b in range(attention.shape[0]):
        n = int(lengths[b])
        for layer in range(attention.shape[1]):
            for head in range(attention.shape[2]):
                want = reference_plane(attention[b, layer, head], n)
                got = st.isel(batch=b, layer=layer, head=head)
                for name in ("row_sum", "entropy", "max_weight", "distance"):
                    values = got[name].values
                    np.testing.assert_allclose(values[: len(want[name])], want[name], rtol=1e-6, atol=1e-7, err_msg=name)
                    assert np.isnan(values[len(want[name]) :]).all()
                np.testing.assert_allclose(got.col_sum.values[: len(want["col_sum"])], want["col_sum"], rtol=1e-6)
                for name in ("entropy_mean", "entropy_norm"):
                    np.testing.assert_allclose(float(got[name]), want[name], rtol=1e-6, err_msg=name)
                for name in ("self_attention", "diag_share", "peak_incoming", "confidence", "distance_mean",
                             "prev_token", "next_token", "first_token", "last_token"):
                    np.testing.assert_allclose(float(got[name]), want[name], rtol=1e-12, atol=1e-15, err_msg=name)
                np.testing.assert_allclose(float(got.row_sum_error), want["row_sum_error"], atol=1e-12)
                assert int(got.peak_key) == want["peak_key"]
                for flag in FLAGS:
                    assert bool(got[flag]) == want[flag], (flag, b, layer, head)


@pytest.fixture(scope="module")
def samples_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "s.zarr"
    assert ingest([SAMPLES], path).ok
    return path


def test_real_samples_match_the_reference(samples_store):
    ds = fastattn.open_store(samples_store)
    check_against_reference(fastattn.compute_stats(ds), ds)


def test_the_codecs_and_chunk_files_of_a_store(samples_store, tmp_path):
    """The attention without byte shuffle, every other array with it (`store.compressors`); the
    chunks of every array, the store's and the statistics', are files beside its zarr.json
    (`c.0.0.0`, `store.CHUNK_KEYS`), no folders, and xarray reads them through zarr (the values
    against the reference in the tests above)."""
    path = tmp_path / "s.zarr"
    shutil.copytree(samples_store, path)
    fastattn.write_stats(path)
    group = zarr.open_group(str(path), mode="r")
    for name, array in group.arrays():
        shuffle = next(c for c in array.metadata.codecs if type(c).__name__ == "BloscCodec").shuffle.value
        assert shuffle == ("noshuffle" if name == "attention" else "shuffle"), name
    arrays = [path / a.path for g in (group, group["stats"]) for _, a in g.arrays()]
    assert len(arrays) > 40 and path / "attention" in arrays and path / "stats" / "entropy" in arrays
    for folder in arrays:
        names = sorted(p.name for p in folder.iterdir())
        assert names[-1] == "zarr.json" and all(n.startswith("c.") for n in names[:-1]), (folder, names)
        assert len(names) > 1 or folder.name in ("input_id", "token"), folder  # all padding: no chunk written
    assert xr.open_zarr(path, group="stats", consolidated=False).entropy_mean.notnull().all()


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


def test_the_notebook_path_is_the_command(samples_store, tmp_path, monkeypatch):
    """compute_stats on a store (lazy, dask), on it in memory, and write_stats give the same
    statistics, bit for bit, with one block or many."""
    target = tmp_path / "s.zarr"
    shutil.copytree(samples_store, target)
    ds = fastattn.open_store(target)
    lazy = fastattn.compute_stats(ds)
    assert lazy.entropy.chunks is not None and set(lazy.data_vars) >= {"prev_token", "next_token", "first_token", "last_token"}
    lazy = lazy.compute()
    check_against_reference(lazy, ds)
    xr.testing.assert_identical(lazy, fastattn.compute_stats(ds.compute()))
    fastattn.write_stats(target)
    stored = fastattn.open_stats(target).compute()
    stored.attrs = {}
    xr.testing.assert_identical(stored, lazy)
    monkeypatch.setattr(stats, "BLOCK_BYTES", ds.attention.nbytes // 5)  # several blocks, several tasks
    many = fastattn.compute_stats(ds.chunk({"batch": 2, "layer": 1}))
    assert many.entropy.chunks[:2] == ((2, 2, 2, 2, 2, 1), (6,))
    xr.testing.assert_identical(many.compute(), lazy)


def through_zarr(ds: xr.Dataset, monkeypatch) -> xr.Dataset:
    """compute_stats (lazy) as on any dask array: zarr reads and decodes the chunks."""
    with monkeypatch.context() as m:
        m.setattr(stats, "_chunk_files", lambda attention: None)
        return fastattn.compute_stats(ds)


def counted_reads(monkeypatch) -> list:
    """Every chunk `WholeChunks.read` decodes, by position; zarr's reads of the attention then fail."""
    from zarr.core.array import AsyncArray

    calls, read, select = [], store.WholeChunks.read, AsyncArray._get_selection

    def counting(self, coords):
        calls.append(coords)
        return read(self, coords)

    async def refused(self, *args, **kwargs):
        if self.path == "attention":
            raise AssertionError("zarr read the attention")
        return await select(self, *args, **kwargs)

    monkeypatch.setattr(store.WholeChunks, "read", counting)
    monkeypatch.setattr(AsyncArray, "_get_selection", refused)
    return calls


@pytest.fixture(params=["ids, batches split", "no ids, heads split", "real samples"])
def chunked_store(request, tmp_path, rng, monkeypatch, samples_store):
    """A store whose last chunk is partly committed: ragged random samples (lengths below the
    padded size) with token ids in chunks of 2 batches, or without ids in chunks of 2 of 3 heads
    (partial head chunks too); or the MiniLM samples as ingested."""
    if request.param == "real samples":
        return samples_store
    folder = tmp_path / "d"
    if request.param.startswith("ids"):
        monkeypatch.setattr(store.schema, "CHUNK_BYTES", 3 * 11 * 11 * 4 * 2)  # 2 batches a chunk
        for i, lengths in enumerate(([3, 10, 7], [5, 9], [2, 11, 4, 8])):
            n = len(lengths)
            ids = rng.integers(0, 5, size=(n, 11))
            mask = (np.arange(11) < np.array(lengths)[:, None]).astype(np.int8)
            att = np.zeros((2, n, 3, 11, 11), np.float32)
            for b, m in enumerate(lengths):
                att[:, b, :, :, :m] = softmax_rows(rng, (2, 3, 11, m))
            write_dump(folder / f"{i}.npz", att, attention_mask=mask, input_ids=ids)
    else:
        monkeypatch.setattr(store.schema, "CHUNK_BYTES", 12 * 12 * 4 * 2)  # a plane of 12 x 12 float32, 2 heads a chunk
        batched_dump(rng, folder / "a.npz", [12, 4, 9, 11, 1], layers=2, heads=3, size=12)
    assert ingest([folder], tmp_path / "ragged.zarr").ok
    return tmp_path / "ragged.zarr"


def test_compute_stats_reads_the_store_chunk_files_itself(chunked_store, monkeypatch):
    """On open_store's Dataset of a local store the tasks decode the chunk files themselves
    (every chunk once, zarr none): the same statistics, bit for bit, as through zarr, with one
    block or several, with and without token ids, on a partly committed last chunk."""
    ds = fastattn.open_store(chunked_store)
    steps = store.open_group(store.as_location(chunked_store), "r")["attention"].chunks
    files = -(-ds.sizes["batch"] // steps[0]) * -(-ds.sizes["layer"] // steps[1]) * -(-ds.sizes["head"] // steps[2])
    partial = [n % step for n, step in zip(ds.attention.shape, steps)]
    assert steps[-2:] == ds.attention.shape[-2:] and (any(partial) or chunked_store.name != "ragged.zarr")  # partly covered chunks
    for block in (stats.BLOCK_BYTES, ds.attention.nbytes // 3):  # one block; several, of several chunks
        monkeypatch.setattr(stats, "BLOCK_BYTES", block)
        want, lazy = through_zarr(ds, monkeypatch), fastattn.compute_stats(ds)
        layout = lambda st: {n: (v.dims, v.chunks, v.dtype) for n, v in st.variables.items()}  # noqa: E731
        assert layout(lazy) == layout(want)
        assert ds.attention.data.name in want.entropy.data.__dask_graph__().layers
        assert ds.attention.data.name not in lazy.entropy.data.__dask_graph__().layers  # no zarr read of the attention
        with monkeypatch.context() as m:
            calls = counted_reads(m)
            got = lazy.compute()
        assert len(calls) == len(set(calls)) == files
        want = want.compute()
        xr.testing.assert_identical(got, want)
    check_against_reference(want, ds)
    ids = "input_id" in ds and (ds.input_id.values >= 0).any()
    assert np.isfinite(want.induction.values).any() == ids and np.isfinite(want.duplicate_token.values).any() == ids
    with monkeypatch.context() as m:  # the attention alone: whole planes valid, still from the files
        calls = counted_reads(m)
        got = fastattn.compute_stats(ds.attention).compute()
    assert len(calls) == files
    xr.testing.assert_identical(got, through_zarr(ds.attention, monkeypatch).compute())


def test_compute_stats_reads_through_zarr_what_is_not_open_stores_array(samples_store, monkeypatch):
    """A slice, a rechunk, a computed array, a store whose codecs `WholeChunks.read` does not
    decode, or chunks that split planes: zarr reads them, with the same results."""
    ds = fastattn.open_store(samples_store)
    assert stats._chunk_files(ds.attention) is not None
    for other in (ds.isel(batch=slice(1, None)), ds.isel(head=[0, 2]), ds.chunk({"batch": 1}), ds.attention * 1):
        assert stats._chunk_files(other if isinstance(other, xr.DataArray) else other.attention) is None
    part = ds.isel(batch=slice(1, None))
    xr.testing.assert_identical(fastattn.compute_stats(part).compute(), fastattn.compute_stats(ds).compute().isel(batch=slice(1, None)))
    with monkeypatch.context() as m:
        m.setattr(store.WholeChunks, "decodes_here", lambda self: False)
        assert stats._chunk_files(ds.attention) is None
    encoding = dict(ds.attention.encoding)
    ds.attention.encoding.pop(store.read.FILES_KEY)  # as from a remote store: no folder
    assert stats._chunk_files(ds.attention) is None
    ds.attention.encoding.update(encoding)
    zgroup = store.open_group(store.as_location(samples_store), "r")
    with monkeypatch.context() as m:  # chunks of part of the queries
        chunks = zgroup["attention"].chunks
        m.setattr(type(zgroup["attention"]), "chunks", property(lambda self: chunks[:-2] + (1, chunks[-1])))
        assert stats._chunk_files(ds.attention) is None


def test_the_chunk_files_travel_to_a_worker(samples_store):
    """Pickled (a distributed worker), the reader keeps the folder and opens the array again."""
    import pickle

    files = stats._chunk_files(fastattn.open_store(samples_store).attention)
    again = pickle.loads(pickle.dumps(files))
    assert again.root == files.root and again.reader is None
    np.testing.assert_array_equal(again.read((0, 1, 0, 0, 0)), files.read((0, 1, 0, 0, 0)).copy())


def test_lazy_stats_on_any_chunking(rng):
    """A DataArray chunked along several leading dims (and query/key, which are joined) gives
    the in-memory result; blocks of whole chunks, tiling it."""
    a = softmax_rows(rng, (4, 3, 5, 9, 9))
    a[1, :, :, 6:, :] = np.nan  # a shorter sample: its padding is never read
    a[1, :, :, :, 6:] = np.nan
    da = xr.DataArray(a, dims=("batch", "head", "layer", "query", "key"), coords={"batch": [10, 11, 12, 13]})
    ds = xr.Dataset({"attention": da, "length": ("batch", np.array([9, 6, 9, 9]))})
    want = fastattn.compute_stats(ds)
    for chunks in ({"batch": 1}, {"batch": 3, "head": 2, "layer": 4}, {"head": 1, "query": 4, "key": 5}):
        got = fastattn.compute_stats(ds.chunk(chunks))
        xr.testing.assert_identical(got.compute(), want)
    check_against_reference(want.transpose("batch", "layer", "head", ...), ds.transpose("batch", "layer", "head", ...))
    plane = da.isel(batch=0, head=0, layer=0)  # no leading dims at all
    xr.testing.assert_identical(fastattn.compute_stats(plane.chunk()).compute(), want.isel(batch=0, head=0, layer=0).drop_vars("length"))


def test_blocks_are_runs_of_whole_chunks(monkeypatch):
    monkeypatch.setattr(stats, "BLOCK_BYTES", 130)
    # planes of 10 bytes; heads (2 chunks of 2: 40 bytes) and layers (3 chunks: 120) whole; a batch a block
    assert stats._runs(((1, 1, 1, 1), (1, 1, 1), (2, 2)), 10) == [[(0, 1), (1, 2), (2, 3), (3, 4)], [(0, 3)], [(0, 2)]]
    # a chunk of 2 batches (240 bytes) is a block of its own, too big or not
    assert stats._runs(((1, 2, 1), (1, 1, 1), (2, 2)), 10)[0] == [(0, 1), (1, 2), (2, 3)]
    # 60 bytes a batch: two batch chunks a block
    assert stats._runs(((1, 1, 1, 1, 1), (3,), (2,)), 10)[0] == [(0, 2), (2, 4), (4, 5)]
    monkeypatch.setattr(stats, "BLOCK_BYTES", 100)
    # layers do not fit whole: cut there, batches keep their own chunks
    assert stats._runs(((1, 1), (1, 1, 1), (2, 2)), 10) == [[(0, 1), (1, 2)], [(0, 2), (2, 3)], [(0, 2)]]
    # heads alone exceed a block: cut there
    assert stats._runs(((2,), (3,), (6, 6, 6)), 10) == [[(0, 1)], [(0, 1)], [(0, 1), (1, 2), (2, 3)]]


@pytest.fixture(params=["one block", "many blocks"])
def blocks(request, monkeypatch):
    """write_stats on one block, or on blocks of 2 store chunks of 2 batches (appends land mid-chunk)."""
    if request.param == "many blocks":
        monkeypatch.setattr(store.schema, "CHUNK_BYTES", 2000)  # 3 heads x 9 x 9 float32: 2 batches a chunk
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


def test_statistics_in_folders_grow_in_folders(tmp_path, rng, monkeypatch):
    """A stats group written before its chunk keys became files (`c/0/0/0`, zarr's default)
    grows incrementally in its own keys: the new batches complete its chunk where its metadata
    says, every value is the reference's, and check passes."""
    folder = tmp_path / "d"
    for i in range(2):
        batched_dump(rng, folder / f"a{i}.npz", [9, 6], layers=2, heads=3, size=9)
    target = tmp_path / "s.zarr"
    ingest([folder], target)
    monkeypatch.setattr(store, "CHUNK_KEYS", {"name": "default", "separator": "/"})
    assert fastattn.write_stats(target) == {"computed": 4, "total": 4}
    monkeypatch.undo()
    batched_dump(rng, folder / "a2.npz", [8, 9, 4], layers=2, heads=3, size=9)
    ingest([folder], target)
    assert fastattn.write_stats(target) == {"computed": 3, "total": 7}
    entropy = zarr.open_group(str(target), mode="r")["stats/entropy"]
    assert entropy.metadata.chunk_key_encoding.separator == "/"
    chunks = sorted(p.relative_to(target / "stats" / "entropy").as_posix() for p in (target / "stats" / "entropy").rglob("*") if p.is_file())
    rows = -(-7 // entropy.chunks[0])
    assert chunks == sorted(["zarr.json", *(f"c/{i}/0/0/0" for i in range(rows))]), chunks
    check_against_reference(fastattn.open_stats(target).compute(), fastattn.open_store(target))
    assert store_problems(target) == []


def test_statistics_of_an_older_layout_are_computed_again(samples_store, tmp_path):
    """A stats group without this version's variables (or with other dtypes) is laid out again
    and recomputed, even when every batch has statistics."""
    target = tmp_path / "s.zarr"
    shutil.copytree(samples_store, target)
    assert fastattn.write_stats(target) == {"computed": 11, "total": 11}
    shutil.rmtree(target / "stats" / "prev_token")  # as written before prev_token existed
    with pytest.raises(fastattn.StoreError, match="lack prev_token .written by an older fastattn"):
        fastattn.open_stats(target)
    assert fastattn.write_stats(target) == {"computed": 11, "total": 11}
    assert fastattn.write_stats(target) == {"computed": 0, "total": 11}
    check_against_reference(fastattn.open_stats(target), fastattn.open_store(target))


def test_longer_sequences_lay_statistics_out_again(tmp_path, rng):
    batched_dump(rng, tmp_path / "d" / "a.npz", [5, 4], layers=1, heads=2)
    ingest([tmp_path / "d"], tmp_path / "s.zarr")
    fastattn.write_stats(tmp_path / "s.zarr")
    batched_dump(rng, tmp_path / "d" / "b.npz", [11], layers=1, heads=2)
    ingest([tmp_path / "d"], tmp_path / "s.zarr")
    assert fastattn.write_stats(tmp_path / "s.zarr") == {"computed": 3, "total": 3}
    check_against_reference(fastattn.open_stats(tmp_path / "s.zarr"), fastattn.open_store(tmp_path / "s.zarr"))


def xarray_layout(group, n: int, k: int, block: int) -> None:
    """The stats group as write_stats laid it out with xarray before: the Dataset of a sample
    block's statistics, as dask zeros of `n` batches, through `to_zarr(compute=False)`. The
    reference `stats._create_layout` (zarr alone) must match."""
    import dask.array as da

    sample = stats._block_stats(stats._read_block(group, 0, 1), k, parallel=True)
    length = sample.pop("length")
    coords = {dim: np.arange(size, dtype=np.int32) for dim, size in zip(store.DIMS[1:], group["attention"].shape[1:])}
    sample = stats._dataset(sample, store.DIMS[:3], k, coords).assign(length=("batch", length))
    layout = xr.Dataset(coords={"batch": np.arange(n, dtype=np.int32)})
    for name, var in sample.data_vars.items():
        layout[name] = (var.dims, da.zeros((n, *var.shape[1:]), chunks=(block, *var.shape[1:]), dtype=var.dtype))
    layout = layout.assign_coords({dim: sample[dim] for dim in sample.dims if dim != "batch"})
    encoding = {name: {"compressors": store.compressors(), "chunk_key_encoding": store.CHUNK_KEYS} for name in layout.variables}
    for name, var in layout.data_vars.items():
        encoding[name]["chunks"] = (block, *var.shape[1:])
    layout.to_zarr(group.store, group=stats.GROUP, mode="w", compute=False, consolidated=False, encoding=encoding)


def stats_files(path) -> dict:
    """Every file of a store's stats group: metadata parsed, chunks as bytes."""
    files = {}
    for p in sorted((path / "stats").rglob("*")):
        if p.is_file():
            files[str(p.relative_to(path))] = json.loads(p.read_text()) if p.name == "zarr.json" else p.read_bytes()
    return files


@pytest.mark.parametrize("kind", ["samples", "ragged, many blocks", "cross-attention"])
def test_the_layout_is_what_xarray_wrote(kind, samples_store, tmp_path, rng, monkeypatch, cli):
    """The stats group laid out with zarr alone equals, file for file, the one xarray laid out
    (dims, dtypes, chunks, fill values and their `_FillValue`, coordinates), also after it grew
    and was laid out again over itself; open_stats reads identical Datasets; check passes."""
    source = tmp_path / "source.zarr"
    if kind == "samples":
        shutil.copytree(samples_store, source)
    elif kind == "cross-attention":
        write_dump(tmp_path / "d" / "a.npz", softmax_rows(rng, (2, 3, 4, 9)))
        ingest([tmp_path / "d"], source)
    else:
        monkeypatch.setattr(store.schema, "CHUNK_BYTES", 2000)  # 3 heads x 9 x 9 float32: 2 batches a chunk
        monkeypatch.setattr(stats, "BLOCK_BYTES", 8000)  # x 2 layers: 2 chunks a block
        for i in range(3):
            batched_dump(rng, tmp_path / "d" / f"a{i}.npz", [1, 9, 6][i:] + [4], layers=2, heads=3, size=9)
        ingest([tmp_path / "d"], source)
    extra = tmp_path / "e" / "more.npz"  # appended after the first statistics: the group grows
    if kind == "cross-attention":
        write_dump(extra, softmax_rows(rng, (2, 3, 4, 9)))
    elif kind != "samples":
        batched_dump(rng, extra, [5, 2], layers=2, heads=3, size=9)
    stores = {}
    for name, layout in (("xarray", xarray_layout), ("zarr", stats._create_layout)):
        stores[name] = tmp_path / f"{name}.zarr"
        shutil.copytree(source, stores[name])
        with monkeypatch.context() as patch:
            patch.setattr(stats, "_create_layout", layout)
            assert fastattn.write_stats(stores[name], k=4)["computed"] > 0
            if extra.exists():
                ingest([extra.parent], stores[name])
                assert fastattn.write_stats(stores[name], k=4)["computed"] == (1 if kind == "cross-attention" else 2)
            done = fastattn.write_stats(stores[name], k=3)  # another k: laid out again over the old group
            assert done["computed"] == done["total"]
    old, new = stats_files(stores["xarray"]), stats_files(stores["zarr"])
    assert list(new) == list(old)
    for key in old:
        assert new[key] == old[key], key
    assert new["stats/entropy/zarr.json"]["attributes"] == {"_FillValue": "AAAAAAAA+H8="}  # NaN, as xarray writes it
    opened = {name: fastattn.open_stats(path) for name, path in stores.items()}
    for st in opened.values():
        st.attrs.pop("store")
    xr.testing.assert_identical(opened["zarr"].compute(), opened["xarray"].compute())
    check_against_reference(opened["zarr"], fastattn.open_store(stores["zarr"]))
    result = cli("check", stores["zarr"])
    assert result.exit_code == 0, result.output


def _same_table(got: dict, want: dict) -> None:
    """Two head tables (`summary._table`) equal name by name, flag by flag and row by row."""
    assert got.keys() == want.keys()
    for name in want:
        if isinstance(want[name], dict):
            assert got[name].keys() == want[name].keys()
            for flag in want[name]:
                np.testing.assert_array_equal(got[name][flag], want[name][flag], err_msg=f"{name} {flag}")
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert summary.head_rows(got) == summary.head_rows(want)


@pytest.mark.parametrize("lengths", [[[1, 7, 12, 3], [12, 2]], [[1, 1], [1]]])
def test_the_command_reads_head_table_with_zarr_alone(lengths, tmp_path, rng):
    """What `fastattn stats` prints (read with zarr and NumPy) is `head_table` of `open_stats`,
    number for number, NaN where a head has no defined value in any batch (length-1 samples)."""
    for i, batch in enumerate(lengths):
        batched_dump(rng, tmp_path / "d" / f"{i}.npz", batch, layers=2, heads=3)
    ingest([tmp_path / "d"], tmp_path / "s.zarr")
    fastattn.write_stats(tmp_path / "s.zarr")
    st = fastattn.open_stats(tmp_path / "s.zarr")
    for layer, head in ((None, None), ([1], None), (None, [2, 0]), ([0, 1], [1])):
        want = summary.head_table(st.isel(layer=layer or slice(None), head=head or slice(None)))
        got = summary.store_head_table(tmp_path / "s.zarr", layer=layer, head=head)
        _same_table(got, want)
    assert np.isnan(got["entropy_norm"]).any() == (max(map(max, lengths)) == 1)  # every batch length 1: NaN
    with pytest.raises(fastattn.FastattnError, match=r"^layer 2 out of range: the store has 2 layers \(0-1\)$"):
        summary.store_head_table(tmp_path / "s.zarr", layer=[2])
    with pytest.raises(fastattn.FastattnError, match=r"^head -1 out of range: the store has 3 heads \(0-2\)$"):
        summary.store_head_table(tmp_path / "s.zarr", head=[-1])


def test_the_table_of_a_run_that_computed_every_batch_is_the_stored_one(samples_store, tmp_path, rng):
    """`fastattn stats` makes its table from the per-plane arrays `write_stats` returns when it
    computed every batch: the table read back from the store, bit for bit, for any layers and
    heads (the real MiniLM samples: padded batches, NaN where a plane is empty; ragged random
    dumps with token ids, so the repeat scores hold numbers). An incremental run returns none."""
    batched_dump(rng, tmp_path / "r" / "a.npz", [1, 7, 12, 3], layers=2, heads=3)
    ids = rng.integers(0, 4, size=(2, 9))  # few ids: tokens repeat
    write_dump(tmp_path / "r" / "b.npz", softmax_rows(rng, (2, 2, 3, 9, 9)), attention_mask=np.ones((2, 9), np.int64), input_ids=ids)
    ingest([tmp_path / "r"], tmp_path / "r.zarr")
    shutil.copytree(samples_store, tmp_path / "m.zarr")
    for path in (tmp_path / "m.zarr", tmp_path / "r.zarr"):
        shutil.rmtree(path / "stats", ignore_errors=True)
        result = fastattn.write_stats(path, planes=summary.TABLE_PLANES)
        assert result["computed"] == result["total"] > 0 and set(result["planes"]) == set(summary.TABLE_PLANES)
        _, layers, heads = result["planes"]["peak_key"].shape
        for layer, head in ((None, None), ([layers - 1], None), (None, [heads - 1, 0]), ([0], [1])):
            _same_table(summary.computed_head_table(result["planes"], layer=layer, head=head),
                        summary.store_head_table(path, layer=layer, head=head))
        with pytest.raises(fastattn.FastattnError, match=rf"^layer {layers} out of range: the store has {layers} layers"):
            summary.computed_head_table(result["planes"], layer=[layers])
    assert np.isfinite(result["planes"]["induction"]).any()  # the ragged store's ids repeat
    write_dump(tmp_path / "r2" / "c.npz", softmax_rows(rng, (2, 1, 3, 9, 9)))
    ingest([tmp_path / "r2"], tmp_path / "r.zarr")
    with pytest.raises(ValueError, match="^planes: entropy, nope not among the per-plane statistics$"):
        fastattn.write_stats(tmp_path / "r.zarr", planes=["peak_key", "entropy", "nope"])  # entropy: per query
    again = fastattn.write_stats(tmp_path / "r.zarr", planes=summary.TABLE_PLANES)
    assert (again["computed"], again["total"]) == (1, 7) and "planes" not in again  # the table reads the store


def test_the_command_on_a_remote_store(samples_store, tmp_path):
    """A store behind an fsspec URL goes the same zarr path: laid out, computed and summarised
    as the local copy is, number for number."""
    import fsspec

    local = tmp_path / "s.zarr"
    shutil.copytree(samples_store, local)
    memory = fsspec.filesystem("memory")
    memory.put(str(local), "/stats-remote/s.zarr", recursive=True)
    runner = CliRunner()
    try:
        remote = runner.invoke(app, ["stats", "memory://stats-remote/s.zarr", "--format", "json", "--head", "3"])
        assert remote.exit_code == 0, remote.output
        here = runner.invoke(app, ["stats", str(local), "--format", "json", "--head", "3"])
        assert json.loads(remote.stdout) == json.loads(here.stdout)
        assert json.loads(remote.stdout)["computed"] == 11
        got = fastattn.open_stats("memory://stats-remote/s.zarr").compute()
    finally:
        memory.rm("/stats-remote", recursive=True)
    want = fastattn.open_stats(local).compute()
    got.attrs, want.attrs = {}, {}
    xr.testing.assert_identical(got, want)


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
    found = summary.findings(summary.store_head_table(target))  # checked in tests/test_findings.py
    assert found and all(summary.finding_line(f) + "\n" in table.stdout for f in found)  # one line each
    again = runner.invoke(app, ["stats", str(target), "--format", "json", "--layer", "5"])
    body = json.loads(again.stdout)
    assert body["computed"] == 0 and len(body["heads"]) == 12 and {r["layer"] for r in body["heads"]} == {5}
    csv = runner.invoke(app, ["stats", str(target), "--format", "csv", "--head", "0"])
    lines = csv.stdout.strip().splitlines()
    assert lines[0].startswith("layer,head,entropy_mean") and len(lines) == 1 + 6
    bad = runner.invoke(app, ["stats", str(tmp_path / "nothing.zarr")])
    assert bad.exit_code == 1 and bad.stderr.startswith("error: ") and "no such store" in bad.stderr
