"""`_jit.parallel_for`: how parallel kernel calls use threads (one compiled kernel, Python threads).

The kernel here is often a Python function that records which indices it was given and in which
thread: parallel_for only calls it, so the split itself is what is tested, with no compiling."""

from __future__ import annotations

import os
import threading
import time

import numba
import numpy as np
import pytest
import xarray as xr

import fastattn
from fastattn import stats as store_stats
from fastattn.ingest import ingest
from fastattn.kernels import _jit, attention_stats, topk
from conftest import SAMPLES, softmax_rows

CORES = numba.config.NUMBA_NUM_THREADS


class Recorder:
    """A stand-in kernel: records (lo, hi, thread) per call; sleeps so that threads overlap."""

    def __init__(self, pause: float = 0.01, fail_at: int | None = None):
        self.calls: list[tuple[int, int, str]] = []
        self.lock = threading.Lock()
        self.pause, self.fail_at = pause, fail_at

    def __call__(self, lo, hi, out):
        with self.lock:
            self.calls.append((lo, hi, threading.current_thread().name))
        time.sleep(self.pause)
        if self.fail_at is not None and lo <= self.fail_at < hi:
            raise ValueError(f"index {self.fail_at}")
        out[lo:hi] += 1

    def threads(self) -> set[str]:
        return {name for _, _, name in self.calls}


def pieces_for(n: int) -> int:
    """How many pieces a parallel call over n indices is cut into with all cores."""
    threads = min(CORES, n)
    return 1 if threads <= 1 else min(n, 4 * threads)


def covered_once(calls, n: int) -> bool:
    """The pieces tile [0, n): each index in exactly one piece, every piece contiguous and non-empty."""
    pieces = sorted((lo, hi) for lo, hi, _ in calls)
    return pieces[0][0] == 0 and pieces[-1][1] == n and all(a[1] == b[0] and a[0] < a[1] for a, b in zip(pieces, pieces[1:] + [(n, n + 1)]))


@pytest.mark.parametrize("n", [1, 2, 7, 8, 100])
def test_pieces_cover_every_index_once(n):
    out = np.zeros(n, dtype=np.int64)
    rec = Recorder(pause=0.0)
    _jit.parallel_for(rec, n, out)
    assert covered_once(rec.calls, n)
    np.testing.assert_array_equal(out, np.ones(n, dtype=np.int64))
    assert len(rec.calls) == pieces_for(n)


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores for NUMBA_NUM_THREADS")
def test_parallel_uses_helper_threads_and_serial_does_not():
    out = np.zeros(16, dtype=np.int64)
    rec = Recorder()
    _jit.parallel_for(rec, 16, out)
    assert len(rec.threads()) == 2 and threading.current_thread().name in rec.threads()
    serial = Recorder()
    _jit.parallel_for(serial, 16, out, parallel=False)
    assert serial.calls == [(0, 16, threading.current_thread().name)]
    np.testing.assert_array_equal(out, np.full(16, 2))


def test_kernel_threads_limits_and_restores():
    out = np.zeros(16, dtype=np.int64)
    with _jit.kernel_threads(1):
        one = Recorder()
        _jit.parallel_for(one, 16, out)
    assert one.calls == [(0, 16, threading.current_thread().name)]
    after = Recorder()
    _jit.parallel_for(after, 16, out)
    assert len(after.calls) == pieces_for(16)
    with _jit.kernel_threads(64):  # never more than numba.config.NUMBA_NUM_THREADS
        many = Recorder()
        _jit.parallel_for(many, 1000, np.zeros(1000, dtype=np.int64))
    assert len(many.calls) == pieces_for(1000)


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores for NUMBA_NUM_THREADS")
def test_a_second_caller_runs_single_threaded_meanwhile():
    """One parallel call at a time: a call made while another holds the slot runs in its own
    thread, in one piece, and does not wait for the first."""
    first, second = Recorder(pause=0.2), Recorder(pause=0.0)
    out1, out2 = np.zeros(8, dtype=np.int64), np.zeros(8, dtype=np.int64)

    def run_first():
        _jit.parallel_for(first, 8, out1)

    t = threading.Thread(target=run_first, name="first-caller")
    t.start()
    while not first.calls:  # once a piece has started, the first call holds the slot
        time.sleep(0.001)
    _jit.parallel_for(second, 8, out2)
    assert second.calls == [(0, 8, threading.current_thread().name)]
    assert t.is_alive()  # the second call did not wait for the first (4 pieces of 0.2 s each)
    t.join()
    assert covered_once(first.calls, 8) and len(first.threads()) == 2
    np.testing.assert_array_equal(out1, np.ones(8))
    np.testing.assert_array_equal(out2, np.ones(8))


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores for NUMBA_NUM_THREADS")
def test_an_error_in_any_piece_is_raised_and_frees_the_slot():
    for fail_at in (0, 15):  # the first piece (this thread's) and the last (likely a helper's)
        rec = Recorder(fail_at=fail_at)
        with pytest.raises(ValueError, match=f"index {fail_at}"):
            _jit.parallel_for(rec, 16, np.zeros(16, dtype=np.int64))
        after = Recorder(pause=0.0)
        _jit.parallel_for(after, 16, np.zeros(16, dtype=np.int64))
        assert len(after.calls) == pieces_for(16)  # parallel again: the slot was released


