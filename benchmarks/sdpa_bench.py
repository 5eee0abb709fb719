"""SDPA figure: the Numba `attention_weights` kernel vs NumPy float32 and PyTorch.

Shapes as an inference run makes them (default batch 64, heads 12, seq 128, d 64),
float32 in, float32 weights out. GB/s counts the weights written, (batch, heads, seq, seq)
float32. The torch rows use torch's default threads (all cores), like the kernel.
"""

from __future__ import annotations

import numpy as np

from . import baselines
from .runner import Context, interleave, median, row, skipped

FIGURE = "sdpa"


def figure(ctx: Context) -> list[dict]:
    from fastattn.kernels import attention_weights, sdpa

    c = ctx.config
    batch, heads, seq, d = c.sdpa_shape
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((batch, heads, seq, d), dtype=np.float32) for _ in range(3))
    nbytes = batch * heads * seq * seq * 4
    shape = f"({batch}, {heads}, {seq}, {d}) float32"

    # Same results first: a benchmark of a wrong answer is worthless.
    ours = attention_weights(q, k)
    theirs = baselines.numpy_attention_weights(q, k)
    error = float(np.abs(ours - theirs).max())
    if error > 1e-4:
        raise AssertionError(f"attention_weights differs from the NumPy softmax by {error:g}")

    rows = []
    cpu = {}
    times = interleave(
        {"fastattn": lambda: attention_weights(q, k), "numpy": lambda: baselines.numpy_attention_weights(q, k)},
        c.sdpa_repeats,
        log=ctx.log,
        cpu=cpu,
    )
    fa, np_ = median(times["fastattn"]), median(times["numpy"])
    rows.append(
        row(FIGURE, f"attention_weights vs NumPy float32 {shape}", fastattn=fa, baseline=np_, nbytes=nbytes,
            goal="≥ 2×", met=np_ / fa >= 2, times=times, cpu=_cpu(cpu, "numpy"), max_abs_error=error)
    )

    try:
        import torch
    except ImportError:
        rows.append(skipped(FIGURE, f"attention_weights vs torch {shape}", "torch is not importable"))
        rows.append(skipped(FIGURE, f"sdpa vs torch scaled_dot_product_attention {shape}", "torch is not importable"))
        return rows

    # torch's default thread count (all cores). Never torch.set_num_threads() here: called after
    # Numba's OpenMP pool has started (same libgomp), it made torch's SDPA ~40x slower on this machine.
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    cpu = {}
    times = interleave(
        {"fastattn": lambda: attention_weights(q, k), "torch": lambda: baselines.torch_attention_weights(tq, tk)},
        c.sdpa_repeats,
        log=ctx.log,
        cpu=cpu,
    )
    fa, th = median(times["fastattn"]), median(times["torch"])
    rows.append(
        row(FIGURE, f"attention_weights vs torch softmax(q·kᵀ) {shape}", fastattn=fa, baseline=th,
            nbytes=nbytes, times=times, cpu=_cpu(cpu, "torch"), torch=torch.__version__,
            torch_threads=torch.get_num_threads())
    )
    cpu = {}
    times = interleave(
        {"fastattn": lambda: sdpa(q, k, v), "torch": lambda: baselines.torch_sdpa(tq, tk, tv)},
        c.sdpa_repeats,
        log=ctx.log,
        cpu=cpu,
    )
    fa, th = median(times["fastattn"]), median(times["torch"])
    rows.append(
        row(FIGURE, f"sdpa vs torch scaled_dot_product_attention {shape}", fastattn=fa, baseline=th,
            times=times, cpu=_cpu(cpu, "torch"), torch=torch.__version__, torch_threads=torch.get_num_threads())
    )
    return rows


def _cpu(cpu: dict, baseline: str) -> tuple[float, float]:
    return median(cpu["fastattn"]), median(cpu[baseline])
