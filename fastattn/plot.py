"""Figures of a store: one sample's attention, all its layers or heads, and the corpus.

Every function returns a `matplotlib.figure.Figure` built without pyplot: nothing is
shown, no display is needed and no figure is left registered anywhere. Save one with
`fig.savefig("fig.png")` (or `save(fig, path)`).

- `overview(ds, batch, layer, head=None)`: heatmap, incoming attention, row distributions;
- `layers(ds, batch)`: one heatmap per layer (mean over heads), one shared colour scale;
- `heads(ds, batch, layer)`: every head of a layer, each titled with its entropy;
- `batches(stats, layer, head=None)`: incoming attention per key over the whole corpus,
  and where its peak falls; reads only the `stats` group (seconds on thousands of batches);
- `entropy_map(stats)`: layer × head normalised entropy with the flagged heads marked.

Only each sample's valid `length x length` block is drawn; tick labels are token
positions, or the token strings when the store has them.
"""

from __future__ import annotations

import math
import os

import numpy as np
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from .errors import FastattnError
from .summary import FLAG_SHARE, FLAG_WORDS

FORMATS = ("png", "svg", "pdf")
KINDS = ("overview", "layers", "heads", "batches", "entropy")



# ---------------------------------------------------------------- helpers


def new_figure(figsize) -> Figure:
    """A pyplot-free figure with an Agg canvas (savefig works for png, svg and pdf)."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | os.PathLike, *, dpi: int = 100) -> str:
    """Write `fig` to `path`; the format comes from the extension (png, svg or pdf)."""
    fmt = file_format(path)
    fig.savefig(path, format=fmt, dpi=dpi)
    return fmt


def file_format(path: str | os.PathLike) -> str:
    ext = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if ext not in FORMATS:
        shown = f"'.{ext}'" if ext else "no extension"
        raise FastattnError(f"{os.fspath(path)}: cannot tell the image format from {shown}; use .png, .svg or .pdf")
    return ext


def _plural(word: str, n: int | None = None) -> str:
    plural = word + ("es" if word.endswith("ch") else "s")
    return plural if n is None else f"{n} {word if n == 1 else plural}"


def _check_index(ds: xr.Dataset, dim: str, value) -> int:
    """`value` as a valid index along `dim`, or a one-line FastattnError."""
    size = int(ds.sizes[dim])
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise FastattnError(f"{dim} must be an integer, not {value!r}") from None
    if index != value or not 0 <= index < size:
        has = f"{_plural(dim, size)} (0-{size - 1})" if size else f"no {_plural(dim)}"
        raise FastattnError(f"{dim} {value} out of range: the store has {has}")
    return index


def _length(ds: xr.Dataset, batch: int) -> int:
    n = int(ds["length"].isel(batch=batch).values)
    if n <= 0:
        raise FastattnError(f"batch {batch} has length 0: it holds no valid token to plot")
    return min(n, int(ds.sizes["query"]), int(ds.sizes["key"]))


def _tokens(ds: xr.Dataset, batch: int, n: int) -> list[str] | None:
    """The sample's token strings, or None when the store has none for it."""
    if "token" not in ds:
        return None
    tokens = [str(t) for t in np.asarray(ds["token"].isel(batch=batch).values)[:n]]
    return tokens if any(tokens) else None


def _set_ticks(ax, axis: str, n: int, tokens: list[str] | None, most: int = 32) -> None:
    """Integer position ticks, or token strings (thinned to at most `most` labels)."""
    if tokens is None:
        step = max(1, math.ceil(n / min(most, 12)))
        step = next(s for s in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, step) if s >= step)
        positions = list(range(0, n, step))
        labels = [str(p) for p in positions]
        fontsize, rotation = None, 0
    else:
        step = max(1, math.ceil(n / most))
        positions = list(range(0, n, step))
        labels = [f"{tokens[p]}" if tokens[p] else str(p) for p in positions]
        fontsize, rotation = 7, 90 if axis == "x" else 0
    if axis == "x":
        ax.set_xticks(positions, labels, fontsize=fontsize, rotation=rotation)
    else:
        ax.set_yticks(positions, labels, fontsize=fontsize, rotation=rotation)