@pytest.mark.skipif(not hasattr(os, "fork") or CORES < 2, reason="needs fork and 2 cores")
def test_a_forked_child_gets_threads_of_its_own():
    """The helper threads of the parent do not exist in a forked child: without starting its own,
    the child's parallel call would wait forever."""
    _jit.parallel_for(Recorder(pause=0.0), 8, np.zeros(8, dtype=np.int64))  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if a parallel call completes, with 2 threads
        try:
            rec = Recorder()
            out = np.zeros(8, dtype=np.int64)
            _jit.parallel_for(rec, 8, out)
            os._exit(0 if covered_once(rec.calls, 8) and len(rec.threads()) == 2 and (out == 1).all() else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's parallel call did not finish")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_kernels_give_the_same_results_with_any_thread_count(rng, dtype):
    a = softmax_rows(rng, (9, 3, 4, 21, 21), dtype)
    lengths = rng.integers(0, 22, size=9)
    want = attention_stats(a, 5, lengths, parallel=False), topk(a, 4, lengths, parallel=False)
    for threads in (1, 2, 3):
        with _jit.kernel_threads(threads):
            got = attention_stats(a, 5, lengths), topk(a, 4, lengths)
        for name in want[0]:
            np.testing.assert_array_equal(got[0][name], want[0][name], err_msg=f"{threads} threads: {name}")
        for g, w in zip(got[1], want[1]):
            np.testing.assert_array_equal(g, w)


def test_write_stats_jobs_sets_the_kernel_threads(tmp_path, monkeypatch):
    """`write_stats(jobs=1)` computes in one thread, `jobs=None` on all cores, with identical
    statistics, by both routes: on a local store the chunk files are read and computed by a pool
    of `jobs` threads (each kernel call single-threaded); elsewhere (forced here: zarr decodes)
    zarr reads the blocks and each kernel call runs in `jobs` threads."""
    from fastattn.store import WholeChunks

    path = tmp_path / "s.zarr"
    assert ingest([SAMPLES], path).ok
    pools, threads = [], []
    real_pool, real_for = store_stats.ThreadPoolExecutor, _jit.parallel_for

    def pool(max_workers=None, thread_name_prefix=""):
        pools.append((thread_name_prefix, max_workers))
        return real_pool(max_workers, thread_name_prefix)

    def spy(kernel, n, *args, parallel=True):
        threads.append(_jit._THREADS.get())
        return real_for(kernel, n, *args, parallel=parallel)

    monkeypatch.setattr(store_stats, "ThreadPoolExecutor", pool)
    monkeypatch.setattr("fastattn.kernels.stats.parallel_for", spy)
    store_stats.write_stats(path, jobs=1)
    one = fastattn.open_stats(path).compute()
    assert ("fastattn-stats", 1) in pools  # the chunk route: one computing thread
    store_stats.write_stats(path, k=4, jobs=None)  # another k: everything again
    assert ("fastattn-stats", numba.config.NUMBA_NUM_THREADS) in pools  # every core
    monkeypatch.setattr(WholeChunks, "decodes_here", lambda self: False)  # the zarr route
    threads.clear()
    store_stats.write_stats(path, k=5, jobs=1)
    assert 1 in threads and all(t in (1, None) for t in threads)  # None: the layout's one-batch sample
    xr.testing.assert_identical(fastattn.open_stats(path).compute(), one)
    threads.clear()
    store_stats.write_stats(path, k=4, jobs=None)
    store_stats.write_stats(path, k=5, jobs=None)
    assert threads and all(t is None for t in threads)
    xr.testing.assert_identical(fastattn.open_stats(path).compute(), one)
