"""Numba kernels: plain NumPy arrays in, arrays out; no xarray, no I/O.

Nothing is compiled at import: each kernel compiles on its first call, for the
signature of that call only, and the compiled code is cached on disk (see _jit).
Nor is Numba imported with this package: each name below loads its module on first
use, so reading the statistics' variable names (`names`) costs no Numba import.
"""

import importlib

_MODULES = {
    "attention_weights": "sdpa",
    "sdpa": "sdpa",
    "plane_stats": "stats",
    "topk": "stats",
    "attention_stats": "stats",
    "PlaneStats": "stats",
}

__all__ = list(_MODULES)


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
