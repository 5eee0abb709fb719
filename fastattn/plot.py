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
from matplotlib.patches import Patch

from .errors import FastattnError

FORMATS = ("png", "svg", "pdf")
KINDS = ("overview", "layers", "heads", "batches", "entropy")

#: Flags of the stats group, with the letter drawn in the entropy map and their meaning.
FLAGS = {
    "uniform": ("U", "uniform: spreads attention almost evenly over the keys"),
    "diagonal_only": ("D", "diagonal only: tokens attend to themselves or their neighbours"),
    "dominant_key": ("K", "dominant key: one key takes most incoming attention"),
    "weak": ("W", "weak: low, diffuse weights"),
    "critical_key": ("C", "critical key: one key outside the start draws most attention"),
    "strong_self": ("S", "strong self: most weight on the token itself"),
}
#: A flag is marked on a head when it holds in at least this share of the batches.
FLAG_SHARE = 0.5


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
    ax_in.legend(loc="upper right")

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
    fig = new_figure((3.6 * ncols + 1.2, 3.5 * nrows + 0.6))
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
    fig = new_figure((3.3 * ncols + 1.2, 3.3 * nrows + 0.8))
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
