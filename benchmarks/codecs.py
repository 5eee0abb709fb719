"""Pick the store's codec by measurement: ratio and decode speed on real attention.

    python -m benchmarks.codecs [SAMPLES_DIR]

Reads every dump under SAMPLES_DIR (default: tests/data/minilm), lays the samples
out as the store does (NaN outside each valid block, one chunk per layer) and
times each candidate codec's encode and decode over the same bytes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from numcodecs import Blosc, Zstd

from fastattn import dumps

CANDIDATES = {
    "zstd-1": Zstd(level=1),
    "zstd-3": Zstd(level=3),
    "blosc-lz4-shuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE),
    "blosc-lz4-noshuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.NOSHUFFLE),
    "blosc-zstd1-shuffle": Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE),
    "blosc-zstd1-bitshuffle": Blosc(cname="zstd", clevel=1, shuffle=Blosc.BITSHUFFLE),
}


def store_layout_chunks(folder: Path) -> list[np.ndarray]:
    """Per-layer chunks of each dump, padded with NaN to the longest sequence."""
    loaded = [dumps.read(dumps.scan(str(p))) for p in sorted(folder.rglob("*.npz"))]
    size = max(d.attention.shape[-1] for d in loaded)
    chunks = []
    for d in loaded:
        padded = np.full(d.attention.shape[:3] + (size, size), np.nan, dtype=np.float32)
        for b, n in enumerate(d.lengths):
            padded[b, :, :, :n, :n] = d.attention[b, :, :, :n, :n]
        chunks.extend(np.ascontiguousarray(padded[:, layer]) for layer in range(padded.shape[1]))
    return chunks


def measure(chunks: list[np.ndarray], repeats: int = 5) -> list[dict]:
    raw = sum(c.nbytes for c in chunks)
    rows = []
    for name, codec in CANDIDATES.items():
        encoded = [codec.encode(c) for c in chunks]
        enc, dec = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            for c in chunks:
                codec.encode(c)
            enc.append(time.perf_counter() - t)
            t = time.perf_counter()
            for e in encoded:
                codec.decode(e)
            dec.append(time.perf_counter() - t)
        size = sum(len(e) for e in encoded)
        rows.append(
            {
                "codec": name,
                "ratio": raw / size,
                "encode_MBps": raw / np.median(enc) / 1e6,
                "decode_MBps": raw / np.median(dec) / 1e6,
            }
        )
    return rows


def main(argv: list[str]) -> None:
    folder = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "tests" / "data" / "minilm"
    chunks = store_layout_chunks(folder)
    print(f"{sum(c.nbytes for c in chunks) / 1e6:.1f} MB of attention from {folder}")
    print(f"{'codec':24} {'ratio':>6} {'encode MB/s':>12} {'decode MB/s':>12}")
    for row in measure(chunks):
        print(f"{row['codec']:24} {row['ratio']:6.3f} {row['encode_MBps']:12.0f} {row['decode_MBps']:12.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
