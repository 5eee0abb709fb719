"""Numba kernels: plain NumPy arrays in, arrays out; no xarray, no I/O.

Nothing is compiled at import: each kernel compiles on its first call
(set FASTATTN_NUMBA_CACHE=1 to cache compiled code on disk).
"""

from .sdpa import attention_weights, sdpa
from .stats import PlaneStats, attention_stats, plane_stats, topk

__all__ = ["attention_weights", "sdpa", "plane_stats", "topk", "attention_stats", "PlaneStats"]
