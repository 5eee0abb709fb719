"""Numba kernels: plain NumPy arrays in, arrays out; no xarray, no I/O."""
