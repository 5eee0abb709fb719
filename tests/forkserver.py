"""A server of child processes for fault injection, forked from one process that has already
imported fastattn (and never touched a store, so it has no threads): each of the many kills
costs milliseconds instead of an interpreter start. `ForkServer.run(work, *args, point=, n=)`
runs an ingest, `write_stats` or the command line in a child that patches `point` first (a
SIGKILL after the nth chunk written, a torn file, a full disk, ...: see `patch` in SERVER)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SERVER = r"""
import errno, json, os, signal, sys, threading, time, traceback, uuid
from pathlib import Path
import numpy as np
import fastattn.ingest
import zarr
try:
    import distributed  # ingest looks for an active dask client: import it once, here
except ImportError:
    pass
import zarr.storage._local as local
from fastattn import dumps, store
import fastattn_cli.main as cli
ingest_mod = sys.modules["fastattn.ingest"]
store.schema.CHUNK_BYTES = int(sys.argv[1])


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def counted(n, original, *, before=False):
    # call `original`; SIGKILL just before or just after its nth call (calls may come from threads)
    calls, lock = [0], threading.Lock()
    def wrapped(*args, **kwargs):
        with lock:
            calls[0] += 1
            mine = calls[0]
        if before and mine == n:
            die()
        result = original(*args, **kwargs)
        if not before and mine == n:
            die()
        return result
    return wrapped


def each_write(match, before):
    # call before(nth, path, data) ahead of every matching file write, numbered together: zarr's
    # own (local._put: metadata, coordinates) and fastattn's whole chunks (store.location.write_file)
    zarr_put, own_write, calls, lock = local._put, store.location.write_file, [0], threading.Lock()
    def nth():
        with lock:
            calls[0] += 1
            return calls[0]
    def put(path, value, exclusive=False):
        if match(path):
            before(nth(), path, lambda: bytes(value.as_buffer_like()))
        return zarr_put(path, value, exclusive)
    def write_file(path, buffers):
        if match(Path(path)):
            before(nth(), Path(path), lambda: b"".join(bytes(b) for b in buffers))
        return own_write(path, buffers)
    local._put, store.location.write_file = put, write_file


def torn_put(n, match):
    # the nth matching file write stops half-way, as a kill mid-write leaves it
    def tear(mine, path, data):
        if mine == n:
            data = data()
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.with_suffix(f".{uuid.uuid4().hex}.partial"), "wb") as f:
                f.write(data[: len(data) // 2])
            die()
    each_write(match, tear)


def full_disk(n, match):
    # from the nth matching file write on, writes fail with ENOSPC (nothing of them is left behind)
    def fail(mine, path, data):
        if mine >= n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    each_write(match, fail)


def is_chunk(path):  # the store's arrays' chunks: c.0.0.0.0.0 (schema.CHUNK_KEYS); not the statistics'
    return os.path.basename(path).startswith("c.") and "/stats/" not in str(path)


def patch(point, n, arg):
    if point == "chunk_after":
        ingest_mod._ChunkWriter.write = counted(n, ingest_mod._ChunkWriter.write)
    elif point == "chunk_torn":
        torn_put(n, is_chunk)
    elif point == "meta_torn":
        torn_put(n, lambda p: p.name == "zarr.json")
    elif point == "put_before":
        each_write(lambda p: True, lambda mine, path, data: die() if mine == n else None)
    elif point == "array_resize":  # between two arrays' resizes: arrays left at different lengths
        zarr.Array.resize = counted(n, zarr.Array.resize)
    elif point == "resize":
        store.resize = counted(n, store.resize)
    elif point == "read":  # a file read into chunk rows (read_into), or read whole
        dumps.read = counted(n, dumps.read)
        dumps.read_into = counted(n, dumps.read_into)
    elif point == "lock":
        store.read_manifest = counted(1, store.read_manifest, before=True)
    elif point == "manifest":
        store.LocalLocation.write_atomic = die
    elif point == "manifest_tmp":
        original = os.replace
        def replace(src, dst):
            if str(dst).endswith(store.MANIFEST):
                die()
            return original(src, dst)
        os.replace = replace
    elif point == "consolidate":
        zarr.consolidate_metadata = die
    elif point == "consolidate_torn":
        original = zarr.consolidate_metadata
        def consolidate(*args, **kwargs):
            torn_put(1, lambda p: p.name == "zarr.json")
            return original(*args, **kwargs)
        zarr.consolidate_metadata = consolidate
    elif point == "unlock":
        store.Lock.__exit__ = die
    elif point == "stats_torn":
        torn_put(n, lambda p: "/stats/" in str(p) and os.path.basename(p).startswith("c."))  # its chunks: c.0.0.0
    elif point == "enospc_chunk":
        full_disk(n, is_chunk)
    elif point == "enospc_meta":
        full_disk(n, lambda p: p.name == "zarr.json")
    elif point == "enospc_consolidate":
        original = zarr.consolidate_metadata
        def consolidate(*args, **kwargs):
            full_disk(1, lambda p: True)
            return original(*args, **kwargs)
        zarr.consolidate_metadata = consolidate
    elif point == "enospc_stats":
        full_disk(n, lambda p: "/stats/" in str(p))
    elif point == "enospc_manifest":
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync = fsync
    elif point == "enospc_lock":  # writing the lock's pid record
        def pwrite(fd, data, offset):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.pwrite = pwrite
    elif point == "modify":  # rewrite a dump between the scan and the read (into chunk rows, or whole)
        victim, replacement = arg
        def modifying(original):
            def read(header, *places):
                if os.path.basename(header.path) == victim:
                    with open(replacement, "rb") as src, open(header.path, "r+b") as dst:
                        dst.truncate(0)
                        dst.write(src.read())
                return original(header, *places)
            return read
        dumps.read, dumps.read_into = modifying(dumps.read), modifying(dumps.read_into)
    elif point == "hold":  # take the lock, then wait for the test to say go
        ready, go, abort = arg
        enter = store.Lock.__enter__
        def held(self):
            enter(self)
            open(ready, "w").close()
            while not os.path.exists(go):
                time.sleep(0.01)
            if abort:  # stop here, releasing the lock on the way out
                self.__exit__(None, None, None)
                raise RuntimeError("released by the test")
            return self
        store.Lock.__enter__ = held


def work(job):
    kind, args = job["work"], job["args"]
    if kind == "ingest":
        ingest_mod.ingest([args[0]], args[1], jobs=2)
    elif kind == "stats":
        from fastattn import stats
        stats.write_stats(args[0], jobs=2)
    elif kind == "cli":
        sys.argv = ["fastattn", *args]
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)


def child(job):
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        patch(job.get("point"), job.get("n", 1), job.get("arg"))
        work(job)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(3)
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)


