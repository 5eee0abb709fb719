"""Plain-data descriptions of stores and dumps (what `fastattn info` shows); no printing."""

from __future__ import annotations

import warnings

import numpy as np

from . import store


def store_info(location, *, storage_options: dict | None = None, bins: int = 8) -> dict:
    """Batches, shape, length histogram, size on disk and compression, sources, last ingest."""
    loc = store.as_location(location, storage_options)
    manifest = store.checked_manifest(loc)
    group = store.open_group(loc, mode="r")
    n = manifest.committed
    lengths = np.asarray(group["length"][:n]) if n else np.zeros(0, dtype=np.int32)
    maps = not manifest.stats_only  # a store of statistics captured from a model holds no attention
    stored = loc.nbytes("attention") if maps else 0
    shape = group["attention"].shape[1:] if maps else (manifest.layers, manifest.heads, manifest.max_length, manifest.max_length)
    logical = n * int(np.prod(shape)) * np.dtype(manifest.dtype).itemsize if maps else 0
    counts, edges = np.histogram(lengths, bins=min(bins, max(1, len(np.unique(lengths))))) if n else ([], [])
    return {
        "store": str(loc),
        "batches": n,
        "layers": manifest.layers,
        "heads": manifest.heads,
        "max_length": manifest.max_length,
        "dtype": manifest.dtype,
        "chunks": list(group["attention"].chunks) if maps else [],
        "stats_only": manifest.stats_only,
        "length_min": int(lengths.min()) if n else 0,
        "length_max": int(lengths.max()) if n else 0,
        "length_histogram": [
            {"from": float(edges[i]), "to": float(edges[i + 1]), "count": int(c)} for i, c in enumerate(counts)
        ],
        "attention_bytes": int(logical),
        "stored_bytes": int(stored),
        "size_on_disk": int(loc.nbytes()),
        "compression_ratio": (logical / stored) if stored else None,
        "source_files": sum(1 for e in manifest.files.values() if e.ingested),
        "stats_batches": (store.derived_record(store.schema.STATS, manifest) or {"batches": 0})["batches"],
        "last_ingest": manifest.ingests[-1] if manifest.ingests else None,
    }


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


def format_store(info: dict) -> str:
    lines = [
        f"store        {info['store']}",
        f"batches      {info['batches']:,}   layers {info['layers']}   heads {info['heads']}"
        f"   max length {info['max_length']}   dtype {info['dtype']}",
        f"lengths      {info['length_min']} to {info['length_max']}",
    ]
    peak = max((b["count"] for b in info["length_histogram"]), default=0)
    for b in info["length_histogram"]:
        bar = "#" * (round(30 * b["count"] / peak) if peak else 0)
        lines.append(f"  {b['from']:6.0f} - {b['to']:<6.0f} {b['count']:8,}  {bar}")
    ratio = info["compression_ratio"]
    if info.get("stats_only"):
        lines += [
            f"size         {_mb(info['size_on_disk'])} on disk; no attention maps (statistics captured from a model)",
            f"sources      {info['source_files']:,} texts",
        ]
    else:
        lines += [
            f"size         {_mb(info['size_on_disk'])} on disk; attention {_mb(info['attention_bytes'])}"
            f" stored in {_mb(info['stored_bytes'])}" + (f" (ratio {ratio:.2f})" if ratio else ""),
            f"chunks       {tuple(info['chunks'])}",
            f"sources      {info['source_files']:,} files",
        ]
    lines += [
        f"statistics   {info['stats_batches']:,} of {info['batches']:,} batches",
    ]
    last = info["last_ingest"]
    if last:
        lines.append(
            f"last ingest  {last['time']}: {last['files']} files, {last['batches']} batches,"
            f" {last['rejected']} rejected, {last['seconds']} s"
        )
    return "\n".join(lines)


def format_dump(info: dict) -> str:
    lines = [
        f"dump     {info['path']} ({info['size']:,} bytes)",
        f"layout   {info['layout']} (samples {info['samples']}, layers {info['layers']}, heads {info['heads']},"
        f" query {info['query']}, key {info['key']})",
        "arrays",
    ]
    for a in info["arrays"]:
        used = "" if a["name"] in info["used"] else "   (ignored)"
        lines.append(f"  {a['name']:24} {str(tuple(a['shape'])):24} {a['dtype']}{used}")
    return "\n".join(lines)