def _heatmap(ax, matrix, *, cmap, norm=None, tokens=None, most=32, labels=True):
    n_q, n_k = matrix.shape
    image = ax.imshow(matrix, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
    _set_ticks(ax, "x", n_k, tokens, most)
    _set_ticks(ax, "y", n_q, tokens, most)
    if labels:
        ax.set_xlabel("Key position")
        ax.set_ylabel("Query position")
    return image


def _planes(ds: xr.Dataset, batch: int, layer: int | None, n: int) -> np.ndarray:
    """The valid block of one sample: (head, n, n) for one layer, (layer, head, n, n) for all."""
    attention = ds["attention"].isel(batch=batch)
    if layer is not None:
        attention = attention.isel(layer=layer)
    values = np.asarray(attention.isel(query=slice(0, n), key=slice(0, n)).values, dtype=np.float64)
    return np.nan_to_num(values, nan=0.0)


def _title(ds: xr.Dataset, batch: int, n: int) -> str:
    source = ""
    if "source" in ds:
        name = str(ds["source"].isel(batch=batch).values)
        index = int(ds["source_index"].isel(batch=batch).values) if "source_index" in ds else -1
        source = f" ({os.path.basename(name)}" + (f" #{index}" if index > 0 else "") + ")" if name else ""
    return f"Batch {batch}{source}, length {n}"


def row_entropy(planes: np.ndarray) -> np.ndarray:
    """−Σ_k A ln A per query row (natural log, 0 ln 0 = 0) over the last axis."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(planes > 0, planes * np.log(np.where(planes > 0, planes, 1.0)), 0.0)
    return -terms.sum(axis=-1)


# ---------------------------------------------------------------- one sample


def overview(ds: xr.Dataset, batch: int, layer: int, head: int | None = None) -> Figure:
    """Heatmap, incoming attention (column sums) and row distributions of one plane.

    `head=None` averages the heads of the layer."""
    batch = _check_index(ds, "batch", batch)
    layer = _check_index(ds, "layer", layer)
    if head is not None:
        head = _check_index(ds, "head", head)
    n = _length(ds, batch)
    tokens = _tokens(ds, batch, n)
    planes = _planes(ds, batch, layer, n)
    matrix = planes.mean(axis=0) if head is None else planes[head]
    which = f"mean of {ds.sizes['head']} heads" if head is None else f"head {head}"

    fig = new_figure((17, 5.4))
    ax_map, ax_in, ax_rows = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1, 1]})
    image = _heatmap(ax_map, matrix, cmap="hot", tokens=tokens)
    ax_map.set_title("Attention matrix")
    fig.colorbar(image, ax=ax_map, label="Attention weight", shrink=0.9)

    incoming = matrix.sum(axis=0)
    peak = int(np.argmax(incoming))
    keys = np.arange(n)
    ax_in.bar(keys, incoming, color="tab:blue", width=0.8)
    peak_label = f"Peak (t={peak})" if tokens is None or not tokens[peak] else f"Peak (t={peak}, {tokens[peak]!r})"
    ax_in.axvline(peak, color="tab:red", linestyle="--", linewidth=1.5, label=peak_label)
    ax_in.set_xlim(-0.7, n - 0.3)
    _set_ticks(ax_in, "x", n, tokens)
    ax_in.set_xlabel("Key position")
    ax_in.set_ylabel("Incoming attention (column sum)")
    ax_in.set_title("Incoming attention per key")
    ax_in.legend(loc="best")

    for row in matrix:
        ax_rows.plot(keys, row, linewidth=0.7, alpha=0.3)
    ax_rows.plot(keys, matrix.mean(axis=0), color="black", linewidth=2.5, label="Mean over queries")
    ax_rows.set_xlim(0, max(n - 1, 1))
    _set_ticks(ax_rows, "x", n, tokens)
    ax_rows.set_xlabel("Key position")
    ax_rows.set_ylabel("Attention weight")
    ax_rows.set_title(f"Attention distribution ({n} queries)")
    ax_rows.legend(loc="upper right")

    fig.suptitle(f"{_title(ds, batch, n)}: layer {layer}, {which}")
    return fig


def layers(ds: xr.Dataset, batch: int) -> Figure:
    """One heatmap per layer (mean over heads) on one shared colour scale."""
    batch = _check_index(ds, "batch", batch)
    n = _length(ds, batch)
    tokens = _tokens(ds, batch, n)
    means = _planes(ds, batch, None, n).mean(axis=1)  # (layer, n, n)
    count = means.shape[0]
    ncols = min(count, 4 if count not in (5, 6, 9) else 3)
    nrows = math.ceil(count / ncols)
    fig = new_figure((3.2 * ncols + 1.4, 3.3 * nrows + 0.7))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    norm = Normalize(vmin=0.0, vmax=float(means.max()) or 1.0)
    for i, ax in enumerate(axes):
        if i >= count:
            ax.remove()
            continue
        image = _heatmap(ax, means[i], cmap="hot", norm=norm, tokens=tokens, most=16, labels=False)
        ax.set_title(f"Layer {i}")
        if i % ncols == 0:
            ax.set_ylabel("Query position")
        if i >= count - ncols:
            ax.set_xlabel("Key position")
    fig.colorbar(image, ax=list(axes[:count]), label="Attention weight (mean over heads)", shrink=0.8)
    fig.suptitle(f"{_title(ds, batch, n)}: every layer, mean over {ds.sizes['head']} heads")
    return fig


def heads(ds: xr.Dataset, batch: int, layer: int) -> Figure:
    """Every head of one layer (viridis), each titled with its entropy."""
    batch = _check_index(ds, "batch", batch)
    layer = _check_index(ds, "layer", layer)
    n = _length(ds, batch)
    tokens = _tokens(ds, batch, n)
    planes = _planes(ds, batch, layer, n)  # (head, n, n)
    entropy = row_entropy(planes).mean(axis=-1)
    count = planes.shape[0]
    ncols = min(count, 4 if count <= 16 else 6)
    nrows = math.ceil(count / ncols)
    fig = new_figure((2.9 * ncols + 1.4, 3.0 * nrows + 0.9))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    norm = Normalize(vmin=0.0, vmax=float(planes.max()) or 1.0)
    for i, ax in enumerate(axes):
        if i >= count:
            ax.remove()
            continue
        image = _heatmap(ax, planes[i], cmap="viridis", norm=norm, tokens=tokens, most=12, labels=False)
        ax.set_title(f"Head {i}: H = {entropy[i]:.2f} nats", fontsize=10)
        if i % ncols == 0:
            ax.set_ylabel("Query position")
        if i >= count - ncols:
            ax.set_xlabel("Key position")
    fig.colorbar(image, ax=list(axes[:count]), label="Attention weight", shrink=0.8)
    fig.suptitle(
        f"{_title(ds, batch, n)}: layer {layer}, every head"
        f" (H = mean row entropy; uniform would be ln {n} = {math.log(n):.2f})"
    )
    return fig


# ---------------------------------------------------------------- the corpus (stats group only)


def _stats(ds_or_stats: xr.Dataset, need: str) -> xr.Dataset:
    """The statistics: the dataset itself when it holds them, else the `stats` group of its store."""
    if need in ds_or_stats:
        return ds_or_stats
    location = ds_or_stats.attrs.get("store")
    if location is None:
        raise FastattnError(f"this dataset has no '{need}' statistics and names no store; run `fastattn stats` first")
    from .stats import open_stats

    return open_stats(location)


def _valid_keys(stats: xr.Dataset, values: np.ndarray) -> np.ndarray:
    """(batch, key) values with keys past each sample's length set to NaN (when the lengths are known)."""
    values = np.array(values, dtype=np.float64)
    if "length" in stats:
        lengths = np.asarray(stats["length"].values)
        values[np.arange(values.shape[1])[None, :] >= lengths[:, None]] = np.nan
    return values


def batches(ds_or_stats: xr.Dataset, layer: int, head: int | None = None) -> Figure:
    """Across every batch: mean incoming attention per key with its 10-90% band, and
    a histogram of the peak key. `head=None` averages the heads.

    Reads the `stats` group only (`col_sum`), never the attention array."""
    stats = _stats(ds_or_stats, "col_sum")
    layer = _check_index(stats, "layer", layer)
    if head is not None:
        head = _check_index(stats, "head", head)
    if stats.sizes["batch"] == 0:
        raise FastattnError("the store has no batches to plot")
    col_sum = stats["col_sum"].isel(layer=layer)
    col_sum = col_sum.mean("head", skipna=False) if head is None else col_sum.isel(head=head)
    values = _valid_keys(stats, col_sum.transpose("batch", "key").values)  # (batch, key)
    present = np.isfinite(values)
    counts = present.sum(axis=0)
    keys = np.flatnonzero(counts)
    if keys.size == 0:
        raise FastattnError(f"layer {layer}: no valid incoming attention in the statistics")
    n_keys = int(keys.max()) + 1
    values, counts = values[:, :n_keys], counts[:n_keys]
    positions = np.arange(n_keys)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN keys (no batch that long)
            mean = np.nanmean(values, axis=0)
            low, high = np.nanquantile(values, [0.1, 0.9], axis=0)
    peaks = np.nanargmax(np.where(present[:, :n_keys], values, -np.inf), axis=1)[present[:, :n_keys].any(axis=1)]
    total = int(stats.sizes["batch"])
    which = f"mean of {stats.sizes['head']} heads" if head is None else f"head {head}"

    fig = new_figure((14, 4.8))
    ax_mean, ax_peak = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.5, 1]})
    ax_mean.fill_between(positions, low, high, color="tab:blue", alpha=0.25, linewidth=0, label="10-90% of batches")
    ax_mean.plot(positions, mean, color="tab:blue", linewidth=2, marker="o", markersize=3, label="Mean over batches")
    ax_mean.set_xlim(-0.5, n_keys - 0.5)
    ax_mean.set_ylim(bottom=0)
    _set_ticks(ax_mean, "x", n_keys, None, most=24)
    ax_mean.set_xlabel("Key position")
    ax_mean.set_ylabel("Incoming attention (column sum)")
    ax_mean.set_title("Incoming attention per key")
    handles, labels = ax_mean.get_legend_handles_labels()
    if counts.min() < counts.max():  # ragged: say how many batches each position averages
        ax_count = ax_mean.twinx()
        ax_count.step(positions, counts, where="mid", color="0.55", linewidth=1, linestyle=":")
        ax_count.set_ylim(0, counts.max() * 1.05)
        ax_count.set_ylabel("Batches this long", color="0.4")
        ax_count.tick_params(axis="y", colors="0.4")
        handles.append(Line2D([], [], color="0.55", linestyle=":"))
        labels.append("Batches this long (right axis)")
    ax_mean.legend(handles, labels, loc="upper right")

    ax_peak.hist(peaks, bins=np.arange(n_keys + 1) - 0.5, color="tab:orange", edgecolor="white", linewidth=0.5)
    ax_peak.set_xlim(-0.5, n_keys - 0.5)
    _set_ticks(ax_peak, "x", n_keys, None, most=16)
    ax_peak.set_xlabel("Peak key position")
    ax_peak.set_ylabel("Batches")
    common = int(np.bincount(peaks, minlength=n_keys).argmax()) if peaks.size else 0
    share = float(np.mean(peaks == common)) if peaks.size else 0.0
    ax_peak.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_peak.set_title(f"Key with the most incoming attention\nmost often t={common} ({share:.0%} of batches)")
    fig.suptitle(f"All {total:,} batches: layer {layer}, {which}")
    return fig


