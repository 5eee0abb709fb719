"""Plain-data descriptions of stores and dumps (what `fastattn info` shows); no printing."""

from __future__ import annotations

import numpy as np

from . import store


def store_info(location, *, storage_options: dict | None = None, bins: int = 8) -> dict:
    """Batches, shape, length histogram, size on disk and compression, sources, last ingest."""
    loc = store.Location(location, storage_options)
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
        "source_files": sum(1 for e in manifest.files.values() if e.get("status") == "ingested"),
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


# ---------------------------------------------------------------- statistics


FLAG_WORDS = {
    "uniform": "spread attention almost uniformly",
    "diagonal_only": "attend almost only to themselves (diagonal)",
    "dominant_key": "give one key more than 3/8 of all attention",
    "weak": "have no weight clearly above uniform",
    "critical_key": "give one key more than 3/16 of all attention",
    "strong_self": "attend strongly to themselves",
}


def head_table(st) -> list[dict]:
    """One row per (layer, head): means over batches, the most common peak key, flag shares."""
    from .stats import FLAGS

    names = ["entropy_mean", "entropy_norm", "self_attention", "confidence", "distance_mean"]
    means = st[names].mean("batch").compute()
    peak = np.asarray(st.peak_key.values)
    flags = {f: np.asarray(st[f].mean("batch").values) for f in FLAGS}
    batches = peak.shape[0]
    rows = []
    for layer in range(peak.shape[1]):
        for head in range(peak.shape[2]):
            counts = np.bincount(peak[:, layer, head].clip(min=0))
            mode = int(np.argmax(counts))
            row = {"layer": layer, "head": head}
            row.update({name: _float(means[name].values[layer, head]) for name in names})
            row["peak_key"] = mode
            row["peak_key_share"] = float(counts[mode] / batches) if batches else 0.0
            row.update({f: float(flags[f][layer, head]) for f in FLAGS})
            rows.append(row)
    return rows


def _float(value) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


def findings(rows: list[dict], share: float = 0.5, most: int | None = 20) -> list[str]:
    """The table in plain words: what most batches agree on, strongest first (at most `most`)."""
    from .stats import FLAGS

    found = []
    for row in rows:
        where = f"layer {row['layer']}, head {row['head']}"
        if row["peak_key_share"] >= share and (row["dominant_key"] >= share or row["critical_key"] >= share):
            words = f"put most incoming attention on key {row['peak_key']}"
            found.append((row["peak_key_share"], 0, f"{where}: {row['peak_key_share']:.0%} of batches {words}"))
        for rank, flag in enumerate(FLAGS, start=1):
            if flag not in ("dominant_key", "critical_key") and row[flag] >= share:
                found.append((row[flag], rank, f"{where}: {row[flag]:.0%} of batches {FLAG_WORDS[flag]}"))
    found.sort(key=lambda item: (-item[0], item[1]))
    lines = [text for _, _, text in found[:most]]
    if most is not None and len(found) > most:
        lines.append(f"... and {len(found) - most} more (see --format json)")
    return lines
