"""One self-contained HTML page about a store: figures, findings (heads grouped by what they do),
summary, per-head table.

The page embeds every image as a base64 PNG data URI and its CSS inline; it has no
scripts, fonts or links, so it opens offline and can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import os
from datetime import datetime, timezone

import numpy as np

from . import plot, summary, tokens
from .errors import FastattnError

#: At most this many layers get their own heads grid and corpus figure (first, ..., last).
MAX_LAYER_FIGURES = 6

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1.5em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
h3 { font-size: 1.05em; margin-top: 1.5em; }
.muted { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.left, th.left { text-align: left; }
td.flag { background: #ffe2e0; font-weight: 600; }
tr.layer-start td { border-top: 2px solid #999; }
.summary td:first-child { text-align: left; color: #555; }
.summary td:last-child { text-align: left; }
figure { margin: 1em 0 2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; margin-top: 0.3em; }
ul.findings li { margin: 0.2em 0; }
.bar { display: inline-block; height: 0.8em; background: #4a7ebb; vertical-align: middle; }
"""


def _png(fig, dpi: int) -> str:
    """`fig` as a `data:image/png;base64,...` URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(fig, dpi: int, alt: str, caption: str) -> str:
    return (
        f'<figure><img alt="{html.escape(alt)}" src="{_png(fig, dpi)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


def representative_batch(lengths: np.ndarray) -> int:
    """The sample with the median length (of the non-empty samples), lowest index on ties."""
    lengths = np.asarray(lengths)
    candidates = np.flatnonzero(lengths > 0)
    if candidates.size == 0:
        raise FastattnError("every sample in the store has length 0: nothing to report")
    order = candidates[np.argsort(lengths[candidates], kind="stable")]
    median = lengths[order[(order.size - 1) // 2]]
    return int(candidates[lengths[candidates] == median][0])


def chosen_layers(count: int) -> list[int]:
    """Every layer when there are few, else an even spread that includes the first and last."""
    if count <= MAX_LAYER_FIGURES:
        return list(range(count))
    return sorted({int(round(x)) for x in np.linspace(0, count - 1, MAX_LAYER_FIGURES)})


def _summary_html(info: dict, batch: int, length: int, source: str, median: bool) -> str:
    ratio = info["compression_ratio"]
    last = info["last_ingest"]
    rows = [
        ("Store", info["store"]),
        ("Batches", f"{info['batches']:,} (statistics for {info['stats_batches']:,})"),
        ("Shape", f"{info['layers']} layers x {info['heads']} heads, max length {info['max_length']}, {info['dtype']}"),
        ("Lengths", f"{info['length_min']} to {info['length_max']}"),
        (
            "Size",
            f"{_mb(info['size_on_disk'])} on disk; no attention maps (statistics captured from a model)"
            if info.get("stats_only")
            else f"{_mb(info['size_on_disk'])} on disk; attention {_mb(info['attention_bytes'])} stored in "
            f"{_mb(info['stored_bytes'])}" + (f" (ratio {ratio:.2f})" if ratio else ""),
        ),
        ("Sources", f"{info['source_files']:,} {'texts' if info.get('stats_only') else 'dump files'}"),
        ("Sample shown", f"batch {batch} (length {length}{', the median' if median else ''}) from {source}"),
    ]
    if last:
        rows.append(
            (
                "Last ingest",
                f"{last.get('time', '?')}: {last.get('files', '?')} files, {last.get('batches', '?')} batches, "
                f"{last.get('rejected', '?')} rejected",
            )
        )
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    histogram = info["length_histogram"]
    peak = max((b["count"] for b in histogram), default=0)
    bars = "".join(
        f"<tr><td>{b['from']:.0f} - {b['to']:.0f}</td><td>{b['count']:,}</td>"
        f'<td class="left"><span class="bar" style="width:{(200 * b["count"] / peak) if peak else 0:.0f}px"></span></td></tr>'
        for b in histogram
    )
    return (
        f'<table class="summary">{body}</table>'
        f'<h3>Sequence lengths</h3><table><tr><th>length</th><th>samples</th><th class="left"></th></tr>{bars}</table>'
    )


#: The table's heading of each score of `summary.SCORE_FINDINGS`.
SCORE_HEADINGS = {
    "prev_token": "previous token", "next_token": "next token", "first_token": "first token",
    "last_token": "last token", "duplicate_token": "duplicate token", "induction": "induction",
}


def _score(value: float) -> str:
    """A mean score in the table; "–" when no batch has one (no repeated token ids, say)."""
    return "–" if np.isnan(value) else f"{value:.3f}"


def _table_html(table: dict) -> str:
    batches = table["batches"]
    flags = list(table["flag_counts"])
    head_cells = "".join(
        f'<th title="{html.escape(summary.FLAG_WORDS[f][1])}">{html.escape(f.replace("_", " "))}</th>' for f in flags
    )
    rows = []
    layers, heads = table["entropy_mean"].shape
    for layer in range(layers):
        for head in range(heads):
            cells = [
                f"<td>{layer}</td><td>{head}</td>",
                f"<td>{table['entropy_mean'][layer, head]:.3f}</td>",
                f"<td>{table['entropy_norm'][layer, head]:.3f}</td>",
                f"<td>{table['self_attention'][layer, head]:.3f}</td>",
                *(f"<td>{_score(table[name][layer, head])}</td>" for name in summary.SCORE_FINDINGS),
                f"<td>{table['peak_key'][layer, head]} ({table['peak_share'][layer, head]:.0%})</td>",
            ]
            for f in flags:
                count = int(table["flag_counts"][f][layer, head])
                marked = ' class="flag"' if count >= summary.FLAG_SHARE * batches else ""
                cells.append(f"<td{marked}>{count:,}</td>")
            start = ' class="layer-start"' if head == 0 and layer else ""
            rows.append(f"<tr{start}>{''.join(cells)}</tr>")
    return (
        "<table><tr><th>layer</th><th>head</th><th>entropy (nats)</th><th>normalised entropy</th>"
        "<th>self-attention</th>" + "".join(f"<th>{html.escape(SCORE_HEADINGS[name])}</th>" for name in summary.SCORE_FINDINGS) +
        f"<th>most common peak key</th>{head_cells}</tr>{''.join(rows)}</table>"
    )


def _sample_figures(ds, stats, table, batch: int, picked: list[int], dpi: int) -> list[str]:
    """The figures of one sample: its overview, its layers and the heads of the `picked` layers."""
    # the layer shown in the overview: the most focused one (lowest mean normalised entropy)
    by_layer = np.nanmean(np.where(np.isfinite(table["entropy_norm"]), table["entropy_norm"], np.inf), axis=1)
    focus = int(np.argmin(by_layer))
    # one read of each plane serves the overview, the layers figure and the heads grids;
    # the heads' entropies come from the statistics (the same numbers)
    sample = plot.Sample(ds, batch)
    entropy = np.asarray(stats["entropy_mean"].isel(batch=batch).transpose("layer", "head").values)
    overview_fig, layers_fig, *heads_figs = sample.draw(
        [plot.Overview(sample, focus, dpi=dpi), plot.Layers(sample, dpi=dpi)]
        + [plot.Heads(sample, layer, dpi=dpi, entropy=entropy[layer]) for layer in picked]
    )
    sample_figures = [
        _figure(
            overview_fig,
            dpi,
            f"overview of batch {batch}, layer {focus}",
            f"Batch {batch}, layer {focus} (the layer with the lowest mean normalised entropy), mean over heads: "
            "the attention matrix, the attention each key receives (column sums; dashed line: the peak), and "
            "each query's distribution over the keys (black: their mean).",
        ),
        _figure(
            layers_fig,
            dpi,
            f"every layer of batch {batch}",
            f"Batch {batch}, every layer, mean over heads, on one colour scale.",
        ),
    ]
    for layer, fig in zip(picked, heads_figs):
        sample_figures.append(
            _figure(
                fig,
                dpi,
                f"heads of layer {layer}, batch {batch}",
                f"Batch {batch}, layer {layer}: every head; H is the head's mean row entropy in nats.",
            )
        )
    return sample_figures


def write_report(
    store_path: str | os.PathLike, out_path: str | os.PathLike, *, batch: int | None = None, dpi: int = 80
) -> str:
    """Write the HTML report of a store to `out_path` and return that path.

    Computes (and saves) the statistics first when some batches have none. `batch`
    picks the sample shown in detail; by default the one with the median length."""
    from . import stats as stats_mod
    from .store import open_store

    store_path = os.fspath(store_path)
    info = summary.store_info(store_path)
    if info["batches"] == 0:
        raise FastattnError(f"{store_path}: the store has no batches yet (run fastattn ingest)")
    if info["stats_batches"] < info["batches"]:
        stats_mod.write_stats(store_path)
        info = summary.store_info(store_path)
    ds = open_store(store_path, attention=not info.get("stats_only"))
    stats = stats_mod.open_stats(store_path)
    lengths = np.asarray(ds["length"].values)
    median = batch is None
    if median:
        batch = representative_batch(lengths)
    else:
        batch = plot._check_index(ds, "batch", batch)
    length = int(lengths[batch])
    source = str(ds["source"].isel(batch=batch).values) or "?"
    table = summary.head_table(stats)
    with contextlib.suppress(tokens.NoTokenStrings):  # a store with token strings: findings on token classes too
        tokens.add_to_table(table, tokens.token_class_stats(store_path, sep_sep=False))
    found = summary.findings(table)
    picked = chosen_layers(ds.sizes["layer"])
    some = "every layer" if len(picked) == ds.sizes["layer"] else f"layers {', '.join(map(str, picked))}"

    maps = not info.get("stats_only")  # a store of statistics captured from a model has no maps to draw
    sample_figures = _sample_figures(ds, stats, table, batch, picked, dpi) if maps else []
    sample_note = "<p>This store holds statistics captured straight from a model and no attention maps: no sample is drawn.</p>"
    corpus_figures = [
        _figure(
            plot.entropy_map(stats),
            dpi,
            "normalised entropy per layer and head",
            "Normalised entropy of every head, mean over all batches (0: all weight on one key; 1: uniform). "
            f"Letters and red outlines mark flags that hold in at least {summary.FLAG_SHARE:.0%} of the batches.",
        )
    ]
    for layer in picked:
        corpus_figures.append(
            _figure(
                plot.batches(stats, layer),
                dpi,
                f"incoming attention over all batches, layer {layer}",
                f"Layer {layer}, mean over heads, all batches: mean incoming attention per key with the band "
                "holding 80% of the batches, and a histogram of the key that gets the most.",
            )
        )

    findings_html = (
        '<ul class="findings">' + "".join(f"<li>{html.escape(summary.finding_line(f))}</li>" for f in found) + "</ul>"
        if found
        else "<p>No head reaches any of these thresholds.</p>"
    )
    title = f"fastattn report: {os.path.basename(store_path.rstrip('/')) or store_path}"
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    from . import __version__

    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="muted">Generated {generated} by fastattn {__version__}.</p>

<h2>Whole corpus</h2>
{''.join(corpus_figures)}

<h2>{"Representative sample" if median else "Sample"}: batch {batch}</h2>
{sample_note if not maps else ""}<p class="muted">{"The sample with the median length" if median else "The sample asked for"} ({length} tokens); only its valid tokens are drawn.
Figures of heads: {some}.</p>
{''.join(sample_figures)}

<h2>Findings</h2>
<p class="muted">Heads grouped by what they do, strongest first: by their mean share of attention on
q&minus;1, q+1, key 0 and the last key over all batches, and by the flags that hold in at least
{summary.FLAG_SHARE:.0%} of the batches (in brackets: the mean, or the share of batches).</p>
{findings_html}

<h2>Store</h2>
{_summary_html(info, batch, length, source, median)}

<h2>Every head</h2>
<p class="muted">Means over {table['batches']:,} batches. Entropy is the mean over valid queries of
&minus;&Sigma; A ln A; self-attention is the mean weight on the diagonal; previous, next, first and last
token are the shares of all attention on q&minus;1, q+1, key 0 and the last key; the peak key is the key with the
most incoming attention (in brackets: the share of batches where it is that key). Flag columns count
the batches where each flag holds; shaded cells hold in at least {summary.FLAG_SHARE:.0%}.</p>
{_table_html(table)}
</body>
</html>
"""
    try:
        with open(out_path, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as exc:
        raise FastattnError(f"{os.fspath(out_path)}: cannot write the report ({exc.strerror or exc})") from None
    return os.fspath(out_path)