def flag_shares(stats: xr.Dataset) -> dict[str, np.ndarray]:
    """Per flag, the (layer, head) share of batches where it holds."""
    return {
        name: np.asarray(stats[name].astype(np.float64).mean("batch").transpose("layer", "head").values)
        for name in FLAG_WORDS
        if name in stats
    }


def entropy_map(ds_or_stats: xr.Dataset) -> Figure:
    """Layer × head map of normalised entropy (mean over batches); a letter marks each
    flag that holds in at least half of the batches."""
    stats = _stats(ds_or_stats, "entropy_norm")
    if stats.sizes["batch"] == 0:
        raise FastattnError("the store has no batches to plot")
    entropy = np.asarray(stats["entropy_norm"].mean("batch").transpose("layer", "head").values, dtype=np.float64)
    shares = flag_shares(stats)
    n_layers, n_heads = entropy.shape
    width = min(22.0, max(10.0, 0.62 * n_heads + 4.5))
    height = min(16.0, max(3.0, 0.5 * n_layers + 1.6)) + 1.6
    fig = new_figure((width, height))
    ax = fig.subplots()
    image = ax.imshow(entropy, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="Normalised entropy", shrink=0.9)
    ax.set_xticks(np.arange(n_heads))
    ax.set_yticks(np.arange(n_layers))
    ax.set_xlabel("Head")
    ax.set_ylabel("Layer")
    small = n_layers * n_heads <= 400
    for layer in range(n_layers):
        for head in range(n_heads):
            letters = "".join(FLAG_WORDS[f][0] for f, s in shares.items() if s[layer, head] >= FLAG_SHARE)
            dark = entropy[layer, head] < 0.6
            colour = "white" if dark else "black"
            if small:
                text = f"{entropy[layer, head]:.2f}" + (f"\n{letters}" if letters else "")
                ax.text(head, layer, text, ha="center", va="center", fontsize=7.5, color=colour,
                        fontweight="bold" if letters else "normal")
            elif letters:
                ax.text(head, layer, letters, ha="center", va="center", fontsize=6, color=colour)
            if letters:
                ax.add_patch(_cell_outline(head, layer))
    handles = [Line2D([], [], linestyle="none", marker=f"${FLAG_WORDS[f][0]}$", markersize=9, color="black") for f in FLAG_WORDS]
    counts = {f: int((shares[f] >= FLAG_SHARE).sum()) if f in shares else 0 for f in FLAG_WORDS}
    labels = [f"{FLAG_WORDS[f][1]} ({_plural('head', counts[f])})" for f in FLAG_WORDS]
    handles.append(Patch(facecolor="none", edgecolor="crimson", linewidth=1.5))
    labels.append(f"flagged in at least {FLAG_SHARE:.0%} of the batches")
    fig.legend(handles, labels, loc="outside lower center", ncols=2 if width >= 13 else 1, fontsize=8, frameon=False)
    ax.set_title(
        f"Normalised entropy per head, mean over {stats.sizes['batch']:,} batches\n"
        "(0 = all weight on one key, 1 = uniform); letters mark the flagged heads",
        fontsize=10,
    )
    return fig


def _cell_outline(head: int, layer: int) -> Rectangle:
    return Rectangle((head - 0.46, layer - 0.46), 0.92, 0.92, fill=False, edgecolor="crimson", linewidth=1.5)
