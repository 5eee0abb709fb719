"""Realistic synthetic dumps for demos, tests and benchmarks.

Every weight is a real `softmax(Q Kᵀ / √d)` of random queries and keys. The structure
that statistics and plots should find is built into Q and K themselves, per head
role (fixed per (layer, head) for a whole corpus, from the seed), named as the role
`fastattn.corpus.head_roles` finds for it:

- ``self``:           position features cos/sin(ω·i) in both Q and K, so q·k peaks at i = j;
- ``previous-token``: the same with K's phase shifted by one, so q·k peaks at j = i − 1;
- ``first-token``:    a feature that is large for key 0 only ([CLS]-like sinks);
- ``single-key``:     the same for one "critical" key per file, chosen at random;
- ``broad``:          small random Q and K (near-uniform rows).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from .errors import FastattnError

ROLES = ("self", "previous-token", "first-token", "single-key", "broad")
FREQUENCIES = np.array([0.35, 0.7, 1.1, 1.6])


def head_roles(layers: int, heads: int, seed: int = 0) -> np.ndarray:
    """The role of every (layer, head): a (layers, heads) array of role names."""
    rng = np.random.default_rng([seed, 7])
    return np.asarray(ROLES, dtype=object)[rng.integers(0, len(ROLES), size=(layers, heads))]


def queries_keys(rng, roles: np.ndarray, length: int, head_dim: int = 16, critical: int = 0):
    """Q and K, (layer, head, length, head_dim + features), with each head's structure built in."""
    layers, heads = roles.shape
    nf = len(FREQUENCIES)
    width = head_dim + 2 * nf + 1
    q = np.zeros((layers, heads, length, width))
    k = np.zeros((layers, heads, length, width))
    q[..., :head_dim] = rng.standard_normal((layers, heads, length, head_dim))
    k[..., :head_dim] = rng.standard_normal((layers, heads, length, head_dim))
    pos = np.arange(length)[:, None] * FREQUENCIES[None, :]
    scale = np.sqrt(width)
    for layer in range(layers):
        for head in range(heads):
            role = roles[layer, head]
            qh, kh = q[layer, head], k[layer, head]
            if role in ("self", "previous-token"):
                shift = 1.0 if role == "previous-token" else 0.0
                strength = 2.6 * np.sqrt(scale)
                qh[:, head_dim : head_dim + nf] = strength * np.cos(pos)
                qh[:, head_dim + nf : head_dim + 2 * nf] = strength * np.sin(pos)
                kpos = (np.arange(length)[:, None] + shift) * FREQUENCIES[None, :]
                kh[:, head_dim : head_dim + nf] = np.sqrt(scale) * np.cos(kpos)
                kh[:, head_dim + nf : head_dim + 2 * nf] = np.sqrt(scale) * np.sin(kpos)
            elif role in ("first-token", "single-key"):
                target = 0 if role == "first-token" else min(critical, length - 1)
                qh[:, -1] = 4.0 * np.sqrt(scale)
                kh[target, -1] = np.sqrt(scale)
            elif role == "broad":
                qh *= 0.15
    return q, k


def sample_attention(rng, roles: np.ndarray, lengths, size: int, head_dim: int = 16) -> np.ndarray:
    """Attention of a batch: (layer, batch, head, size, size) float32, keys past each length masked."""
    from .kernels import attention_weights  # numba loads on first use

    layers, heads = roles.shape
    out = np.zeros((layers, len(lengths), heads, size, size), dtype=np.float32)
    for b, n in enumerate(lengths):
        q, k = queries_keys(rng, roles, size, head_dim, critical=int(rng.integers(0, n)))
        weights = attention_weights(q, k, lengths=np.full((layers, heads), n, dtype=np.int64))
        # Padded query rows attend over the valid keys, as a masked model computes them.
        if n < size:
            weights[:, :, n:, :n] = weights[:, :, n - 1 : n, :n]
        out[:, b] = weights
    return out


def parse_seq(seq: str | int | tuple[int, int]) -> tuple[int, int]:
    """'64' or 64 -> (64, 64); '24-64' -> (24, 64)."""
    if isinstance(seq, tuple):
        low, high = seq
    elif isinstance(seq, int):
        low = high = seq
    else:
        parts = str(seq).split("-")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise FastattnError(f"takes a length like 64 or a range like 24-64, not '{seq}'", parameter="seq")
        low, high = int(parts[0]), int(parts[-1])
    if not 1 <= low <= high:
        raise FastattnError(f"the range {low}-{high} must satisfy 1 <= min <= max", parameter="seq")
    return low, high


def synthesize(
    out_dir: str | os.PathLike,
    *,
    files: int = 100,
    layers: int = 6,
    heads: int = 12,
    seq: str | int | tuple[int, int] = 64,
    batch: int | None = None,
    seed: int = 0,
    head_dim: int = 16,
    jobs: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Write `files` dumps `attention_batch_NNNNN.npz` and return their paths.

    Without `batch`: `(layer, head, query, key)`, one text per file, its length drawn
    from `seq`. With `batch`: `(layer, batch, head, query, key)` plus `attention_mask`,
    padded to the longest sample of the file, as a batched inference script saves them.
    """
    low, high = parse_seq(seq)
    os.makedirs(out_dir, exist_ok=True)
    roles = head_roles(layers, heads, seed)
    paths = [os.path.join(out_dir, f"attention_batch_{i:05d}.npz") for i in range(files)]

    def write(i: int) -> str:
        rng = np.random.default_rng([seed, i])
        lengths = rng.integers(low, high + 1, size=batch or 1)
        size = int(lengths.max())
        attention = sample_attention(rng, roles, lengths, size, head_dim)
        if batch is None:
            np.savez(paths[i], attention_weights=attention[:, 0])
        else:
            mask = (np.arange(size)[None, :] < lengths[:, None]).astype(np.int8)
            np.savez(paths[i], attention_weights=attention, attention_mask=mask)
        return paths[i]

    with ThreadPoolExecutor(max(1, jobs or os.cpu_count() or 1)) as pool:
        for done, _ in enumerate(pool.map(write, range(files)), start=1):
            if progress:
                progress(done, files)
    return paths
