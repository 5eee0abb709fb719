"""What changed per head between two stores."""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from ..choices import COMPARE_MATCHES, check_choice
from ..errors import FastattnError
from ..kernels import divergence as _divergence
from .statistics import corpus_stats


LN2 = math.log(2.0)


def match_batches(a: xr.Dataset, b: xr.Dataset, match: str = "position") -> tuple[np.ndarray, np.ndarray]:
    """Indices `(ia, ib)` of the batches paired between `a` and `b`.

    "position": the common prefix, batch i with batch i. "source": equal `(source,
    source_index)` (the same sample of the same dump file), in `a`'s order.
    """
    check_choice("match", match, COMPARE_MATCHES)
    if match == "position":
        n = min(a.sizes["batch"], b.sizes["batch"])
        return np.arange(n), np.arange(n)
    for name, ds in (("first", a), ("second", b)):
        if "source" not in ds or "source_index" not in ds:
            raise FastattnError(f"'source': the {name} dataset has no source/source_index", parameter="match")
    key_b: dict = {}
    for i, key in enumerate(zip(np.asarray(b["source"].values).tolist(), np.asarray(b["source_index"].values).tolist())):
        key_b.setdefault(key, i)
    pairs = []
    seen = set()
    for i, key in enumerate(zip(np.asarray(a["source"].values).tolist(), np.asarray(a["source_index"].values).tolist())):
        if key in key_b and key not in seen:
            seen.add(key)
            pairs.append((i, key_b[key]))
    ia = np.array([p[0] for p in pairs], dtype=np.int64)
    ib = np.array([p[1] for p in pairs], dtype=np.int64)
    return ia, ib


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """JS divergence (natural log) between the distributions `p[..., :]` and `q[..., :]`; 0·ln 0
    = 0, no smoothing. The head-similarity kernel with ε = 0, each pair one sample of two rows."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    rows = np.stack([p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])], axis=1)[:, :, None, :]
    return _divergence.pairwise_js(rows, eps=0.0, parallel=False)[:, 0, 1].reshape(p.shape[:-1])


def _normalise(x: np.ndarray, axis: int = -1) -> np.ndarray:
    total = x.sum(axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, x / np.where(total > 0, total, 1.0), 0.0)


def compare_stats(sa: xr.Dataset, sb: xr.Dataset) -> xr.Dataset:
    """The numeric core of `compare`: statistics of matched batches (same batch count, batch
    i of `sa` paired with batch i of `sb`) → per (layer, head) changes; see `compare`."""
    if sa.sizes["batch"] != sb.sizes["batch"]:
        raise ValueError("compare_stats needs matched batches (the same count on both sides)")
    if (sa.sizes["layer"], sa.sizes["head"]) != (sb.sizes["layer"], sb.sizes["head"]):
        raise FastattnError(
            f"the stores have different shapes: {sa.sizes['layer']}x{sa.sizes['head']}"
            f" and {sb.sizes['layer']}x{sb.sizes['head']} (layers x heads)"
        )
    n = sa.sizes["batch"]
    keys = max(sa.sizes["key"], sb.sizes["key"])
    out = xr.Dataset(coords={"layer": np.arange(sa.sizes["layer"]), "head": np.arange(sa.sizes["head"])})

    names = ["entropy_mean", "entropy_norm", "self_attention"]

    def reductions(st):  # lazy: both stores are reduced in one dask pass
        red = st[names].mean("batch", skipna=True)
        red["peak_counts"] = (st["peak_key"] == xr.DataArray(np.arange(keys), dims="peak")).sum("batch")
        red["incoming"] = st["col_sum"].fillna(0.0).astype(np.float64).sum("batch")
        return red.transpose("layer", "head", ...)

    import dask

    ra, rb = dask.compute(reductions(sa), reductions(sb))

    def parts(red):
        means = {name: np.asarray(red[name].values, dtype=np.float64) for name in names}
        total = np.asarray(red["incoming"].values)
        padded = np.zeros(total.shape[:2] + (keys,))
        padded[..., : total.shape[-1]] = total
        peaks = _normalise(np.asarray(red["peak_counts"].values, dtype=np.float64))
        return means, peaks, _normalise(padded)

    (ma, ha, ia), (mb, hb, ib) = parts(ra), parts(rb)
    dims = ("layer", "head")
    out["entropy_a"] = dims, ma["entropy_mean"]
    out["entropy_b"] = dims, mb["entropy_mean"]
    out["d_entropy"] = dims, mb["entropy_mean"] - ma["entropy_mean"]
    out["d_entropy_norm"] = dims, mb["entropy_norm"] - ma["entropy_norm"]
    out["self_a"] = dims, ma["self_attention"]
    out["self_b"] = dims, mb["self_attention"]
    out["d_self"] = dims, mb["self_attention"] - ma["self_attention"]
    out["peak_tv"] = dims, 0.5 * np.abs(ha - hb).sum(-1)
    out["incoming_js"] = dims, js_divergence(ia, ib)
    score = (
        np.nan_to_num(np.abs(out["d_entropy_norm"].values))
        + np.nan_to_num(np.abs(out["d_self"].values))
        + out["peak_tv"].values
        + out["incoming_js"].values / LN2
    )
    out["score"] = dims, score
    out.attrs = {"batches": n}
    return out


def compare(a, b, match: str = "position", *, entropy_smoothing: float = 0.0) -> xr.Dataset:
    """What changed per (layer, head) from store `a` to store `b` (paths or Datasets).

    Batches are paired by `match_batches` ("position" or "source"). Over the matched
    batches, per (layer, head):

    - `d_entropy` = mean entropy(b) − mean entropy(a) (nats; also `d_entropy_norm`);
    - `d_self` = mean self-attention(b) − (a);
    - `peak_tv` = total variation ½Σ_k |h_a(k) − h_b(k)| between the histograms of the
      peak key (the key with the most incoming attention) over the batches;
    - `incoming_js` = JS divergence (natural log) between the mean incoming attention
      `Σ_batches col_sum` normalised to sum to 1 (keys past a sample's length count 0);
    - `score` = |d_entropy_norm| + |d_self| + peak_tv + incoming_js / ln 2: four terms
      each in [0, 1], so 0 ≤ score ≤ 4; `ranked_changes` sorts by it.

    `entropy_smoothing` > 0: the entropies are Clark et al. 2019's, of smoothed rows
    (`corpus_stats`).
    """
    sa = corpus_stats(a, entropy_smoothing=entropy_smoothing)
    sb = corpus_stats(b, entropy_smoothing=entropy_smoothing)
    ia, ib = match_batches(sa, sb, match)
    if len(ia) == 0:
        raise FastattnError(f"no batches match between the two stores (match={match})")
    keep = [v for v in ("entropy_mean", "entropy_norm", "self_attention", "peak_key", "col_sum") if v in sa]
    ma = sa[keep].isel(batch=ia).assign_coords(batch=np.arange(len(ia)))
    mb = sb[keep].isel(batch=ib).assign_coords(batch=np.arange(len(ib)))
    out = compare_stats(ma, mb)
    out.attrs.update({
        "match": match,
        "batches_a": int(sa.sizes["batch"]),
        "batches_b": int(sb.sizes["batch"]),
        "a": str(sa.attrs.get("store") or ""),
        "b": str(sb.attrs.get("store") or ""),
        "entropy_smoothing": float(entropy_smoothing),
    })
    return out


CHANGE_FIELDS = ("d_entropy", "d_entropy_norm", "d_self", "peak_tv", "incoming_js", "score")


def ranked_changes(cmp: xr.Dataset, top: int | None = None) -> list[dict]:
    """The heads by descending `score` (ties: by layer, then head), as plain dicts."""
    rows = []
    for layer in range(cmp.sizes["layer"]):
        for head in range(cmp.sizes["head"]):
            row = {"layer": layer, "head": head, "label": f"L{layer}H{head}"}
            for name in ("entropy_a", "entropy_b", "self_a", "self_b", *CHANGE_FIELDS):
                value = float(cmp[name].values[layer, head])
                row[name] = None if math.isnan(value) else value
            rows.append(row)
    rows.sort(key=lambda r: (-(r["score"] or 0.0), r["layer"], r["head"]))
    return rows[:top] if top is not None else rows