# ---------------------------------------------------------------- statistics in words

#: Each flag of the stats group: the letter drawn in the entropy map, and what it means.
FLAG_WORDS = {
    "uniform": ("U", "uniform: about the same weight on every key"),
    "diagonal_only": ("D", "diagonal only: over 80% of the weight on the diagonal"),
    "dominant_key": ("K", "dominant key: one key gets over 3/8 of all attention"),
    "weak": ("W", "weak: no weight above 1.2x the uniform weight"),
    "critical_key": ("C", "critical key: one key gets over 3/16 of all attention"),
    "strong_self": ("S", "strong self: own position weighted over 1.2x uniform"),
}
#: A flag is said of a head (marked, listed) when it holds in at least this share of the batches.
FLAG_SHARE = 0.5
#: Share of all attention on the previous / next position that makes a previous- / next-token
#: head (Clark et al. 2019's POSITION_THRESHOLD), and on key 0 / the last key that makes a
#: first- / last-token head. The head roles of `fastattn.corpus` test the same numbers; they
#: live here so that `fastattn stats` states its findings without importing xarray.
POSITION_MASS = 0.5
SINK_SHARE = 0.25
#: Share of all attention on the repeat pattern (TransformerLens's duplicate-token and induction
#: scores) that makes a duplicate-token / induction head: half of what a perfect head reaches on
#: the classic test input, a random run repeated twice (`fastattn capture --repeat`), where only
#: the second run's queries (half of them) have an earlier occurrence: 0.5.
REPEAT_MASS = 0.25
#: Per-plane statistics whose mean over the batches the table holds. `duplicate_token` and
#: `induction` are NaN in a batch whose tokens repeat no id (or that has no ids): their mean is
#: over the batches with repeats, NaN when there are none.
MEANS = (
    "entropy_mean", "entropy_norm", "self_attention", "confidence", "distance_mean",
    "prev_token", "next_token", "first_token", "last_token", "duplicate_token", "induction",
)
#: Per-plane statistics the table needs (small: batch x layer x head).
TABLE_VARS = (*MEANS, "peak_key")
#: The score findings: a head is listed when the mean of its score over the batches reaches
#: the threshold. The scores are shares of all attention (`fastattn.kernels.stats`):
#: `prev_token`/`next_token` the mass on q − 1 / q + 1 (Clark et al. 2019's left/right,
#: TransformerLens's previous-token score), `first_token`/`last_token` on key 0 / n − 1,
#: `duplicate_token`/`induction` on the earlier occurrences of the query's token / the tokens
#: right after them (TransformerLens's duplicate-token and induction scores; batches with repeats).
SCORE_FINDINGS = {
    "prev_token": (POSITION_MASS, "previous-token heads (≥ {t:g} of attention on q−1)"),
    "next_token": (POSITION_MASS, "next-token heads (≥ {t:g} of attention on q+1)"),
    "first_token": (SINK_SHARE, "first-token heads (≥ {t:g} of attention on key 0)"),
    "last_token": (SINK_SHARE, "last-token heads (≥ {t:g} of attention on the last valid key)"),
    "duplicate_token": (REPEAT_MASS, "duplicate-token heads (≥ {t:g} of attention on earlier copies of the query's token)"),
    "induction": (REPEAT_MASS, "induction heads (≥ {t:g} of attention on the token after an earlier copy of the query's token)"),
}
#: The flag findings, in the order they are stated: `{key}` is the key the flagged batches
#: single out (dominant and critical keys are grouped by it), `{share}` the `FLAG_SHARE`.
FLAG_FINDINGS = {
    "dominant_key": "most incoming attention on {key} (over 3/8 of all attention, in ≥ {share} of batches)",
    "critical_key": "over 3/16 of all attention on {key} (in ≥ {share} of batches)",
    "diagonal_only": "diagonal only (over 80% of the weight on the diagonal, in ≥ {share} of batches)",
    "strong_self": "strong self (own position weighted over 1.2x uniform, in ≥ {share} of batches)",
    "uniform": "uniform (about the same weight on every key, in ≥ {share} of batches)",
    "weak": "weak (no weight above 1.2x uniform, in ≥ {share} of batches)",
}
KEY_FLAGS = ("dominant_key", "critical_key")
#: Heads named on a finding's line; the rest are counted ("… and N more").
HEADS_SHOWN = 6


