"""Kernel speed against the NumPy a user would otherwise write, on >= 1 GB of attention.

    python -m benchmarks.kernels [--gb 1.0] [--quick] [--repeats N] [--json PATH]

Data: float32 attention of shape (B, 6, 12, 64, 64) (MiniLM-sized planes), B
chosen to make ``--gb`` gigabytes, rows softmaxes of Gaussian logits.

Measured in one run, JIT warmed first, repetitions interleaved (each repetition
times every contender once, so machine noise hits all of them alike), medians:

- ``plane_stats`` against ``reference.numpy_plane_stats``: the same statistics
  with ordinary NumPy (sums, ``np.log`` entropy, max, diagonal, distance, squared
  sum, all accumulated in float64), over chunks of 16 samples so temporaries
  stay small (a stronger baseline than whole-array temporaries): the formulas
  the tests check the kernels with;
- ``topk`` against ``reference.numpy_topk``: ``np.argsort`` (stable, on −w) +
  ``take_along_axis``;
- ``plane_stats`` against a plain ``a.sum()``: one read of the array, the
  memory-bandwidth floor any single pass must pay;
- ``attention_stats``: every statistic, the per-plane summaries, the flags
  and the top-5 in one kernel call, float32 outputs (what ``compute_stats``
  runs), against the user guide's NumPy ops on the same array (row and column
  sums, ``np.log(a + 1e-10)`` entropy, ``np.argsort`` top-5, diagonal mean;
  ``baselines.guide_ops``), and against ``a.sum()``; also on one thread, and into outputs
  already written once (``fill``, as ``fastattn stats`` reuses two sets block after block);
- what fresh outputs cost before any statistic: allocating ``attention_stats``' outputs and
  writing each page once (the OS maps and zeroes them; ``a.sum()`` returns a scalar);
- the per-element floor of that kernel: the entropy alone (``Σ x·ln x`` per row with the
  kernel's own float32 log, accumulated in float64, on the kernel's threads), the one
  transcendental the statistics need per weight, against ``a.sum()``.

Each row: figure, fastattn_s, baseline_s, ratio (= baseline_s / fastattn_s,
the speed-up; < 1 for the floor row), gbps (array bytes / fastattn_s),
baseline (what was compared), and fastattn_cpu_s / baseline_cpu_s: CPU time of
the process (all threads).  On a shared machine the wall-clock ratio moves with
other people's load; the CPU-time ratio much less (but it counts the parallel
kernel's threads, and OpenMP spin-waiting, as work).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time

import numba
import numpy as np

from fastattn.kernels import plane_stats, topk
from fastattn.kernels._jit import ngjit, parallel_for
from fastattn.kernels.stats import _ln_native, attention_stats, empty_buffers, fill

from . import baselines
from .reference import numpy_plane_stats, numpy_topk

SAMPLE_SHAPE = (6, 12, 64, 64)  # layer, head, query, key
CHUNK = 16  # samples per chunk of the attention made here
TOPK = 8
GUIDE_K = 5  # the user guide's top-k


def make_attention(gb: float, seed: int = 0) -> np.ndarray:
    """float32 softmax attention of about ``gb`` gigabytes, shape (B, 6, 12, 64, 64)."""
    per_sample = np.prod(SAMPLE_SHAPE) * 4
    batch = max(1, math.ceil(gb * 1e9 / per_sample))
    a = np.empty((batch,) + SAMPLE_SHAPE, dtype=np.float32)
    rng = np.random.default_rng(seed)
    for i in range(0, batch, CHUNK):
        x = rng.standard_normal(a[i : i + CHUNK].shape, dtype=np.float32)
        x *= 2.0
        np.exp(x, out=x)
        x /= x.sum(axis=-1, keepdims=True)
        a[i : i + CHUNK] = x
    return a


def hot_loop_asm() -> dict[str, int] | None:
    """Count telling instructions in the compiled float32 plane_stats kernel; None when the
    kernel came from the disk cache, which Numba cannot inspect (it returns an empty listing).

    ymm operands mean 256-bit AVX2 vectors: ``vfmadd*ps`` on ymm is the float32
    log's polynomial running 8 lanes wide, ``vcvtps2pd``/``vfmadd231pd`` on ymm the float64
    accumulation 4 lanes wide; scalar code would show ``vdivss``/``vaddsd`` only.
    """
    import warnings

    from fastattn.kernels import stats

    plane_stats(np.full((1, 8, 8), 1 / 8, dtype=np.float32), parallel=False)
    kernel = stats._stats_planes
    sig = next(s for s in kernel.signatures if str(s[2].dtype) == "float32")  # (lo, hi, a, ...)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asm = kernel.inspect_asm(sig)
    if any("cached code" in str(w.message) for w in caught):
        return None
    patterns = {
        "vfmadd*ps ymm (8-lane float32 log)": r"vfmadd\w*ps\s+[^\n]*%ymm",
        "vcvtps2pd ymm (float32→float64, 4 lanes)": r"vcvtps2pd\s+[^\n]*%ymm",
        "vfmadd*pd ymm (4-lane float64 FMA)": r"vfmadd\w*pd\s+[^\n]*%ymm",
        "vdivss/vdivsd (scalar division)": r"vdiv[sS][sd]\s",
    }
    return {name: len(re.findall(pat, asm)) for name, pat in patterns.items()}


@ngjit
def _entropy_planes(lo, hi, a, out):
    """Σ x·ln x of every row of planes ``lo … hi − 1``: what is left of the kernel when
    everything but the log per weight is gone (the floor row).  Two loops per row, as in the
    kernel: the logs in the input's precision (8 float32 lanes), then the float64 sum (as one
    loop LLVM vectorised it worse: ~85 ns a 64-key row, not ~60)."""
    lnbuf = np.empty(a.shape[2], dtype=a.dtype)
    for p in range(lo, hi):
        for q in range(a.shape[1]):
            for j in range(a.shape[2]):
                lnbuf[j] = _ln_native(a[p, q, j])
            ent = 0.0
            for j in range(a.shape[2]):
                ent += np.float64(a[p, q, j]) * np.float64(lnbuf[j])
            out[p, q] = -ent


def entropy_only(a: np.ndarray) -> np.ndarray:
    """The row entropies of ``a`` (..., Q, K) alone, on the kernel's threads (``parallel_for``)."""
    planes = a.reshape((-1,) + a.shape[-2:])
    out = np.empty(planes.shape[:2])
    parallel_for(_entropy_planes, planes.shape[0], planes, out)
    return out


