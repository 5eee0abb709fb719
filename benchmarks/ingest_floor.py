"""The floor under `fastattn ingest`: what reading the dumps and compressing their bytes costs alone.

    /usr/bin/time -f "%e s %U u %S s" python -m benchmarks.ingest_floor DUMPS            # read + blosc
    /usr/bin/time -f "%e s %U u %S s" python -m benchmarks.ingest_floor DUMPS --all OUT  # + CRC-32, crc32c, write

One process, one thread, no fastattn and no zarr imported: each `DUMPS/*.npz` is read whole
(from the page cache when warm) and its bytes compressed with the attention's codec (blosc lz4,
level 5, no byte shuffle, typesize 4, numcodecs as zarr calls it). With `--all OUT`, also what
ingest cannot skip either: the zip CRC-32 of the bytes read, the crc32c of the compressed
bytes, and the compressed bytes written into OUT one file per 4 MiB of dumps read, as many files
as the store's chunks (`CHUNK_BYTES`): on a file system where creating a file is dear, one file
per dump would be slower than the command it is the floor of.
"""

from __future__ import annotations

import glob
import os
import sys

from crc32c import crc32c  # what fastattn computes zarr's checksum with
from isal.isal_zlib import crc32  # what ingest checks the zip members with
import numcodecs.blosc
import numpy as np

CHUNK_BYTES = 4 << 20  # fastattn.store.schema.CHUNK_BYTES: an attention chunk's uncompressed size


def main(argv: list[str]) -> None:
    if len(argv) not in (1, 3) or (len(argv) == 3 and argv[1] != "--all"):
        raise SystemExit("usage: python -m benchmarks.ingest_floor DUMPS [--all OUT]")
    out = argv[2] if len(argv) == 3 else None
    numcodecs.blosc.use_threads = False  # as zarr has it
    blosc = numcodecs.blosc.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.blosc.NOSHUFFLE, typesize=4)
    if out:
        os.makedirs(out, exist_ok=True)
    pending, read = [], 0  # compressed bytes not yet written, and how many bytes of dumps they hold
    files = 0
    for path in sorted(glob.glob(os.path.join(argv[0], "*.npz"))):
        with open(path, "rb") as f:
            data = f.read()
        packed = blosc.encode(np.frombuffer(data, dtype=np.uint8, count=len(data) // 4 * 4))
        if out:
            crc32(data)
            crc32c(packed)
            pending.append(packed)
            read += len(data)
            if read >= CHUNK_BYTES:
                _write(os.path.join(out, str(files)), pending)
                pending, read, files = [], 0, files + 1
    if pending:
        _write(os.path.join(out, str(files)), pending)


def _write(path: str, buffers: list[bytes]) -> None:
    with open(path, "wb") as f:
        for buffer in buffers:
            f.write(buffer)


if __name__ == "__main__":
    main(sys.argv[1:])