def head_table(stats) -> dict:
    """Per (layer, head) numbers over all batches, as numpy arrays (layer, head[, flag]), of an
    xarray Dataset of statistics (`open_stats`, `compute_stats`)."""
    names = [v for v in TABLE_VARS if v in stats] + [f for f in FLAG_WORDS if f in stats]
    planes = stats[names].transpose("batch", "layer", "head").compute()
    return _table({name: planes[name].values for name in (*names, "layer", "head")})


#: The per-plane variables a table is made of (`store_head_table`, `computed_head_table`).
TABLE_PLANES = (*TABLE_VARS, *FLAG_WORDS)


def store_head_table(location, *, layer=None, head=None, storage_options: dict | None = None) -> dict:
    """`head_table` of a store's committed statistics, of some layers and heads (lists of
    positions; default all), read with zarr and NumPy alone: what `fastattn stats` prints."""
    from .stats import read_planes

    return _table(read_planes(location, TABLE_PLANES, layer=layer, head=head, storage_options=storage_options))


def computed_head_table(planes: dict[str, np.ndarray], *, layer=None, head=None) -> dict:
    """`store_head_table` of the arrays `write_stats(..., planes=TABLE_PLANES)` returns when it
    computed every batch: the same table, bit for bit, without reading them back."""
    from .stats import picked, plane_picks

    _, layers, heads = planes["peak_key"].shape
    picks = plane_picks(layers, heads, layer, head)
    return _table({**{name: picked(planes[name], picks) for name in TABLE_PLANES}, **picks})


def _table(planes: dict[str, np.ndarray]) -> dict:
    """`head_table` of per-plane arrays (batch, layer, head), and the "layer" and "head" labels."""
    peak = np.asarray(planes["peak_key"], dtype=np.int64)  # (batch, layer, head)
    batches, layers, heads = peak.shape
    table = {"batches": batches, "layer_ids": planes["layer"], "head_ids": planes["head"]}
    with warnings.catch_warnings():  # a plane empty in every batch: NaN, as xarray's mean gives
        warnings.simplefilter("ignore", RuntimeWarning)
        for name in (m for m in MEANS if m in planes):
            table[name] = np.nanmean(planes[name], axis=0)
    common = np.zeros((layers, heads), dtype=np.int64)
    common_share = np.zeros((layers, heads))
    for layer in range(layers):
        for head in range(heads):
            counts = np.bincount(np.clip(peak[:, layer, head], 0, None))
            common[layer, head] = counts.argmax()
            common_share[layer, head] = counts.max() / batches
    table["peak_key"], table["peak_share"] = common, common_share
    table["flags"] = {f: planes[f].astype(bool) for f in FLAG_WORDS if f in planes}
    table["flag_counts"] = {f: v.sum(axis=0) for f, v in table["flags"].items()}
    table["peaks"] = peak
    return table


def head_rows(table: dict) -> list[dict]:
    """The table as one plain dict per (layer, head): what `--format json|csv` prints."""
    rows = []
    layers, heads = table["peak_key"].shape
    for layer in range(layers):
        for head in range(heads):
            row = {"layer": int(table["layer_ids"][layer]), "head": int(table["head_ids"][head])}
            for name in (*(m for m in MEANS if m in table), *table.get("token_means", ())):
                value = float(table[name][layer, head])
                row[name] = None if np.isnan(value) else value
            row["peak_key"] = int(table["peak_key"][layer, head])
            row["peak_key_share"] = float(table["peak_share"][layer, head])
            for flag, counts in table["flag_counts"].items():
                row[flag] = float(counts[layer, head] / table["batches"]) if table["batches"] else 0.0
            rows.append(row)
    return rows


def _flagged_key(peaks: np.ndarray) -> int | None:
    """The key most of the flagged batches single out, or None when no key has half of them."""
    keys = np.bincount(np.clip(peaks, 0, None))
    return int(keys.argmax()) if keys.size and keys.max() >= 0.5 * peaks.size else None


