"""What a researcher would write without fastattn: the baselines every benchmark compares against.

Written as a competent user writes them: vectorised NumPy over whole arrays, in-place
where it is natural, library defaults where a user would not think to change them.
They are deliberately not tuned down — a faster honest baseline is always welcome here —
and they do less than fastattn does (no validation, no content hashes, no lengths,
fewer statistics), which favours them.
"""

from __future__ import annotations

import glob
import os
import sys
import warnings

import numpy as np

DIMS = ("batch", "layer", "head", "query", "key")


# ---------------------------------------------------------------- ingest


def xarray_ingest(paths: list[str], store_path: str | os.PathLike, group_size: int = 100) -> None:
    """The straightforward consolidation: `np.load` each dump, one `xarray` object per file,
    `xr.concat` them in groups of `group_size` files, and `to_zarr` each group, appending
    along `batch` (the first group creates the store). Zarr's default chunks and codec."""
    import xarray as xr

    with warnings.catch_warnings():
        # xarray/zarr warn that consolidated metadata is not in the Zarr v3 spec yet; harmless here.
        warnings.simplefilter("ignore")
        for start in range(0, len(paths), group_size):
            group = paths[start : start + group_size]
            arrays = []
            for path in group:
                with np.load(path) as npz:
                    attention = npz["attention_weights"]  # (layer, head, query, key)
                arrays.append(
                    xr.DataArray(
                        attention[np.newaxis],
                        dims=DIMS,
                        coords={"source": ("batch", [os.path.basename(path)])},
                        name="attention",
                    )
                )
            ds = xr.concat(arrays, dim="batch").to_dataset()
            if start == 0:
                ds.to_zarr(store_path, mode="w")
            else:
                ds.to_zarr(store_path, append_dim="batch")


# ---------------------------------------------------------------- statistics


def guide_stats(paths: list[str], out_path: str | os.PathLike) -> None:
    """The attention guide's per-file loop, as written there: for each dump, `np.load`, row and
    column sums, entropy with a 1e-10 epsilon, the top 5 keys per query by `np.argsort`
    (ascending, so the last five), the mean of the diagonal; results kept in lists and saved
    at the end with `np.savez` (which stacks each list into one array)."""
    row_sums, col_sums, entropies, top5, diag_means = [], [], [], [], []
    for f in paths:
        a = np.load(f, allow_pickle=False)["attention_weights"]  # allow_pickle=False is np.load's default
        row_sums.append(a.sum(-1))
        col_sums.append(a.sum(-2))
        entropies.append(-(a * np.log(a + 1e-10)).sum(-1))
        top5.append(np.argsort(a, -1)[..., -5:])
        diag_means.append(np.diagonal(a, axis1=-2, axis2=-1).mean(-1))
    np.savez(out_path, row_sum=row_sums, col_sum=col_sums, entropy=entropies, top5=top5, diag_mean=diag_means)



def per_file_stats(paths: list[str], out_path: str | os.PathLike, k: int = 5) -> None:
    """The guide's per-file loop: for each dump, `np.load`, row and column sums, entropy,
    and the top-`k` keys per query by `argsort`; then save everything in one `.npz`.

    Each file's statistics are computed on the whole (layer, head, query, key) array at once.
    """
    row_sum, col_sum, entropy, top_index, top_weight = [], [], [], [], []
    for path in paths:
        with np.load(path) as npz:
            a = npz["attention_weights"]
        row_sum.append(a.sum(axis=-1))
        col_sum.append(a.sum(axis=-2))
        log_a = np.log(a, out=np.zeros_like(a), where=a > 0)  # 0·ln 0 = 0
        entropy.append(-(a * log_a).sum(axis=-1))
        order = np.argsort(-a, axis=-1, kind="stable")[..., :k]
        top_index.append(order.astype(np.int32))
        top_weight.append(np.take_along_axis(a, order, axis=-1))
    np.savez(
        out_path,
        row_sum=np.stack(row_sum),
        col_sum=np.stack(col_sum),
        entropy=np.stack(entropy),
        topk_index=np.stack(top_index),
        topk_weight=np.stack(top_weight),
    )


def guide_ops(a: np.ndarray, k: int = 5) -> tuple:
    """The user guide's NumPy statistics of one array, verbatim: row and column sums, entropy
    with an epsilon, the top-`k` keys by `argsort`, and the mean of the diagonal."""
    return (
        a.sum(-1),
        a.sum(-2),
        -(a * np.log(a + 1e-10)).sum(-1),
        np.argsort(a, -1)[..., -k:],
        np.diagonal(a, axis1=-2, axis2=-1).mean(-1),
    )


def guide_loop(paths: list[str], k: int = 5) -> list[tuple]:
    """The user guide's per-file loop: `np.load` each dump, then `guide_ops`. Nothing is saved;
    the results are kept (and returned) so every one is really computed."""
    return [guide_ops(np.load(path, allow_pickle=False)["attention_weights"], k) for path in paths]


# ---------------------------------------------------------------- attention weights


def numpy_attention_weights(q: np.ndarray, k: np.ndarray, scale: float | None = None) -> np.ndarray:
    """softmax(q·kᵀ·scale) in float32 NumPy: batched matmul (BLAS), max subtracted, in place."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ np.swapaxes(k, -1, -2)
    s *= np.float32(scale)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def torch_attention_weights(q, k, scale: float | None = None):
    """softmax(q·kᵀ·scale) in float32 PyTorch (torch tensors in, tensor out)."""
    import torch

    scale = 1.0 / q.shape[-1] ** 0.5 if scale is None else scale
    with torch.inference_mode():
        return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)


def torch_sdpa(q, k, v):
    """torch.nn.functional.scaled_dot_product_attention, float32 (torch tensors in, tensor out)."""
    import torch

    with torch.inference_mode():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def numpy_sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax(q·kᵀ/√d)·v in float32 NumPy."""
    return numpy_attention_weights(q, k) @ v


# ---------------------------------------------------------------- as a whole process

#: `python -m benchmarks.baselines NAME DUMPS OUT`: the baseline over DUMPS/*.npz, sorted by name.
COMMANDS = {"guide": guide_stats, "per-file": per_file_stats, "xarray-ingest": xarray_ingest}


def main(argv: list[str]) -> None:
    """Run one baseline as its own process, as a user runs a script (the whole-process figures)."""
    if len(argv) != 3 or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m benchmarks.baselines {{{','.join(COMMANDS)}}} DUMPS OUT")
    name, dumps, out = argv
    COMMANDS[name](sorted(glob.glob(os.path.join(dumps, "*.npz"))), out)


if __name__ == "__main__":
    main(sys.argv[1:])
