"""The one-writer lock: the operating system's flock, so dead or reused pids never hold it."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from fastattn import store
from fastattn.errors import StoreError

TRIALS = 300


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)


def _stale_record(pid: int) -> str:
    return json.dumps({"pid": pid, "host": socket.gethostname(), "since": "2026-01-01T00:00:00+00:00", "purpose": "fastattn ingest"})


def _contend(root: str, trials: int, barrier, inside, overlaps, held) -> None:
    """One writer: in every trial, take the lock at the same moment as the other one."""
    location = store.Location(root)
    for trial in range(trials):
        barrier.wait()
        try:
            with store.Lock(location, "contender"):
                with inside.get_lock():
                    inside.value += 1
                    if inside.value > 1:
                        overlaps.value += 1
                held[trial] += 1
                time.sleep(0.001 * (trial % 3))  # sometimes release while the other is still trying
                with inside.get_lock():
                    inside.value -= 1
        except StoreError:
            pass  # refused: the other one holds it
        barrier.wait()


def test_two_writers_racing_over_a_stale_lock_never_both_hold_it(tmp_path):
    """The race of the old lock: both writers saw the stale lock, and the second one's
    clean-up deleted the first one's fresh lock. 300 trials, two processes each."""
    root = tmp_path / "s.zarr"
    (root / store.META).mkdir(parents=True)
    (root / "zarr.json").write_text("{}")  # a store: the lock's folder is never removed
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    inside, overlaps = ctx.Value("i", 0), ctx.Value("i", 0)
    held = ctx.Array("i", TRIALS)
    workers = [ctx.Process(target=_contend, args=(str(root), TRIALS, barrier, inside, overlaps, held)) for _ in range(2)]
    for w in workers:
        w.start()
    stale = _stale_record(_dead_pid())
    try:
        for _trial in range(TRIALS):
            (root / store.LOCK).write_text(stale)  # a stale lock present at every start
            barrier.wait(timeout=30)
            barrier.wait(timeout=30)
    finally:
        for w in workers:
            w.join(timeout=30)
    assert [w.exitcode for w in workers] == [0, 0]
    assert overlaps.value == 0
    assert min(held) >= 1  # every trial, one of them got it: a stale lock never blocks


def test_a_held_lock_refuses_a_second_writer_and_names_it(tmp_path):
    location = store.Location(tmp_path / "s.zarr")
    with store.Lock(location, "fastattn ingest"):
        assert store.lock_holder(location)["pid"] == os.getpid()
        with pytest.raises(StoreError, match=rf"being written by fastattn ingest \(pid {os.getpid()} on "):
            with store.Lock(location, "fastattn stats"):
                pass
    assert store.lock_holder(location) is None
    assert not (tmp_path / "s.zarr").exists()  # nothing was created: no trace left


@pytest.mark.parametrize("record", ["live", "dead", "other host", "empty"])
def test_a_lock_file_nobody_holds_is_taken_over(tmp_path, record):
    """Pid reuse (after a reboot, in containers) made a live unrelated process look like
    the writer and blocked every writer for good; only the flock counts now."""
    root = tmp_path / "s.zarr"
    (root / store.META).mkdir(parents=True)
    (root / "zarr.json").write_text("{}")
    body = {
        "live": _stale_record(1),  # pid 1 runs, and is no fastattn
        "dead": _stale_record(_dead_pid()),
        "other host": json.dumps({"pid": 1, "host": "gpu-node-7", "since": "then", "purpose": "fastattn stats"}),
        "empty": "",
    }[record]
    (root / store.LOCK).write_text(body)
    location = store.Location(root)
    assert store.lock_holder(location) is None
    with store.Lock(location, "fastattn ingest"):
        assert store.lock_holder(location)["purpose"] == "fastattn ingest"
    assert not (root / store.LOCK).exists()


def test_a_killed_holder_releases_the_lock(tmp_path):
    root = tmp_path / "s.zarr"
    (root / store.META).mkdir(parents=True)
    (root / "zarr.json").write_text("{}")
    code = f"""
import os, sys, time
from fastattn import store
lock = store.Lock(store.Location({str(root)!r}), "fastattn ingest").__enter__()
print("held", flush=True)
time.sleep(60)
"""
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        location = store.Location(root)
        assert store.lock_holder(location)["pid"] == holder.pid
        with pytest.raises(StoreError, match=f"pid {holder.pid}"):
            store.Lock(location, "fastattn ingest").__enter__()
    finally:
        holder.kill()
        holder.wait()
    assert store.lock_holder(location) is None  # the file is still there, but nobody holds it
    with store.Lock(location, "fastattn ingest"):
        pass
