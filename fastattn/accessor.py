"""The `.attn` accessor: attention statistics on any xarray object with `query` and `key` dims.

    ds = fastattn.open_store("store.zarr")
    ds.attn.entropy()              # (batch, layer, head, query), lazy on dask-backed data
    ds.attention.sel(layer=5).attn.incoming()
    ds.attn.stats()                # everything compute_stats gives

Works on plain DataArrays too (not only fastattn stores): without a `length` variable
every plane is valid as a whole. Every method is `compute_stats` (the same fused kernel over
the same blocks) and picks its variables, so a notebook pays what `fastattn stats` pays.
"""

from __future__ import annotations

import xarray as xr

# fastattn.stats is imported by the methods: registering the accessor needs xarray only, so it
# can run from the hook in fastattn/__init__ while fastattn.stats is itself importing xarray.


class _AttentionAccessor:
    def __init__(self, obj: xr.Dataset | xr.DataArray):
        self._obj = obj

    def _stats(self, k: int = 1) -> xr.Dataset:
        from .stats import compute_stats

        obj = self._obj
        if isinstance(obj, xr.Dataset) and "attention" not in obj:
            raise ValueError("the Dataset has no 'attention' variable")
        return compute_stats(obj, k=k)

    def entropy(self) -> xr.DataArray:
        """−Σ_k A ln A per query (natural log, 0·ln 0 = 0); NaN outside the valid block."""
        return self._stats().entropy

    def incoming(self) -> xr.DataArray:
        """Σ_q A[q, k] per key: the attention each key receives."""
        return self._stats().col_sum

    def topk(self, k: int = 5) -> xr.Dataset:
        """`topk_index` and `topk_weight` (…, query, rank): the k strongest keys per query."""
        return self._stats(k)[["topk_index", "topk_weight"]]

    def self_attention(self) -> xr.DataArray:
        """Mean of the diagonal A[q, q] over valid queries, per plane (NaN for q ≠ k)."""
        return self._stats().self_attention

    def stats(self, k: int = 5) -> xr.Dataset:
        """Every statistic and flag of `fastattn.compute_stats`."""
        return self._stats(k)


xr.register_dataset_accessor("attn")(_AttentionAccessor)
xr.register_dataarray_accessor("attn")(_AttentionAccessor)
