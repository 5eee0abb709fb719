"""Plain-data descriptions of stores and dumps (what `fastattn info` shows); no printing."""

from __future__ import annotations

import warnings

import numpy as np

from . import store


def store_info(location, *, storage_options: dict | None = None, bins: int = 8) -> dict:
    """Batches, shape, length histogram, size on disk and compression, sources, last ingest."""
    loc = store.as_location(location, storage_options)
    manifest = store.check_store(loc)
    group = store.open_group(loc, mode="r")
    n = manifest.committed
    lengths = np.asarray(group["length"][:n]) if n else np.zeros(0, dtype=np.int32)
    attention = group["attention"]
    stored = loc.nbytes("attention")
    logical = n * int(np.prod(attention.shape[1:])) * np.dtype(manifest.dtype).itemsize
    counts, edges = np.histogram(lengths, bins=min(bins, max(1, len(np.unique(lengths))))) if n else ([], [])
    return {
        "store": str(loc),
        "batches": n,
        "layers": manifest.layers,
        "heads": manifest.heads,
        "max_length": manifest.max_length,
        "dtype": manifest.dtype,
        "chunks": list(attention.chunks),
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
        "stats_batches": manifest.stats_committed,
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
    lines += [
        f"size         {_mb(info['size_on_disk'])} on disk; attention {_mb(info['attention_bytes'])}"
        f" stored in {_mb(info['stored_bytes'])}" + (f" (ratio {ratio:.2f})" if ratio else ""),
        f"chunks       {tuple(info['chunks'])}",
        f"sources      {info['source_files']:,} files",
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
#: Per-plane statistics the table needs (small: batch x layer x head).
TABLE_VARS = ("entropy_mean", "entropy_norm", "self_attention", "confidence", "distance_mean", "peak_key")


def head_table(stats) -> dict:
    """Per (layer, head) numbers over all batches, as numpy arrays (layer, head[, flag]), of an
    xarray Dataset of statistics (`open_stats`, `compute_stats`)."""
    names = [v for v in TABLE_VARS if v in stats] + [f for f in FLAG_WORDS if f in stats]
    planes = stats[names].transpose("batch", "layer", "head").compute()
    return _table({name: planes[name].values for name in (*names, "layer", "head")})


def store_head_table(location, *, layer=None, head=None, storage_options: dict | None = None) -> dict:
    """`head_table` of a store's committed statistics, of some layers and heads (lists of
    positions; default all), read with zarr and NumPy alone: what `fastattn stats` prints."""
    from .stats import read_planes

    names = [*TABLE_VARS, *FLAG_WORDS]
    return _table(read_planes(location, names, layer=layer, head=head, storage_options=storage_options))


def _table(planes: dict[str, np.ndarray]) -> dict:
    """`head_table` of per-plane arrays (batch, layer, head), and the "layer" and "head" labels."""
    peak = np.asarray(planes["peak_key"], dtype=np.int64)  # (batch, layer, head)
    batches, layers, heads = peak.shape
    table = {"batches": batches, "layer_ids": planes["layer"], "head_ids": planes["head"]}
    with warnings.catch_warnings():  # a plane empty in every batch: NaN, as xarray's mean gives
        warnings.simplefilter("ignore", RuntimeWarning)
        for name in ("entropy_mean", "entropy_norm", "self_attention", "confidence", "distance_mean"):
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
            for name in ("entropy_mean", "entropy_norm", "self_attention", "confidence", "distance_mean"):
                value = float(table[name][layer, head])
                row[name] = None if np.isnan(value) else value
            row["peak_key"] = int(table["peak_key"][layer, head])
            row["peak_key_share"] = float(table["peak_share"][layer, head])
            for flag, counts in table["flag_counts"].items():
                row[flag] = float(counts[layer, head] / table["batches"]) if table["batches"] else 0.0
            rows.append(row)
    return rows


def _key_words(peaks: np.ndarray) -> str:
    """Which key the flagged batches single out: one key, or a key that varies."""
    keys = np.bincount(np.clip(peaks, 0, None))
    key, share = int(keys.argmax()), keys.max() / max(1, peaks.size)
    if share >= 0.99:
        return f"key {key}"
    if share >= 0.5:
        return f"key {key} ({share:.0%} of them; other keys in the rest)"
    return f"one key that varies from batch to batch (most often key {key}, {share:.0%} of them)"


def flag_sentences(table: dict, threshold: float = FLAG_SHARE) -> list[str]:
    """One line per flagged head, in plain words: every flag that holds for at least
    `threshold` of the batches, strongest first. `critical_key` is left out where
    `dominant_key` holds (a dominant key is critical too)."""
    batches = table["batches"]
    counts = table["flag_counts"]
    lines = []
    any_counts = next(iter(counts.values()), None)
    if any_counts is None:
        return lines
    layers, heads = any_counts.shape
    for layer in range(layers):
        for head in range(heads):
            held = {name: c[layer, head] / batches for name, c in counts.items() if c[layer, head] >= threshold * batches}
            if "dominant_key" in held:
                held.pop("critical_key", None)
            parts = []
            for name, share in sorted(held.items(), key=lambda item: -item[1]):
                flagged = table["flags"][name][:, layer, head]
                if name == "dominant_key":
                    what = f"put most incoming attention on {_key_words(table['peaks'][flagged, layer, head])}"
                elif name == "critical_key":
                    what = f"send over 3/16 of all attention to {_key_words(table['peaks'][flagged, layer, head])}"
                else:
                    what = {
                        "uniform": "spread attention almost uniformly (about the same weight on every key)",
                        "diagonal_only": "put over 80% of the weight on the diagonal (each token on itself)",
                        "weak": "have no weight above 1.2x the uniform weight (weak, diffuse attention)",
                        "strong_self": "weight each token's own position over 1.2x the uniform weight",
                    }[name]
                parts.append(f"{share:.0%} of batches {what}")
            if parts:
                where = f"layer {table['layer_ids'][layer]}, head {table['head_ids'][head]}"
                lines.append(f"{where}: " + "; ".join(parts))
    return lines
