"""The `.attn` accessor: attention statistics on any xarray object with `query` and `key` dims.

    ds = fastattn.open_store("store.zarr")
    ds.attn.entropy()              # (batch, layer, head, query), lazy on dask-backed data
    ds.attention.sel(layer=5).attn.incoming()
    ds.attn.stats()                # everything compute_stats gives

Works on plain DataArrays too (not only fastattn stores): without a `length` variable
every plane is valid as a whole.
"""

from __future__ import annotations

import xarray as xr

# fastattn.stats is imported by the methods: registering the accessor needs xarray only, so it
# can run from the hook in fastattn/__init__ while fastattn.stats is itself importing xarray.


class _AttentionAccessor:
    def __init__(self, obj: xr.Dataset | xr.DataArray):
        self._obj = obj

    def _parts(self) -> tuple[xr.DataArray, xr.DataArray | None]:
        obj = self._obj
        if isinstance(obj, xr.Dataset):
            if "attention" not in obj:
                raise ValueError("the Dataset has no 'attention' variable")
            return obj["attention"], obj.get("length")
        if "query" not in obj.dims or "key" not in obj.dims:
            raise ValueError(f"attention needs 'query' and 'key' dims, this has {obj.dims}")
        return obj, None

    def _per_query(self, k: int = 1) -> xr.Dataset:
        from .stats import per_query_stats

        attention, length = self._parts()
        return per_query_stats(attention, length, k=k)

    def entropy(self) -> xr.DataArray:
        """−Σ_k A ln A per query (natural log, 0·ln 0 = 0); NaN outside the valid block."""
        return self._per_query().entropy

    def incoming(self) -> xr.DataArray:
        """Σ_q A[q, k] per key: the attention each key receives."""
        return self._per_query().col_sum

    def topk(self, k: int = 5) -> xr.Dataset:
        """`topk_index` and `topk_weight` (…, query, rank): the k strongest keys per query."""
        return self._per_query(k)[["topk_index", "topk_weight"]]

    def self_attention(self) -> xr.DataArray:
        """Mean of the diagonal A[q, q] over valid queries, per plane (NaN for q ≠ k)."""
        return self._per_query().diag.mean("query")

    def stats(self, k: int = 5) -> xr.Dataset:
        """Every statistic and flag of `fastattn.compute_stats`."""
        from .stats import compute_stats

        attention, length = self._parts()
        obj = xr.Dataset({"attention": attention}) if length is None else xr.Dataset({"attention": attention, "length": length})
        return compute_stats(obj, k=k)


xr.register_dataset_accessor("attn")(_AttentionAccessor)
xr.register_dataarray_accessor("attn")(_AttentionAccessor)