def status(pid, started):
    _, code = os.waitpid(pid, 0)
    out = {"seconds": time.perf_counter() - started}
    if os.WIFSIGNALED(code):
        out["signal"] = os.WTERMSIG(code)
    else:
        out["code"] = os.WEXITSTATUS(code)
    return out


def warm():
    # compile the statistics kernels here, once, single-threaded (no thread pool to lose in a fork)
    import dask, dask.array as da, xarray as xr
    from fastattn import stats
    a = np.full((4, 2, 4, 16, 16), np.nan, np.float32)
    a[..., :10, :10] = 0.1
    ds = xr.Dataset({"attention": (store.DIMS, da.from_array(a, chunks=(4, 1, 4, 16, 16))),
                     "length": ("batch", np.full(4, 10, np.int32))})
    with dask.config.set(scheduler="sync"):
        stats.compute_stats(ds).compute()
    return {"threads": threading.active_count()}


background = {}
for line in sys.stdin:
    job = json.loads(line)
    if "warm" in job:
        answer = warm()
    elif "reap" in job:
        pid = job["reap"]
        answer = status(pid, background.pop(pid))
    else:
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            child(job)
        if job.get("background"):
            background[pid] = started
            answer = {"pid": pid}
        else:
            if job.get("delay") is not None:
                time.sleep(job["delay"])
                os.kill(pid, signal.SIGKILL)
            answer = status(pid, started)
    print(json.dumps(answer), flush=True)
"""


class ForkServer:
    """The server, with chunks of `chunk_bytes` in the stores its children create."""

    def __init__(self, root: Path, chunk_bytes: int):
        self.root = root
        self.log = root / "server.log"
        self.jobs = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(chunk_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.log, "w"),
            text=True,
        )

    def run(self, work: str, *args, point=None, n=1, arg=None, delay=None, background=False) -> dict:
        self.jobs += 1
        log = self.root / f"job{self.jobs}.log"
        job = {"work": work, "args": [str(a) for a in args], "point": point, "n": n, "arg": arg, "delay": delay}
        job.update(log=str(log), background=background)
        answer = self._ask(job)
        answer["log"] = log
        return answer

    def warm(self) -> None:
        if not getattr(self, "warmed", False):
            assert self._ask({"warm": True}) == {"threads": 1}
            self.warmed = True

    def reap(self, pid: int) -> dict:
        return self._ask({"reap": pid})

    def _ask(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died: {self.log.read_text()}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
