"""What the duplicate-token and induction scores cost the fused statistics kernel.

`python -m benchmarks.repeats [--batches 32] [--seq 128] [--repeats 5]`: the kernel
(`attention_stats`, float32, top-5, one thread) on random (batches, 6, 12, seq, seq)
attention without token ids and with three kinds of ids: text-like (30,000 ids, hardly a
repeat), the classic induction input (a run repeated twice: seq/2 pairs per sample) and a
5-id vocabulary (~seq²/10 pairs, far more repeats than text). Medians of interleaved runs,
each case warmed first; the time includes finding the pairs (`kernels.stats.repeats`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fastattn.kernels.stats import attention_stats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    n = args.seq
    a = rng.random((args.batches, 6, 12, n, n), dtype=np.float32)
    a /= a.sum(axis=-1, keepdims=True)
    half = rng.integers(0, 30_000, (args.batches, n // 2))
    cases = {
        "no ids": None,
        "text-like ids (30,000)": rng.integers(0, 30_000, (args.batches, n)),
        "a run repeated twice": np.concatenate([half, half], axis=1),
        "5 ids (~n²/10 pairs)": rng.integers(0, 5, (args.batches, n)),
    }
    for ids in cases.values():
        attention_stats(a[:1], 5, ids=None if ids is None else ids[:1], parallel=False, dtype=np.float32)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, ids in cases.items():
            start = time.perf_counter()
            attention_stats(a, 5, ids=ids, parallel=False, dtype=np.float32)
            times[name].append(time.perf_counter() - start)
    base = np.median(times["no ids"])
    print(f"{a.nbytes / 1e6:.0f} MB of float32 attention, {args.batches} x 6 x 12 planes of {n} x {n}, one thread")
    for name, values in times.items():
        print(f"{name:26s} {np.median(values):.3f} s  ({np.median(values) / base:.2f}x)")


if __name__ == "__main__":
    main()