#: Share of all attention on a token class (`fastattn.tokens`: special tokens, punctuation, a
#: user's class) that makes a head one that puts most of its attention there.
CLASS_MASS = 0.5


def _class_findings(table: dict) -> dict:
    """A score finding per token class of the table (`tokens.add_to_table`), like `SCORE_FINDINGS`."""
    names = [name for name in table.get("token_means", ()) if name.startswith("to_")]
    return {name: (CLASS_MASS, f"most attention on {name[3:]} tokens (≥ {{t:g}} of all attention)") for name in names}


def findings(table: dict, threshold: float = FLAG_SHARE) -> list[dict]:
    """The heads grouped by what they do, one dict per finding: `finding` (a score of
    `SCORE_FINDINGS`, a table's token class `to_<class>`, or a flag), `key` (the key of a
    dominant or critical key finding, None when it varies from batch to batch; absent for
    others), `what` (in words), `value` ("mean" of the score over the batches, or "share of
    batches" where the flag holds) and `heads` (`{"layer", "head", "label", "value"}`,
    strongest first).

    A score finding lists the heads whose mean score reaches its threshold; a flag finding the
    heads where the flag holds in at least `threshold` of the batches, dominant and critical
    keys grouped by the key singled out (most of the flagged batches' peak key). A head with
    a dominant key is not listed again under critical key (a dominant key is critical too).
    Findings without heads are left out."""
    batches = table["batches"]
    layers, heads = table["peak_key"].shape
    grid = [(layer, head) for layer in range(layers) for head in range(heads)]

    def entry(layer, head, value):
        l, h = int(table["layer_ids"][layer]), int(table["head_ids"][head])
        return {"layer": l, "head": h, "label": f"L{l}H{h}", "value": float(value)}

    out = []
    for name, (limit, what) in {**SCORE_FINDINGS, **_class_findings(table)}.items():
        if name not in table:
            continue
        with np.errstate(invalid="ignore"):  # NaN (cross-attention, empty planes) is no finding
            listed = [entry(l, h, table[name][l, h]) for l, h in grid if table[name][l, h] >= limit]
        out.append({"finding": name, "what": what.format(t=limit), "value": "mean", "heads": listed})
    counts = table["flag_counts"]
    for name, what in FLAG_FINDINGS.items():
        if name not in counts or not batches:
            continue
        held = [(l, h) for l, h in grid if counts[name][l, h] >= threshold * batches]
        if name == "critical_key" and "dominant_key" in counts:
            held = [(l, h) for l, h in held if counts["dominant_key"][l, h] < threshold * batches]
        groups: dict = {}
        for l, h in held:
            key = _flagged_key(table["peaks"][table["flags"][name][:, l, h], l, h]) if name in KEY_FLAGS else None
            groups.setdefault(key, []).append(entry(l, h, counts[name][l, h] / batches))
        for key in sorted(groups, key=lambda k: (k is None, k or 0)):
            words = what.format(
                key=f"key {key}" if key is not None else "one key that varies from batch to batch", share=f"{threshold:.0%}"
            )
            finding = {"finding": name, "key": key} if name in KEY_FLAGS else {"finding": name}
            out.append({**finding, "what": words, "value": "share of batches", "heads": groups[key]})
    for finding in out:
        finding["heads"].sort(key=lambda e: (-e["value"], e["layer"], e["head"]))
    return [f for f in out if f["heads"]]


def finding_line(finding: dict, shown: int = HEADS_SHOWN) -> str:
    """One finding on one line: what, how many heads, the first `shown` of them with their
    value, and "… and N more" for the rest."""
    heads = finding["heads"]
    percent = finding["value"] == "share of batches"
    named = ", ".join(f"{e['label']} ({e['value']:.0%})" if percent else f"{e['label']} ({e['value']:.2f})"
                      for e in heads[:shown])
    more = f", … and {len(heads) - shown} more" if len(heads) > shown else ""
    return f"{finding['what']} — {len(heads)} head{'s' if len(heads) != 1 else ''}: {named}{more}"
