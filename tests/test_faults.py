"""Fault injection: SIGKILL at 20+ moments, a full disk, flipped bytes, dumps changed under
an ingest, and two writers at once. Every run happens in a child process.

Children are forked from one server process that has already imported fastattn
(tests/forkserver.py), which makes each of the many kills cost milliseconds instead of an
interpreter start.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import softmax_rows, store_snapshot, write_dump
from forkserver import ForkServer
from click.testing import CliRunner

from fastattn import check, store
from fastattn.dumps import natural_key
from fastattn.errors import StoreError
from fastattn.ingest import ingest
from fastattn.stats import open_stats
from fastattn_cli.main import app

CHUNK_BYTES = 16 << 10  # 4 samples of 4 heads x 16 x 16 float32 per chunk: the 24 samples span 6 batch-chunks
runner = CliRunner()

@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(store.schema, "CHUNK_BYTES", CHUNK_BYTES)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ForkServer(tmp_path_factory.mktemp("server"), CHUNK_BYTES)
    yield srv
    srv.close()


def _dump(rng, path: Path, lengths, layers=2, heads=4, size=16) -> None:
    """A (layer, batch, head, q, k) dump with an attention_mask and tokens; padded keys weigh 0."""
    att = np.zeros((layers, len(lengths), heads, size, size), dtype=np.float32)
    mask = np.zeros((len(lengths), size), dtype=np.int8)
    tokens = np.full((len(lengths), size), "", dtype="<U8")
    for b, n in enumerate(lengths):
        att[:, b, :, :, :n] = softmax_rows(rng, (layers, heads, size, n))
        mask[b, :n] = 1
        tokens[b, :n] = [f"t{path.stem}{b}{i}" for i in range(n)]
    write_dump(path, att, attention_mask=mask, tokens=tokens)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, server):
    """12 ragged batched dumps (24 samples, 6 batch-chunks) and the store a clean run makes."""
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(3)
    for i in range(12):
        _dump(rng, root / "dumps" / f"attention_batch_{i}.npz", [16 if i == 0 else int(rng.integers(6, 17)), int(rng.integers(6, 17))])
    clean = root / "clean.zarr"
    done = server.run("ingest", root / "dumps", clean)
    assert done == {"code": 0, "seconds": done["seconds"], "log": done["log"]}, done["log"].read_text()
    manifest = store.read_manifest(store.Location(clean))
    assert manifest.committed == 24 and manifest.batch_chunk == 4
    return root, clean, store_snapshot(clean), done["seconds"]


@pytest.fixture(scope="module")
def half(corpus, tmp_path_factory):
    """The first 5 dumps committed (the last chunk shared with what comes next), and all 12 dumps."""
    root, _, _, _ = corpus
    base = tmp_path_factory.mktemp("half")
    folder = base / "d"
    folder.mkdir()
    paths = sorted((root / "dumps").glob("*.npz"), key=lambda p: natural_key(p.name))
    for path in paths[:5]:
        shutil.copy2(path, folder / path.name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store.schema, "CHUNK_BYTES", CHUNK_BYTES)
        assert ingest([folder], base / "s.zarr").ok
    for path in paths[5:]:
        shutil.copy2(path, folder / path.name)
    return folder, base / "s.zarr", store_snapshot(base / "s.zarr")


def _copy_of(half, tmp_path) -> Path:
    target = tmp_path / "s.zarr"
    shutil.copytree(half[1], target)
    return target


def _same(snapshot: dict, clean: dict) -> None:
    assert snapshot["committed"] == clean["committed"]
    assert snapshot["files"] == clean["files"]
    assert snapshot["source"] == clean["source"] and snapshot["token"] == clean["token"]
    for name in ("length", "source_index", "attention"):
        np.testing.assert_array_equal(snapshot[name], clean[name], err_msg=name)


def _committed_prefix(target: Path, clean: dict) -> None:
    """What a killed store shows is a commit: a prefix of the clean store."""
    if not (target / store.MANIFEST).exists():
        return
    got = store_snapshot(target)
    n = got["committed"]
    size = got["attention"].shape[-1]
    np.testing.assert_array_equal(got["attention"], clean["attention"][:n, ..., :size, :size])
    assert got["source"] == clean["source"][:n]


def _only_leftovers(target: Path) -> list:
    """After a kill, check finds nothing but what --repair removes (never damaged committed data)."""
    if not (target / store.MANIFEST).exists():
        return []
    problems = check.store_problems(target)
    assert all(p.fix in (check.LOCK, check.STRAY, check.PAST, check.CONSOLIDATED) for p in problems), [
        str(p) for p in problems
    ]
    return problems


# ---------------------------------------------------------------- SIGKILL at chosen and random moments

# (point, n): where the child SIGKILLs itself. 23 points of a first ingest, 4 of an append.
FIRST_RUN = [
    ("lock", 1),  # holding the lock, nothing else yet
    ("put_before", 1),  # before the store's first file
    ("put_before", 2),  # after the root group's first write
    ("meta_torn", 1),  # half-way through that first write: a stray zarr.<hex>.partial beside _fastattn/
    ("meta_torn", 5),  # half-way through an array's metadata
    ("put_before", 6),  # while the arrays are being created
    ("put_before", 14),  # while they are resized
    ("resize", 1),  # after the resize, before any data
    ("read", 1),  # while reading dumps
    ("read", 9),
    ("chunk_torn", 1),  # half-way through writing a chunk file: a coordinate of the new store
    ("chunk_torn", 6),  # the batch coordinate, while resizing
    ("chunk_torn", 14),  # attention
    ("chunk_torn", 40),  # a per-batch array
    ("chunk_after", 1),  # between whole chunk writes
    ("chunk_after", 3),
    ("chunk_after", 6),  # after the last chunk, before the commit
    ("put_before", 45),  # among the data chunks
    ("manifest_tmp", 1),  # manifest written and fsynced, not yet renamed into place
    ("manifest", 1),  # instead of writing the manifest
    ("consolidate", 1),  # committed, consolidated metadata not refreshed
    ("consolidate_torn", 1),  # half-way through writing the consolidated zarr.json
    ("unlock", 1),  # committed, lock still held
]
APPEND = [("chunk_torn", 1), ("chunk_after", 1), ("manifest_tmp", 1), ("read", 3)]


def _kill_and_resume(server, corpus, target: Path, point: str, n: int, folder=None, repair_first=False) -> None:
    root, _, clean, _ = corpus
    folder = folder or root / "dumps"
    killed = server.run("ingest", folder, target, point=point, n=n)
    assert killed.get("signal") == signal.SIGKILL, (point, n, killed, killed["log"].read_text())
    _committed_prefix(target, clean)
    _only_leftovers(target)
    if repair_first and (target / store.MANIFEST).exists():
        problems = check.store_problems(target, repair=True)
        assert all(p.repaired for p in problems), problems
    assert ingest([folder], target, jobs=2).ok, f"re-run after a kill at {point} {n}"
    leftovers = check.store_problems(target)  # only temporary files can remain (--repair deletes them)
    assert all(p.fix == check.STRAY for p in leftovers), [str(p) for p in leftovers]


@pytest.mark.parametrize("point,n", FIRST_RUN)
def test_kill_during_ingest_then_rerun(point, n, server, corpus, tmp_path):
    target = tmp_path / "s.zarr"
    _kill_and_resume(server, corpus, target, point, n, repair_first=(n % 2 == 0))
    _same(store_snapshot(target), corpus[2])


def test_kill_during_an_append_then_rerun(server, corpus, half, tmp_path):
    """The chunk shared by committed and new batches is rewritten whole; a kill at any
    point keeps the committed batches, and the re-run equals a one-shot ingest."""
    _, _, clean, _ = corpus
    folder, _, before = half
    target = _copy_of(half, tmp_path)
    for point, n in APPEND:
        killed = server.run("ingest", folder, target, point=point, n=n)
        assert killed.get("signal") == signal.SIGKILL, (point, killed["log"].read_text())
        now = store_snapshot(target)
        assert now["committed"] == before["committed"]
        np.testing.assert_array_equal(now["attention"], before["attention"])
        _only_leftovers(target)
    assert ingest([folder], target).ok
    check.store_problems(target, repair=True)
    assert check.store_problems(target) == []
    _same(store_snapshot(target), clean)


def test_kill_at_random_moments(server, corpus, tmp_path):
    """SIGKILL at random times (a clean run's duration scaled), re-run after each."""
    root, _, clean, seconds = corpus
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    delays = sorted(rng.uniform(0.02, seconds) for _ in range(6))
    for delay in delays:
        target = tmp_path / f"s{delay:.3f}.zarr"
        server.run("ingest", root / "dumps", target, delay=delay)
        _committed_prefix(target, clean)
        _only_leftovers(target)
        assert ingest([root / "dumps"], target, jobs=2).ok, f"seed {seed}: re-run after a kill at {delay:.3f}s"
        _same(store_snapshot(target), clean)


# ---------------------------------------------------------------- a full disk


def _one_error_line(log: Path) -> str:
    text = log.read_text()
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text
    return errors[0]


@pytest.mark.parametrize(
    "point,n,says",
    [
        ("enospc_chunk", 4, "writing failed (No space left on device); nothing was committed"),
        ("enospc_meta", 3, "No space left on device"),  # growing the arrays' metadata
        ("enospc_manifest", 1, "No space left on device"),  # the commit itself
        ("enospc_consolidate", 1, "No space left on device"),  # refreshing the consolidated metadata, after the commit
        ("enospc_lock", 1, "No space left on device"),  # taking the lock
    ],
)
def test_disk_full_is_one_line_and_the_next_run_completes(point, n, says, server, corpus, half, tmp_path):
    _, _, clean, _ = corpus
    folder, _, before = half
    target = _copy_of(half, tmp_path)
    failed = server.run("cli", "ingest", folder, target, point=point, n=n)
    assert failed.get("code") == 1, failed["log"].read_text()
    line = _one_error_line(failed["log"])
    assert says in line and str(target) in line, line
    now = store_snapshot(target)  # the store still opens, at a commit
    assert now["committed"] in (before["committed"], clean["committed"])
    if now["committed"] == before["committed"]:
        np.testing.assert_array_equal(now["attention"], before["attention"])
    _only_leftovers(target)
    again = server.run("cli", "ingest", folder, target)  # space freed
    assert again.get("code") == 0, again["log"].read_text()
    assert check.store_problems(target) == []
    _same(store_snapshot(target), clean)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_real_full_disk(server, corpus, half, tmp_path):
    """The store on a small tmpfs (root only; skipped elsewhere): the append runs out of space."""
    _, clean_path, clean, _ = corpus
    folder, _, before = half
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, "64m"):
        pytest.skip("needs root and tmpfs to mount a small file system")
    try:
        target = disk / "s.zarr"
        shutil.copytree(half[1], target)
        used = shutil.disk_usage(disk).used
        full = sum(4096 * -(-p.stat().st_size // 4096) for p in clean_path.rglob("*") if p.is_file())
        subprocess.run(["mount", "-o", f"remount,size={used + (full - used) // 3}", str(disk)], check=True)
        failed = server.run("cli", "ingest", folder, target)
        assert failed.get("code") == 1, failed["log"].read_text()
        line = _one_error_line(failed["log"])
        assert "No space left on device" in line and "nothing was committed" in line, line
        now = store_snapshot(target)
        assert now["committed"] == before["committed"]
        np.testing.assert_array_equal(now["attention"], before["attention"])
        _only_leftovers(target)
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        again = server.run("cli", "ingest", folder, target)
        assert again.get("code") == 0, again["log"].read_text()
        assert check.store_problems(target) == []
        _same(store_snapshot(target), clean)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ---------------------------------------------------------------- flipped bytes

FLIPS = {  # chunk key -> (variable, where in the chunk file: the blosc header, the data, the checksum)
    "attention/c.4.1.0.0.0": ("attention", 0.5),
    "attention/c.1.0.0.0.0": ("attention", 0.0),
    "attention/c.5.1.0.0.0": ("attention", 1.0),
    "length/c.2": ("length", 0.5),
    "source/c.0": ("source", 0.5),
    "source_index/c.5": ("source_index", 1.0),
    "token/c.3.0": ("token", 0.5),
}


def test_flipped_bytes_are_caught(corpus, tmp_path):
    _, clean, _, _ = corpus
    target = tmp_path / "s.zarr"
    shutil.copytree(clean, target)
    for key, (_, where) in FLIPS.items():
        data = bytearray((target / key).read_bytes())
        data[int(where * (len(data) - 1))] ^= 0x08
        (target / key).write_bytes(bytes(data))
    problems = check.store_problems(target)
    assert sorted(p.where for p in problems) == sorted(FLIPS), [str(p) for p in problems]
    assert all("does not decode (crc32c checksum mismatch" in p.message for p in problems)
    ds = store.open_store(target)
    for variable in sorted({v for v, _ in FLIPS.values()}):
        with pytest.raises(ValueError, match="checksum"):
            ds[variable].values  # never wrong numbers


# ---------------------------------------------------------------- dumps changed under an ingest


@pytest.mark.parametrize("change", ["rewritten", "truncated", "bytes_flipped"])
def test_dump_changed_while_ingesting_is_rejected(change, server, corpus, tmp_path):
    root, _, _, _ = corpus
    folder = tmp_path / "d"
    shutil.copytree(root / "dumps", folder)
    victim = sorted(folder.glob("*.npz"))[5]
    replacement = tmp_path / "new.npz"
    original = victim.read_bytes()
    if change == "rewritten":  # same shape and size, other values: only the content hash differs
        with np.load(victim) as z:
            arrays = dict(z)
        arrays["attention_weights"] = arrays["attention_weights"][:, :, ::-1].copy()  # heads reversed
        np.savez(replacement, **arrays)
        assert replacement.stat().st_size == victim.stat().st_size
        says = "changed while being ingested (its content hash differs from the scan)"
    elif change == "truncated":
        replacement.write_bytes(original[: len(original) // 2])
        says = "changed while being ingested (its size differs from the scan)"
    else:  # bytes changed in place, zip directory untouched
        data = bytearray(original)
        data[len(data) // 2] ^= 0xFF
        replacement.write_bytes(bytes(data))
        says = "bad CRC-32"
    target = tmp_path / "s.zarr"
    done = server.run("cli", "ingest", folder, target, point="modify", arg=[victim.name, str(replacement)])
    assert done.get("code") == 1, done["log"].read_text()
    text = done["log"].read_text()
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.startswith(str(victim))]
    assert len(lines) == 1 and says in lines[0], text
    manifest = store.read_manifest(store.Location(target))
    assert os.path.realpath(victim) not in manifest.files and manifest.committed == 22
    snapshot = store_snapshot(target)
    assert victim.name not in snapshot["source"]
    assert check.store_problems(target) == []
    if change == "rewritten":  # the next run takes the new content, as a new file
        assert ingest([folder], target).ok
        got = store.open_store(target)
        ours = np.flatnonzero(got.source.values == victim.name)
        assert ours.tolist() == [22, 23]
        with np.load(victim) as z:
            want = z["attention_weights"]
        n = int(got.length.values[22])
        np.testing.assert_array_equal(got.attention.values[22, :, :, :n, :n], want[:, 0, :, :n, :n])


# ---------------------------------------------------------------- one writer at a time


def _hold(server, tmp_path, work: str, *args, abort: bool = False) -> tuple[int, Path]:
    ready, go = tmp_path / "ready", tmp_path / "go"
    started = server.run(work, *args, point="hold", arg=[str(ready), str(go), abort], background=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline, started["log"].read_text()
        time.sleep(0.01)
    return started["pid"], go


@pytest.mark.parametrize("holder", ["ingest", "stats"])
def test_a_second_writer_is_refused(holder, server, corpus, tmp_path):
    root, clean, _, _ = corpus
    target = tmp_path / "s.zarr"
    shutil.copytree(clean, target)
    args = [root / "dumps", target] if holder == "ingest" else [target]
    pid, go = _hold(server, tmp_path, holder, *args, abort=holder == "stats")
    try:
        holder_name = f"fastattn {holder}"
        who = f"being written by {holder_name} (pid {pid} on {socket.gethostname()} since "
        with pytest.raises(StoreError, match=None) as refused:
            ingest([root / "dumps"], target)
        assert who in str(refused.value)
        result = runner.invoke(app, ["ingest", str(root / "dumps"), str(target)])
        assert result.exit_code == 1 and result.stderr.startswith(f"error: {target}: {who}"), result.stderr
        assert result.stderr.count("\n") == 1 and "wait for it to finish" in result.stderr
        from fastattn.stats import write_stats

        with pytest.raises(StoreError) as refused:
            write_stats(target)
        assert who in str(refused.value)
        with pytest.raises(StoreError) as refused:
            check.store_problems(target, repair=True)
        assert who in str(refused.value)
        assert check.store_problems(target) == []  # reading is always allowed
    finally:
        go.touch()
        finished = server.reap(pid)
    if holder == "ingest":
        assert finished.get("code") == 0
    assert not (target / store.LOCK).exists()


def test_a_killed_writers_lock_is_taken_over(server, corpus, tmp_path):
    root, _, clean, _ = corpus
    target = tmp_path / "s.zarr"
    killed = server.run("ingest", root / "dumps", target, point="unlock")  # committed, lock left behind
    assert killed.get("signal") == signal.SIGKILL
    lock = json.loads((target / store.LOCK).read_text())
    assert lock["host"] == socket.gethostname() and lock["purpose"] == "fastattn ingest"
    problems = check.store_problems(target)
    assert [p.fix for p in problems] == [check.LOCK]
    assert f"stale lock left by fastattn ingest (pid {lock['pid']} on {lock['host']}" in str(problems[0])
    assert ingest([root / "dumps"], target).ok  # takes the lock over (and adds nothing)
    assert not (target / store.LOCK).exists()
    (target / store.LOCK).write_text("")  # a writer killed between creating the lock and writing it
    assert check.store_problems(target)[0].fix == check.LOCK
    assert ingest([root / "dumps"], target).ok
    _same(store_snapshot(target), clean)


# ---------------------------------------------------------------- statistics runs


@pytest.fixture(scope="module")
def clean_stats(server, corpus, tmp_path_factory):
    """The clean store with statistics, computed by a child of the warm server."""
    server.warm()
    path = tmp_path_factory.mktemp("stats") / "clean.zarr"
    shutil.copytree(corpus[1], path)
    done = server.run("stats", path)
    assert done.get("code") == 0, done["log"].read_text()
    return path, open_stats(path).compute(), done["seconds"]


def _same_stats(target: Path, clean) -> None:
    got = open_stats(target).compute()
    assert got.attrs["batches"] == clean.attrs["batches"] and got.attrs["k"] == clean.attrs["k"]
    xr.testing.assert_equal(got, clean)


@pytest.mark.parametrize("point,n", [("stats_torn", 20), ("manifest", 1)])  # half-way through the block's chunks; the commit
def test_kill_during_stats_then_rerun(point, n, server, corpus, clean_stats, tmp_path):
    target = tmp_path / "s.zarr"
    shutil.copytree(corpus[1], target)
    killed = server.run("stats", target, point=point, n=n)
    assert killed.get("signal") == signal.SIGKILL, (point, n, killed["log"].read_text())
    _only_leftovers(target)
    assert store_snapshot(target)["committed"] == 24
    again = server.run("stats", target)
    assert again.get("code") == 0, again["log"].read_text()
    _same_stats(target, clean_stats[1])
    assert all(p.fix == check.STRAY for p in check.store_problems(target))


def test_kill_during_incremental_stats_then_rerun(server, corpus, half, clean_stats, tmp_path):
    """Statistics for the first 10 batches, 14 more ingested, a kill while computing theirs:
    the first 10 stay readable and right, and the re-run completes all 24."""
    folder, _, _ = half
    target = _copy_of(half, tmp_path)
    assert server.run("stats", target).get("code") == 0
    assert server.run("ingest", folder, target).get("code") == 0
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    kills = [("array_resize", 3, None), ("stats_torn", rng.randint(1, 30), None), (None, 1, rng.uniform(0.1, clean_stats[2]))]
    for point, n, delay in kills:
        server.run("stats", target, point=point, n=n, delay=delay)
        _only_leftovers(target)
        st = open_stats(target).compute()
        assert st.attrs["batches"] in (10, 24)
        xr.testing.assert_equal(st, clean_stats[1].isel(batch=slice(0, st.attrs["batches"])))
    again = server.run("stats", target)
    assert again.get("code") == 0, again["log"].read_text()
    _same_stats(target, clean_stats[1])


def test_disk_full_during_stats(server, corpus, clean_stats, tmp_path):
    target = tmp_path / "s.zarr"
    shutil.copytree(corpus[1], target)
    failed = server.run("cli", "stats", target, point="enospc_stats", n=5)
    assert failed.get("code") == 1, failed["log"].read_text()
    assert "No space left on device" in _one_error_line(failed["log"])
    _only_leftovers(target)
    assert store.read_manifest(store.Location(target)).stats_committed == 0
    again = server.run("cli", "stats", target)
    assert again.get("code") == 0, again["log"].read_text()
    _same_stats(target, clean_stats[1])
