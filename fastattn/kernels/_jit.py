"""How every kernel compiles, and the argument plumbing the kernels share.

Two jit aliases are used everywhere (the datashader/numbagg pattern) so that
compile options live in one place:

- ``ngjit``: single-threaded, releases the GIL (``nogil``) so Python threads and
  dask workers can run kernels side by side.
- ``ngjit_parallel``: the same plus ``parallel=True``; kernels use ``prange``
  over independent planes only, so each output element is written by one thread
  and results do not depend on the thread count.

Both compile lazily, on the first call with a new type signature; importing
``fastattn`` compiles nothing.  On-disk caching is opt-in with
``FASTATTN_NUMBA_CACHE=1`` (off by default: ``cache=True`` has known crashes
with multiprocessing and stale caches on shared file systems).

Fast-math is limited to ``reassoc`` (reductions may be reordered, which is what
lets LLVM vectorise them), ``contract`` (FMA) and ``nsz``.  ``nnan``/``ninf``
stay off because NaN is a real value here: it marks everything outside a
plane's valid block.  ``error_model="numpy"`` drops Python's division-by-zero
checks, which would otherwise put a branch in every vectorised loop.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator

import numba
import numpy as np

CACHE = os.environ.get("FASTATTN_NUMBA_CACHE", "").strip() == "1"
FASTMATH = {"reassoc", "contract", "nsz"}

ngjit = numba.njit(nogil=True, cache=CACHE, fastmath=FASTMATH, error_model="numpy")
ngjit_parallel = numba.njit(
    nogil=True, cache=CACHE, fastmath=FASTMATH, error_model="numpy", parallel=True
)

# One parallel kernel at a time per process.  A second caller (another Python
# thread) runs the single-threaded variant instead of waiting: threads never
# multiply past the cores, and nothing relies on the threading layer being
# re-entrant (Numba's "workqueue" layer is not).
_PARALLEL_SLOT = threading.Lock()


@contextmanager
def parallel_slot(want: bool) -> Iterator[bool]:
    """Yield whether this call may run the ``prange`` variant.

    True only if ``want`` and no other thread is inside a parallel kernel.
    Both variants run the same per-plane code, so the choice never changes
    results, only speed.
    """
    if not want or not _PARALLEL_SLOT.acquire(blocking=False):
        yield False
        return
    try:
        yield True
    finally:
        _PARALLEL_SLOT.release()


def float_dtype(*arrays: np.ndarray) -> np.dtype:
    """float32 if every input is float32, else float64."""
    dt = np.result_type(*arrays)
    return np.dtype(np.float32) if dt == np.float32 else np.dtype(np.float64)


def plane_lengths(lengths, lead: tuple[int, ...], limit: int) -> np.ndarray:
    """Per-plane valid lengths, shape ``(prod(lead),)`` int64, clipped to [0, limit].

    ``lengths`` is None (every plane fully valid) or an integer array whose
    shape is a prefix of ``lead``; it applies to every plane under that prefix,
    e.g. lengths of shape (B,) for planes laid out as (B, layer, head).
    """
    n_planes = int(np.prod(lead, dtype=np.int64))
    if lengths is None:
        return np.full(n_planes, limit, dtype=np.int64)
    lengths = np.asarray(lengths)
    if lengths.dtype.kind not in "iub":
        raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
    if lengths.shape != lead[: lengths.ndim]:
        raise ValueError(
            f"lengths shape {lengths.shape} is not a prefix of the leading dims {lead}"
        )
    lengths = lengths.astype(np.int64)
    if lengths.size and lengths.min() < 0:
        raise ValueError("lengths must be >= 0")
    expanded = lengths.reshape(lengths.shape + (1,) * (len(lead) - lengths.ndim))
    flat = np.broadcast_to(expanded, lead).reshape(n_planes)
    return np.minimum(flat, limit).astype(np.int64)
