"""Scale-out: the same ingest and statistics on a dask cluster and in S3-compatible storage."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import SAMPLES, assert_same_store, store_snapshot
from click.testing import CliRunner

from fastattn import store, synth
from fastattn.errors import StoreError
from fastattn.ingest import ingest

distributed = pytest.importorskip("distributed")
pytest.importorskip("boto3")
pytest.importorskip("s3fs")
pytest.importorskip("moto")


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("local") / "s.zarr"
    assert ingest([SAMPLES], path).ok
    return path


@pytest.fixture(scope="module")
def client():
    from fastattn import cluster

    with cluster.connect(workers=2) as c:
        yield c


def test_compute_stats_on_a_cluster_reads_the_chunk_files(client, local_store, monkeypatch):
    """The tasks that read a local store's chunk files themselves travel to worker processes
    (pickled, they open the array again there): the statistics zarr's reads give here."""
    import xarray as xr

    import fastattn
    from fastattn import stats

    ds = fastattn.open_store(local_store)
    lazy = fastattn.compute_stats(ds)
    assert ds.attention.data.name not in lazy.entropy.data.__dask_graph__().layers  # the chunk files' tasks
    on_cluster = client.compute(lazy).result()
    monkeypatch.setattr(stats, "_chunk_files", lambda attention: None)
    xr.testing.assert_identical(on_cluster, fastattn.compute_stats(ds).compute(scheduler="threads"))


def _remote_snapshot(url, options) -> dict:
    ds = store.open_store(url, storage_options=options).compute()
    return {"attention": ds.attention.values, "length": ds.length.values, "source": ds.source.values.tolist()}


def test_ingest_into_s3_equals_local(s3, local_store):
    url = "s3://attn/runs/s.zarr"
    report = ingest([SAMPLES], url, storage_options=s3)
    assert report.ok and report.committed == 11
    got, want = _remote_snapshot(url, s3), store_snapshot(local_store)
    np.testing.assert_array_equal(got["attention"], want["attention"])
    np.testing.assert_array_equal(got["length"], want["length"])
    assert got["source"] == want["source"]
    assert ingest([SAMPLES], url, storage_options=s3).batches_added == 0


def test_s3_errors_are_one_line(s3):
    with pytest.raises(StoreError, match="the bucket 'missing' does not exist"):
        ingest([SAMPLES], "s3://missing/s.zarr", storage_options=s3)
    with pytest.raises(StoreError, match="access denied .*check the credentials"):
        ingest([SAMPLES], "s3://attn/x.zarr", storage_options={**s3, "secret": "wrong"})


def test_cli_s3_with_storage_options(s3, tmp_path):
    from fastattn_cli.main import app

    args = ["ingest", str(SAMPLES / "fixed"), "s3://attn/cli.zarr"]
    args += [f"--storage-option={k}={v}" for k, v in s3.items()]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(app, ["ingest", str(SAMPLES / "fixed"), "s3://attn/cli.zarr",
                                   f"--storage-option=endpoint_url={s3['endpoint_url']}",
                                   "--storage-option=key=nobody", "--storage-option=secret=wrong"])
    assert bad.exit_code == 1 and bad.stderr.startswith("error: s3://attn/cli.zarr: access denied")
    assert "Traceback" not in bad.output


def test_distributed_ingest_equals_local(client, local_store, tmp_path):
    target = tmp_path / "d.zarr"
    report = ingest([SAMPLES], target, client=client)
    assert report.ok
    assert_same_store(target, local_store)


def test_distributed_ingest_into_s3(client, s3, local_store):
    url = "s3://attn/dist.zarr"
    assert ingest([SAMPLES], url, storage_options=s3, client=client).ok
    got, want = _remote_snapshot(url, s3), store_snapshot(local_store)
    np.testing.assert_array_equal(got["attention"], want["attention"])


def test_losing_a_worker_mid_ingest(tmp_path):
    """Kill one worker process while chunks are being written: dask retries its tasks
    elsewhere, and the store equals a clean local ingest."""
    from distributed import Client, LocalCluster

    dumps = tmp_path / "dumps"
    synth.synthesize(dumps, files=300, layers=2, heads=12, seq=64, seed=5)
    clean = tmp_path / "clean.zarr"
    ingest([dumps], clean)
    target = tmp_path / "t.zarr"
    killed = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        pids = list(c.run(os.getpid).values())

        def kill_one():
            time.sleep(0.5)
            os.kill(pids[0], signal.SIGKILL)
            killed.append(time.perf_counter())

        killer = threading.Thread(target=kill_one)
        started = time.perf_counter()
        killer.start()
        report = ingest([dumps], target, client=c)
        ended = time.perf_counter()
        killer.join()
    assert started < killed[0] < ended, "the worker must die while the ingest runs"
    assert report.ok
    assert_same_store(target, clean)
