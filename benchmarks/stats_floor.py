"""The floor under `fastattn stats`: what computing a store's statistics cannot avoid.

    /usr/bin/time -f "%e s %U u %S s %M KB" python -m benchmarks.stats_floor STORE            # everything below
    /usr/bin/time -f "%e s %U u %S s %M KB" python -m benchmarks.stats_floor STORE --imports  # the start alone
    /usr/bin/time -f "%e s %U u %S s %M KB" python -m benchmarks.stats_floor STORE --write DIR  # + storing the results

One process: import NumPy, zarr and Numba, load the cached fused kernel (`fastattn.kernels.stats`,
a warm cache: run `fastattn stats` once before), then on 2 threads (`-j N`: N) read every
attention chunk file, check its crc32c, blosc-decode it into a reused buffer (or take it in place
when blosc stored it verbatim) and run the kernel on it single-threaded, into reused outputs of one chunk's planes. No CLI, no stats group, no
writes, no commit, no table: what is left when everything but reading, decoding and computing
is gone. The chunk files are found from the array's `zarr.json` (fastattn's codecs: bytes, blosc,
crc32c); every chunk is taken whole, padding included (a store's last chunk of batches).
`--write DIR` adds what storing the results costs at the least: each chunk's outputs (every
per-query, per-key, top-k and per-plane array the kernel fills) blosc-compressed as the stats
group's arrays are and written to one file per chunk in DIR (emptied first).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numcodecs.blosc
import numpy as np
import zarr  # noqa: F401  (what the command imports: part of the floor)
from crc32c import crc32c


def main(argv: list[str]) -> None:
    write_dir = None
    if "--write" in argv:
        write_dir = argv[argv.index("--write") + 1]
        argv = [a for i, a in enumerate(argv) if i not in (argv.index("--write"), argv.index("--write") + 1)]
    args = [a for a in argv if not a.startswith("-")]
    threads = int(argv[argv.index("-j") + 1]) if "-j" in argv else 2
    if "-j" in argv:
        args.remove(argv[argv.index("-j") + 1])
    if len(args) != 1:
        raise SystemExit("usage: python -m benchmarks.stats_floor STORE [-j THREADS] [--imports]")
    start = time.perf_counter()
    from fastattn.kernels import stats as kernel

    root = os.path.join(args[0], "attention")
    with open(os.path.join(root, "zarr.json")) as f:
        meta = json.load(f)
    shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    separator = meta["chunk_key_encoding"]["configuration"]["separator"]  # "." (files) or "/" (folders)
    names = [c["name"] for c in meta["codecs"]]
    if names != ["bytes", "blosc", "crc32c"] or chunks[-2:] != shape[-2:] or meta["data_type"] != "float32":
        raise SystemExit(f"{root}: not a float32 fastattn store with whole planes per chunk ({names}, chunks {chunks})")
    planes = int(np.prod(chunks[:-2]))
    Q, K = chunks[-2:]
    grid = [range(-(-n // c)) for n, c in zip(shape[:3], chunks[:3])]

    warm = kernel.empty_buffers(1, Q, K, 5, np.float32)  # loads the cached kernel (compiles on a cold cache)
    kernel.fill(warm, np.full((1, Q, K), 1.0 / K, dtype=np.float32), parallel=False)
    loaded = time.perf_counter()
    if "--imports" in argv:
        print(f"imports and the kernel: {loaded - start:.2f} s (after Python's start)", file=sys.stderr)
        return

    local = threading.local()  # per thread: a file buffer, a chunk buffer, one chunk's outputs
    nbytes = []

    def one(coords) -> None:
        if not hasattr(local, "chunk"):
            local.chunk = np.empty(chunks, dtype=np.float32)
            local.file = bytearray(local.chunk.nbytes + 1024)
            local.out = kernel.empty_buffers(planes, Q, K, 5, np.float32)
        path = os.path.join(root, separator.join(["c", *map(str, coords), "0", "0"]))
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if len(local.file) < size:
                local.file = bytearray(size)
            f.readinto(memoryview(local.file)[:size])
        data = np.frombuffer(local.file, dtype=np.uint8, count=size)
        if struct.pack("<I", crc32c(data[:-4])) != bytes(data[-4:]):
            raise SystemExit(f"{path}: crc32c mismatch")
        chunk = local.chunk
        if data[2] & 0x02 and size == 16 + chunk.nbytes + 4:  # blosc's header says: stored verbatim
            chunk = np.frombuffer(local.file, dtype=np.float32, count=chunk.size, offset=16).reshape(chunks)
        else:
            numcodecs.blosc.decompress(data[:-4], chunk)
        kernel.fill(local.out, chunk, None, parallel=False)
        if write_dir is not None:
            name = os.path.join(write_dir, "_".join(map(str, coords)))
            with open(name + ".partial", "wb") as f:
                for values in local.out:
                    f.write(numcodecs.blosc.compress(np.ascontiguousarray(values), b"lz4", 5, numcodecs.blosc.SHUFFLE))
            os.replace(name + ".partial", name)
        nbytes.append(size)

    if write_dir is not None:
        shutil.rmtree(write_dir, ignore_errors=True)
        os.makedirs(write_dir)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, itertools.product(*grid)))
    done = time.perf_counter()
    print(
        f"imports and the kernel {loaded - start:.2f} s, then {len(nbytes)} chunks"
        f" ({sum(nbytes) / 1e9:.2f} GB stored, {np.prod(shape) * 4 / 1e9:.2f} GB decoded) read, decoded and computed"
        f"{', its results stored,' if write_dir else ''} on {threads} threads in {done - loaded:.2f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
