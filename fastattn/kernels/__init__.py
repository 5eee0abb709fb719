"""Numba kernels: plain NumPy arrays in, arrays out; no xarray, no I/O.

Nothing is compiled at import: each kernel compiles on its first call, for the
signature of that call only, and the compiled code is cached on disk (see _jit).
"""

from .sdpa import attention_weights, sdpa
from .stats import PlaneStats, attention_stats, plane_stats, topk

__all__ = ["attention_weights", "sdpa", "plane_stats", "topk", "attention_stats", "PlaneStats"]
