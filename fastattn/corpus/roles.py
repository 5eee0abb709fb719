"""A role per head from per-batch rules on the attention mass (statistics only)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..summary import POSITION_MASS, SINK_SHARE
from .common import _batch_step


#: Per-batch rules, in priority order: a batch's label is the first rule that holds.
ROLE_RULES = (
    "previous-token",  # attention mass on key q − 1: prev_token = Σ_{q≥1} A[q,q−1] / n ≥ POSITION_MASS
    "next-token",      # next_token = Σ_{q≤n−2} A[q,q+1] / n ≥ POSITION_MASS
    "self",            # self_attention = Σ_q A[q,q] / n ≥ POSITION_MASS
    "first-token",     # key 0 receives at least SINK_SHARE of all attention (first_token = col_sum[0] / n)
    "last-token",      # key n − 1 receives at least SINK_SHARE of all attention (last_token)
    "single-key",      # some other key receives at least SINK_SHARE of all attention (peak_incoming / n)
    "local",           # mean attention distance ≤ min(LOCAL_DISTANCE, n / 8) tokens
    "broad",           # normalised entropy ≥ BROAD_ENTROPY
)
ROLES = ROLE_RULES + ("mixed",)
#: POSITION_MASS: share of all attention on the previous / next / same position that makes a
#: positional head: Clark et al. 2019's POSITION_THRESHOLD. Each row gives at most 1 to the
#: three together, so at most one of the three rules holds above 0.5; a perfect previous-token
#: head of length n scores (n − 1)/n, 0.75 at MIN_LENGTH. SINK_SHARE: share on one key.
#: Both are imported from `fastattn.summary`, whose findings (`fastattn stats`) test the same.
LOCAL_DISTANCE = 2.0
BROAD_ENTROPY = 0.85
#: A head gets a role when that label holds in at least this share of its batches.
ROLE_SHARE = 0.5
#: Samples shorter than this are not classified (every rule is trivial there).
MIN_LENGTH = 4

#: The attention-mass scores the positional and key rules test (statistics of the fused pass).
MASS_EVIDENCE = ("prev_token", "next_token", "self_attention", "first_token", "last_token")
#: Shares of the valid queries whose top key (argmax) is q − 1, q + 1, q: Voita et al.
#: 2019's positional evidence, reported beside the mass, not tested by the rules.
ARGMAX_EVIDENCE = ("prev_argmax", "next_argmax", "self_argmax")
EVIDENCE = (*MASS_EVIDENCE, "peak", *ARGMAX_EVIDENCE, "distance", "entropy")
ROLE_INPUTS = ("topk_index", *MASS_EVIDENCE, "peak_incoming", "distance_mean", "entropy_norm")


def evidence_arrays(top, planes, length=None) -> dict:
    """The numbers the role rules test, and the argmax shares, from plain arrays (see
    `role_evidence`).

    top (batch, layer, head, query): top key per query (−1 outside the valid rows);
    planes: a mapping with the per-plane statistics `ROLE_INPUTS[1:]`, each (batch, layer,
    head); length (batch,) or None (then each plane's count of valid rows). Returns
    float64 arrays of (batch, layer, head), and `length` as int64.
    """
    top = np.asarray(top)
    valid = top >= 0
    shape = top.shape[:3]
    if length is None:
        n = valid.sum(axis=-1).astype(np.int64)
    else:
        n = np.broadcast_to(np.asarray(length, dtype=np.int64).reshape((-1, 1, 1)), shape).copy()
    q = np.arange(top.shape[-1])

    def share(hit, among):
        count = among.sum(axis=-1)
        return np.where(count > 0, (hit & among).sum(axis=-1) / np.maximum(count, 1), np.nan)

    def plane(name):
        return np.asarray(planes[name], dtype=np.float64)

    out = {name: plane(name) for name in MASS_EVIDENCE}
    out["peak"] = plane("peak_incoming") / np.where(n > 0, n, np.nan)
    out["prev_argmax"] = share(top == q - 1, valid & (q >= 1))
    out["next_argmax"] = share(top == q + 1, valid & (q <= n[..., None] - 2))
    out["self_argmax"] = share(top == q, valid)
    out["distance"] = plane("distance_mean")
    out["entropy"] = plane("entropy_norm")
    out["length"] = n
    return out


def _evidence_blocks(stats: xr.Dataset, batch_chunk: int | None = None):
    """Yield the evidence (dict of numpy arrays) of consecutive blocks of batches; each
    block of statistics is loaded (or computed) once, then reduced with NumPy."""
    names = list(ROLE_INPUTS) + (["length"] if "length" in stats else [])
    view = stats[names].transpose("batch", "layer", "head", ...)
    n = stats.sizes["batch"]
    step = _batch_step(stats, names, batch_chunk)
    for start in range(0, n, step):
        block = view.isel(batch=slice(start, min(n, start + step))).compute()
        yield evidence_arrays(
            block["topk_index"].isel(rank=0).transpose("batch", "layer", "head", "query").values,
            {name: block[name].values for name in ROLE_INPUTS[1:]},
            block["length"].values if "length" in block else None,
        )


def role_evidence(stats: xr.Dataset, *, batch_chunk: int | None = None) -> xr.Dataset:
    """Per (batch, layer, head), in memory: the numbers the role rules test, and more.

    From the statistics only (never the attention): the attention mass `prev_token,
    next_token, self_attention` (share of all attention on key q − 1 / q + 1 / q, as in
    Clark et al. 2019 and TransformerLens), `first_token, last_token, peak` (share on key 0
    / key n − 1 / the most attended key), `distance` = `distance_mean`, `entropy` =
    `entropy_norm`; beside them the argmax evidence `prev_argmax, next_argmax,
    self_argmax` (share of the valid queries whose top key, `topk_index` rank 0, is q − 1
    among q ≥ 1 / q + 1 among q ≤ n − 2 / q); `length`. Computed a block of batches at a
    time.
    """
    parts = list(_evidence_blocks(stats, batch_chunk))
    dims = ("batch", "layer", "head")
    if not parts:
        shape = (0, stats.sizes["layer"], stats.sizes["head"])
        return xr.Dataset({name: (dims, np.zeros(shape)) for name in (*EVIDENCE, "length")})
    return xr.Dataset({name: (dims, np.concatenate([p[name] for p in parts])) for name in parts[0]})


def _rule_holds(ev: dict) -> dict:
    """Per-batch truth of every rule (numpy arrays of the evidence → booleans)."""
    n = ev["length"]
    with np.errstate(invalid="ignore"):  # NaN (cross-attention, empty planes) holds no rule
        return {
            "previous-token": ev["prev_token"] >= POSITION_MASS,
            "next-token": ev["next_token"] >= POSITION_MASS,
            "self": ev["self_attention"] >= POSITION_MASS,
            "first-token": ev["first_token"] >= SINK_SHARE,
            "last-token": ev["last_token"] >= SINK_SHARE,
            "single-key": ev["peak"] >= SINK_SHARE,
            "local": ev["distance"] <= np.minimum(LOCAL_DISTANCE, n / 8.0),
            "broad": ev["entropy"] >= BROAD_ENTROPY,
        }


def _role_blocks(stats: xr.Dataset, batch_chunk: int | None = None):
    """Yield `(evidence arrays, labels)` for consecutive blocks of batches: the evidence as
    `(batch, layer, head)` arrays, the labels as in `batch_roles`."""
    for arrays in _evidence_blocks(stats, batch_chunk):
        holds = _rule_holds(arrays)
        label = np.full(arrays["length"].shape, -1, dtype=np.int16)
        for i in range(len(ROLE_RULES) - 1, -1, -1):  # the lowest index wins
            label[np.asarray(holds[ROLE_RULES[i]], dtype=bool)] = i
        label[arrays["length"] < MIN_LENGTH] = -2
        yield arrays, label


def batch_roles(stats: xr.Dataset, *, batch_chunk: int | None = None) -> xr.DataArray:
    """The per-batch label of every (batch, layer, head), in memory: the index into
    `ROLE_RULES` of the first rule that holds, −1 when none holds, −2 for samples shorter
    than MIN_LENGTH (not classified)."""
    labels = [label for _, label in _role_blocks(stats, batch_chunk)]
    shape = (0, stats.sizes["layer"], stats.sizes["head"])
    data = np.concatenate(labels) if labels else np.zeros(shape, dtype=np.int16)
    return xr.DataArray(data, dims=("batch", "layer", "head"), attrs={"rules": list(ROLE_RULES)})


def head_roles(stats: xr.Dataset, *, share: float = ROLE_SHARE, batch_chunk: int | None = None) -> list[dict]:
    """The role of every (layer, head), one dict each, from the statistics of a corpus.

    Each batch gets the first rule of `ROLE_RULES` that holds (see `batch_roles`); a head's
    role is its most common batch label if that holds in at least `share` of the batches
    (of length ≥ MIN_LENGTH), else "mixed". Dict keys: `layer, head, label` ("L0H2"),
    `role`, `support` (share of batches with that label; for "mixed" the largest share),
    `batches`, `shares` ({rule: share} of every rule that labels any batch), and the mean
    over those batches of each `EVIDENCE`: the attention mass `prev_token, next_token,
    self_attention, first_token, last_token, peak`, the argmax shares `prev_argmax,
    next_argmax, self_argmax`, `distance`, `entropy` (see `role_evidence`). One pass, a
    block of batches at a time: memory does not grow with the corpus.
    """
    layers, heads = stats.sizes["layer"], stats.sizes["head"]
    counts = np.zeros((layers, heads, len(ROLE_RULES)), dtype=np.int64)
    total = np.zeros((layers, heads), dtype=np.int64)
    sums = {name: np.zeros((layers, heads)) for name in EVIDENCE}
    seen = {name: np.zeros((layers, heads), dtype=np.int64) for name in EVIDENCE}
    for arrays, label in _role_blocks(stats, batch_chunk):
        classified = label != -2
        total += classified.sum(axis=0)
        for i in range(len(ROLE_RULES)):
            counts[..., i] += (label == i).sum(axis=0)
        for name in EVIDENCE:
            ok = classified & ~np.isnan(arrays[name])
            sums[name] += np.where(ok, arrays[name], 0.0).sum(axis=0)
            seen[name] += ok.sum(axis=0)
    rows = []
    for layer in range(layers):
        for head in range(heads):
            c, t = counts[layer, head], int(total[layer, head])
            shares = {ROLE_RULES[i]: float(c[i] / t) for i in range(len(ROLE_RULES)) if c[i]}
            best = int(np.argmax(c))  # ties: the earlier rule
            best_share = float(c[best] / t) if t else 0.0
            role = ROLE_RULES[best] if c[best] and best_share >= share else "mixed"
            row = {
                "layer": layer, "head": head, "label": f"L{layer}H{head}",
                "role": role, "support": best_share, "batches": t, "shares": shares,
            }
            for name in EVIDENCE:
                k = seen[name][layer, head]
                row[name] = float(sums[name][layer, head] / k) if k else None
            rows.append(row)
    return rows
