"""SIGKILL an ingest at chosen and at random moments; re-running must give the clean store."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_store, store_snapshot
from forkserver import ForkServer

from fastattn import store, synth
from fastattn.ingest import ingest

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Ragged batched dumps over several chunks, and the snapshot of the store a clean ingest
    makes (taken once: every test compares with it)."""
    root = tmp_path_factory.mktemp("crash")
    synth.synthesize(root / "dumps", files=60, layers=2, heads=12, seq="40-64", batch=2, seed=3)
    clean = root / "clean.zarr"
    assert ingest([root / "dumps"], clean).ok
    chunk = store.read_manifest(store.Location(clean)).batch_chunk
    assert 120 // chunk >= 5, "the corpus must span several chunks"
    return root, store_snapshot(clean)


@pytest.fixture(scope="module")
def kill(tmp_path_factory):
    """`kill(point, n, dumps, target)`: the signal that ended an ingest of `dumps` into `target`,
    in a child of the fork server (tests/forkserver.py) that SIGKILLs itself at the nth call of
    `point`: "chunk_after" a chunk written, "resize", "manifest", "consolidate"."""
    server = ForkServer(tmp_path_factory.mktemp("server"), store.schema.CHUNK_BYTES)

    def run(point: str, n: int, dumps: Path, target: Path) -> int | None:
        return server.run("ingest", dumps, target, point=point, n=n).get("signal")

    try:
        yield run
    finally:
        server.close()


def _check_committed_prefix(target: Path, want: dict) -> None:
    """After a kill the store opens at a commit: what it shows is a prefix of the clean store
    (`want`, its snapshot)."""
    if not (target / store.MANIFEST).exists():
        return
    got = store_snapshot(target)
    n = got["committed"]
    size = got["attention"].shape[-1]
    np.testing.assert_array_equal(got["attention"], want["attention"][:n, ..., :size, :size])
    assert got["source"] == want["source"][:n]


KILL_POINTS = [("chunk_after", 1), ("chunk_after", 3), ("chunk_after", 5), ("resize", 1), ("manifest", 1), ("consolidate", 1)]


@pytest.mark.parametrize("point,n", KILL_POINTS)
def test_kill_at_a_point_then_rerun(point, n, corpus, kill, tmp_path):
    root, want = corpus
    target = tmp_path / "s.zarr"
    assert kill(point, n, root / "dumps", target) == signal.SIGKILL
    _check_committed_prefix(target, want)
    assert ingest([root / "dumps"], target).ok
    assert_same_store(target, want)


def test_kill_while_appending_keeps_the_committed_batches(corpus, kill, tmp_path):
    """The chunk shared by committed and new batches is rewritten whole; a kill mid-way
    must leave the committed half as it was, and the re-run must equal a one-shot ingest."""
    root, _ = corpus
    folder = tmp_path / "d"
    folder.mkdir()
    paths = sorted((root / "dumps").glob("*.npz"))
    for path in paths[:25]:
        shutil.copy(path, folder / path.name)
    target = tmp_path / "s.zarr"
    ingest([folder], target)
    before = store_snapshot(target)
    for path in paths[25:]:
        shutil.copy(path, folder / path.name)
    for point, n in [("chunk_after", 1), ("chunk_after", 2), ("manifest", 1)]:
        assert kill(point, n, folder, target) == signal.SIGKILL
        now = store_snapshot(target)
        assert now["committed"] == before["committed"]
        np.testing.assert_array_equal(now["attention"], before["attention"])
    assert ingest([folder], target).ok
    once = tmp_path / "once.zarr"
    ingest([folder], once)
    assert_same_store(target, once)


def test_kill_at_random_moments(corpus, tmp_path):
    """SIGKILL the CLI at random times during a run; each re-run completes to the clean store."""
    root, want = corpus
    fastattn = Path(sys.executable).with_name("fastattn")
    target = tmp_path / "s.zarr"
    started = time.perf_counter()
    subprocess.run([fastattn, "ingest", root / "dumps", tmp_path / "timing.zarr"], check=True, capture_output=True)
    duration = time.perf_counter() - started
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    delays = sorted(rng.uniform(0.0, duration) for _ in range(6))
    for delay in delays:
        shutil.rmtree(target, ignore_errors=True)
        child = subprocess.Popen([fastattn, "ingest", root / "dumps", target], stderr=subprocess.DEVNULL)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        _check_committed_prefix(target, want)
        assert ingest([root / "dumps"], target).ok, f"re-run after a kill at {delay:.2f}s"
        assert_same_store(target, want)
