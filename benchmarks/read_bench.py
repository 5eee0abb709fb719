"""How fast a store's attention can be read back, by every route a user has.

    python -m benchmarks.read_bench STORE [--codecs]

Times, on the same store and in one run (interleaved, medians of 3, page cache warm):
the raw bytes of its chunk files, decoding them (blosc + crc32c, as zarr's codec
pipeline does), fastattn's own chunk reads (`store.WholeChunks.read` on two threads, what
`fastattn stats` does), `zarr.open_array(...)[:]`, `fastattn.open_store(...).attention.values`
(xarray on dask) and tensorstore when it is installed. With `--codecs`, the attention
is also rewritten with no compression, blosc lz4 with and without byte shuffle, and zstd-1
(each with crc32c) into scratch stores and read back with zarr and with fastattn's chunk
reads: ratio and read speed of each codec.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec


def _chunk_files(array_path: Path) -> list[Path]:
    return [*array_path.glob("c.*"), *(p for p in (array_path / "c").rglob("*") if p.is_file())]  # files or folders


def _timed(fn) -> tuple[float, float]:
    """(wall, cpu) seconds of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def chunk_reads(store: Path, pool: ThreadPoolExecutor):
    """Every attention chunk of `store` read as `fastattn stats` reads it (`WholeChunks.read`)."""
    import itertools

    from fastattn import store as fastattn_store

    array = zarr.open_group(str(store), mode="r")["attention"]
    whole = fastattn_store.WholeChunks(fastattn_store.Location(str(store)), array)
    coords = list(itertools.product(*(range(-(-n // c)) for n, c in zip(array.shape, array.chunks))))
    return lambda: list(pool.map(lambda c: whole.read(c).shape, coords))


def routes(store: Path) -> dict:
    import fastattn

    array = store / "attention"
    files = _chunk_files(array)
    pool = ThreadPoolExecutor(os.cpu_count() or 2)
    meta = zarr.open_array(str(array), mode="r")
    blosc = next(c for c in meta.metadata.codecs if isinstance(c, BloscCodec)) if any(
        isinstance(c, BloscCodec) for c in meta.metadata.codecs) else None
    from numcodecs import Blosc

    decoder = Blosc(cname=blosc.cname.value, clevel=blosc.clevel, shuffle=Blosc.SHUFFLE) if blosc else None

    def raw():
        list(pool.map(Path.read_bytes, files))

    def decode():
        def one(path):
            data = path.read_bytes()[:-4]  # crc32c trailer
            return decoder.decode(data) if decoder else data
        list(pool.map(one, files))

    out = {
        "raw chunk files": raw,
        "decode (blosc, threads)": decode,
        "fastattn chunk reads (threads)": chunk_reads(store, pool),
        "zarr open_array[:]": lambda: zarr.open_array(str(array), mode="r")[:],
        "fastattn open_store .values": lambda: fastattn.open_store(store).attention.values,
    }
    try:
        import tensorstore as ts

        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(array)}}
        out["tensorstore read"] = lambda: ts.open(spec, read=True).result().read().result()
    except ImportError:
        pass
    return out


def rewrite(store: Path, codec: str, folder: Path) -> Path:
    """The store's attention in a scratch array with another codec, same chunks."""
    src = zarr.open_array(str(store / "attention"), mode="r")
    compressors = {
        "none": [Crc32cCodec()],
        "blosc-lz4": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()],
        "blosc-lz4-noshuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"), Crc32cCodec()],
        "zstd-1": [ZstdCodec(level=1), Crc32cCodec()],
    }[codec]
    path = folder / codec
    dst = zarr.create_array(str(path), name="attention", shape=src.shape, chunks=src.chunks, dtype=src.dtype,
                            fill_value=np.nan, compressors=compressors, overwrite=True)
    step = src.chunks[0]
    for b in range(0, src.shape[0], step):
        dst[b : b + step] = src[b : b + step]
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--codecs", action="store_true", help="also compare codecs on scratch copies")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    nbytes = zarr.open_array(str(args.store / "attention"), mode="r").nbytes
    disk = sum(p.stat().st_size for p in _chunk_files(args.store / "attention"))
    print(f"{args.store}: {nbytes / 1e9:.2f} GB of attention, {disk / 1e9:.2f} GB on disk, {os.cpu_count()} cores,"
          f" load {os.getloadavg()[0]:.1f}")
    todo = routes(args.store)
    scratch = Path(tempfile.mkdtemp(prefix="fastattn-read-"))
    try:
        if args.codecs:
            pool = ThreadPoolExecutor(os.cpu_count() or 2)
            for codec in ("none", "blosc-lz4", "blosc-lz4-noshuffle", "zstd-1"):
                path = rewrite(args.store, codec, scratch)
                size = sum(p.stat().st_size for p in _chunk_files(path / "attention"))
                todo[f"zarr [:] with {codec} (ratio {nbytes / size:.2f})"] = (lambda p=path: zarr.open_array(str(p / "attention"), mode="r")[:])
                if codec.startswith("blosc"):
                    todo[f"fastattn chunk reads with {codec}"] = chunk_reads(path, pool)
        for fn in todo.values():
            fn()  # warm: page cache, imports
        times = {name: [] for name in todo}
        for _ in range(args.repeats):
            for name, fn in todo.items():
                times[name].append(_timed(fn))
        print(f"{'route':48} {'wall s':>7} {'cpu s':>7} {'GB/s':>6}")
        for name, runs in times.items():
            wall = statistics.median(w for w, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            print(f"{name:48} {wall:7.3f} {cpu:7.3f} {nbytes / wall / 1e9:6.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