def fresh_outputs(a: np.ndarray, k: int) -> None:
    """Allocate ``attention_stats``' float32 outputs for ``a`` and write each of their pages once:
    what a call that returns new arrays pays the OS (page faults, zeroed pages) before computing,
    on repeated calls as here. The allocator reuses part of the memory freed by the call before
    (how much varies); a process's first call finds none to reuse and pays several times more."""
    planes = math.prod(a.shape[:-2])
    for array in empty_buffers(planes, a.shape[-2], a.shape[-1], k, np.float32):
        array.reshape(-1).view(np.uint8)[::4096] = 1


def _time(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def _check(a: np.ndarray) -> None:
    """The contenders agree on a slice (a benchmark of wrong answers is worthless)."""
    part = a[: min(4, a.shape[0])]
    ours, theirs = plane_stats(part), numpy_plane_stats(part)
    for name, want in theirs.items():
        np.testing.assert_allclose(getattr(ours, name), want, rtol=1e-5, atol=1e-9, err_msg=name)
    index, _ = topk(part, TOPK)
    np.testing.assert_array_equal(index, numpy_topk(part, TOPK)[0])
    fused = attention_stats(part, GUIDE_K, dtype=np.float32)
    for name, want in theirs.items():
        np.testing.assert_allclose(fused[name], want, rtol=1e-5, atol=1e-9, err_msg=name)
    np.testing.assert_allclose(entropy_only(part).reshape(theirs["entropy"].shape), theirs["entropy"], rtol=1e-5, atol=1e-9)
    guide = baselines.guide_ops(part, GUIDE_K)
    np.testing.assert_allclose(fused["diag"].mean(-1), guide[4], rtol=1e-5)
    np.testing.assert_array_equal(fused["topk_index"][..., 0], guide[3][..., -1])  # no ties in random weights


def run(gb: float = 1.0, repeats: int = 3, seed: int = 0) -> list[dict]:
    """Time every contender on ``gb`` GB of float32 attention; one dict per figure."""
    a = make_attention(gb, seed)
    _check(a)  # also compiles (warms) every kernel variant used below
    plane_stats(a[:1], parallel=False)
    attention_stats(a[:1], GUIDE_K, dtype=np.float32)
    planes = a.reshape((-1,) + a.shape[-2:])
    reused = empty_buffers(planes.shape[0], a.shape[-2], a.shape[-1], GUIDE_K, np.float32)
    fill(reused, planes)  # its pages now exist: the next calls pay no first touch
    contenders = {
        "plane_stats": lambda: plane_stats(a),
        "plane_stats_1thread": lambda: plane_stats(a, parallel=False),
        "numpy_stats": lambda: numpy_plane_stats(a),
        "topk": lambda: topk(a, TOPK),
        "numpy_topk": lambda: numpy_topk(a, TOPK),
        "np_sum": lambda: a.sum(),
        "all_stats": lambda: attention_stats(a, GUIDE_K, dtype=np.float32),
        "all_stats_1thread": lambda: attention_stats(a, GUIDE_K, dtype=np.float32, parallel=False),
        "all_stats_reused": lambda: fill(reused, planes),
        "fresh_outputs": lambda: fresh_outputs(a, GUIDE_K),
        "entropy_only": lambda: entropy_only(a),
        "guide_ops": lambda: baselines.guide_ops(a, GUIDE_K),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(_time(fn))
    t = {name: statistics.median(w for w, _ in v) for name, v in times.items()}
    cpu = {name: statistics.median(c for _, c in v) for name, v in times.items()}
    nbytes = a.nbytes
    threads = numba.config.NUMBA_NUM_THREADS  # what parallel kernel calls use

    def row(figure, ours, base, baseline):
        return {
            "figure": figure,
            "fastattn_s": t[ours],
            "baseline_s": t[base],
            "ratio": t[base] / t[ours],
            "gbps": nbytes / t[ours] / 1e9,
            "baseline": baseline,
            "fastattn_cpu_s": cpu[ours],
            "baseline_cpu_s": cpu[base],
        }

    return [
        row(f"plane_stats ({threads} threads)", "plane_stats", "numpy_stats", "numpy, same statistics"),
        row("plane_stats (parallel=False)", "plane_stats_1thread", "numpy_stats", "numpy, same statistics"),
        row(f"plane_stats vs floor ({threads} threads)", "plane_stats", "np_sum", "a.sum(): one read"),
        row(f"topk k={TOPK} ({threads} threads)", "topk", "numpy_topk", "np.argsort stable top-k"),
        {
            "figure": f"all statistics: plane_stats + topk ({threads} threads)",
            "fastattn_s": t["plane_stats"] + t["topk"],
            "baseline_s": t["numpy_stats"] + t["numpy_topk"],
            "ratio": (t["numpy_stats"] + t["numpy_topk"]) / (t["plane_stats"] + t["topk"]),
            "gbps": nbytes / (t["plane_stats"] + t["topk"]) / 1e9,
            "baseline": "numpy stats + argsort top-k",
            "fastattn_cpu_s": cpu["plane_stats"] + cpu["topk"],
            "baseline_cpu_s": cpu["numpy_stats"] + cpu["numpy_topk"],
        },
        row(f"all statistics + top-{GUIDE_K}, one kernel ({threads} threads)", "all_stats", "guide_ops",
            "the guide's NumPy ops"),
        row(f"all statistics + top-{GUIDE_K} vs floor ({threads} threads)", "all_stats", "np_sum", "a.sum(): one read"),
        row(f"all statistics + top-{GUIDE_K}, one kernel (parallel=False)", "all_stats_1thread", "np_sum",
            "a.sum(): one read"),
        row(f"all statistics + top-{GUIDE_K}, outputs reused ({threads} threads)", "all_stats_reused", "np_sum",
            "a.sum(): one read"),
        row(f"new outputs' first touch, repeated ({sum(b.nbytes for b in reused) / 1e6:.0f} MB, 1 thread)", "fresh_outputs",
            "np_sum", "a.sum(): one read"),
        row(f"entropy alone: one log per weight ({threads} threads)", "entropy_only", "np_sum", "a.sum(): one read"),
        row("np.sum (bandwidth floor)", "np_sum", "np_sum", "itself"),
    ]


def format_table(rows: list[dict], gb: float, shape: tuple[int, ...] | None = None) -> str:
    lines = [
        f"{'figure':52s} {'fastattn_s':>10s} {'baseline_s':>10s} {'ratio':>8s} {'GB/s':>7s} {'cpu ratio':>9s}  baseline",
    ]
    for r in rows:
        cpu_ratio = r["baseline_cpu_s"] / r["fastattn_cpu_s"]
        lines.append(
            f"{r['figure']:52s} {r['fastattn_s']:10.3f} {r['baseline_s']:10.3f} "
            f"{r['ratio']:7.2f}x {r['gbps']:7.2f} {cpu_ratio:8.2f}x  {r['baseline']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=None, help="GB of float32 attention (default 1.0; --quick 0.1)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repetitions (default 3; --quick 2)")
    parser.add_argument("--quick", action="store_true", help="small and fast: a smoke run, not a measurement")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    gb = args.gb if args.gb is not None else (0.1 if args.quick else 1.0)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    rows = run(gb=gb, repeats=repeats)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{gb:g} GB float32 attention, samples of {SAMPLE_SHAPE}, {repeats} interleaved repeats (medians), "
        f"kernel threads {numba.config.NUMBA_NUM_THREADS}, cpus {os.cpu_count()}, load avg {load:.2f}"
    )
    print(format_table(rows, gb))
    counts = hot_loop_asm()
    print("hot loop asm (float32 plane_stats):", "not available: the kernel came from the disk cache"
          " (FASTATTN_NUMBA_CACHE=0 compiles it here)" if counts is None else ", ".join(f"{k}: {v}" for k, v in counts.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
