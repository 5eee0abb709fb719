"""Figures of a store: one sample's attention, all its layers or heads, and the corpus.

Every function returns a `matplotlib.figure.Figure` built without pyplot: nothing is
shown, no display is needed and no figure is left registered anywhere. Save one with
`fig.savefig("fig.png")` (or `save(fig, path)`).

- `overview(ds, batch, layer, head=None)`: heatmap, incoming attention, row distributions;
- `layers(ds, batch)`: one heatmap per layer (mean over heads), one shared colour scale;
- `heads(ds, batch, layer)`: every head of a layer, each titled with its entropy;
- `batches(stats, layer, head=None)`: incoming attention per key over the whole corpus,
  and where its peak falls; reads only the `stats` group (seconds on thousands of batches);
- `entropy_map(stats)`: layer × head normalised entropy with the flagged heads marked;
- `head_map(similarity, stats)`, `compare_map(cmp)`: the figures of `fastattn.corpus`'s head
  similarity (an MDS scatter of the heads) and store comparison (a layer × head heatmap).

Only each sample's valid `length x length` block is drawn; tick labels are token
positions, or the token strings when the store has them.

Figures of one sample are drawn at their resolution, so long sequences cost what the
figure shows, not length²: a heatmap with more tokens than pixels shows the means of
square blocks (its colour bar says "mean of f × f blocks"; smaller maps are exact), the
row panel draws every k-th query above `MAX_ROW_LINES`, and each plane is read once, one
stored chunk at a time (`Sample.draw` shares one read among several figures). Pass the
`dpi` the figure will be saved at: it sets how many pixels a map gets.
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

from .choices import PLOT_KINDS
from .errors import FastattnError, check_index, plural
from .summary import FLAG_SHARE, FLAG_WORDS

FORMATS = ("png", "svg", "pdf")
KINDS = PLOT_KINDS
#: Up to this many queries the row panel of `overview` draws one line per query; above, every k-th.
MAX_ROW_LINES = 64
#: Up to this many keys incoming attention is one bar per key; above, one line through them all.
MAX_BARS = 128


# ---------------------------------------------------------------- helpers


def new_figure(figsize, dpi: float = 100) -> Figure:
    """A pyplot-free figure with an Agg canvas (savefig works for png, svg and pdf)."""
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
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


def _check_index(ds: xr.Dataset, dim: str, value) -> int:
    """`value` as a valid index along `dim`, or a one-line FastattnError."""
    return check_index(dim, value, int(ds.sizes[dim]))


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
    """Integer position ticks, or token strings (thinned to at most `most` labels).

    Positions get fewer labels as they get longer (12 of up to 2 digits, 7 of 4), so
    they do not run into each other."""
    if tokens is None:
        fit = min(most, 12) * 3 // (len(str(max(n - 1, 0))) + 1)
        step = max(1, math.ceil(n / max(2, min(most, 12, fit))))
        nice = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000)
        step = next((s for s in nice if s >= step), step)
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


def _title(ds: xr.Dataset, batch: int, n: int) -> str:
    source = ""
    if "source" in ds:
        name = str(ds["source"].isel(batch=batch).values)
        index = int(ds["source_index"].isel(batch=batch).values) if "source_index" in ds else -1
        source = f" ({os.path.basename(name)}" + (f" #{index}" if index > 0 else "") + ")" if name else ""
    return f"Batch {batch}{source}, length {n}"


def _heatmap(ax, n, *, cmap, norm=None, tokens=None, most=32, labels=True):
    """An n × n heatmap on token positions, still empty: `_fill` puts the data in once the
    laid-out figure says how many pixels the map gets."""
    image = ax.imshow(
        np.zeros((1, 1)), cmap=cmap, norm=norm, interpolation="nearest", aspect="equal",
        extent=(-0.5, n - 0.5, n - 0.5, -0.5),
    )  # fmt: skip
    _set_ticks(ax, "x", n, tokens, most)
    _set_ticks(ax, "y", n, tokens, most)
    if labels:
        ax.set_xlabel("Key position")
        ax.set_ylabel("Query position")
    return image


def _fill(image, cells: np.ndarray, factor: int, n: int) -> None:
    """Show `cells` (each the mean of a `factor × factor` block) over positions 0..n-1; the
    last, partial block is cropped by the axes limits, so every cell sits where its tokens are."""
    span = cells.shape[0] * factor
    image.set_data(cells)
    image.set_extent((-0.5, span - 0.5, span - 0.5, -0.5))
    image.axes.set_xlim(-0.5, n - 0.5)
    image.axes.set_ylim(n - 0.5, -0.5)


def _shorter_side(axes) -> int:
    """Pixels along the shorter side of the smallest of `axes`, at the figure's dpi."""
    boxes = [ax.get_window_extent() for ax in axes]
    return max(1, int(min(min(box.width, box.height) for box in boxes)))


def _map_factor(fig: Figure, axes, n: int) -> int:
    """The block size for n × n maps drawn in `axes`: 1 when they fit even with matplotlib's
    default margins (the constrained layout usually leaves more room), else measured on the
    laid-out figure (a layout pass costs a few tenths of a second, so only when needed)."""
    if n <= _shorter_side(axes):
        return 1
    fig.get_layout_engine().execute(fig)
    return block_factor(n, _shorter_side(axes))


def block_factor(n: int, pixels: int) -> int:
    """The smallest block size that leaves at most `pixels` cells along n positions (1: exact)."""
    return max(1, math.ceil(n / max(1, pixels)))


def _block_counts(size: int, factor: int) -> np.ndarray:
    """Positions in each block along an axis of `size` (the last block may be partial)."""
    return np.minimum(factor, size - np.arange(0, size, factor))


def block_sums(plane: np.ndarray, factor: int) -> np.ndarray:
    """Sums of the `factor × factor` blocks of a 2-D array, float64; the last block row and
    column are partial when `factor` does not divide the shape. Keys are summed first (the
    contiguous axis, in the array's dtype: at most `factor` terms each), then queries."""
    starts_q, starts_k = (np.arange(0, size, factor) for size in plane.shape)
    by_key = np.add.reduceat(plane, starts_k, axis=1) if factor > 1 else plane
    return np.add.reduceat(by_key, starts_q, axis=0, dtype=np.float64) if factor > 1 else by_key.astype(np.float64)


def block_means(plane: np.ndarray, factor: int) -> np.ndarray:
    """Means of the `factor × factor` blocks of a 2-D array (float64); factor 1 is the array itself."""
    counts = np.outer(_block_counts(plane.shape[0], factor), _block_counts(plane.shape[1], factor))
    return block_sums(plane, factor) / counts


def _blocks_label(factor: int) -> str:
    """What a downsampled map's colour bar adds to its label (nothing for an exact map)."""
    return "" if factor == 1 else f"\n(mean of {factor} × {factor} blocks)"


#: The colour bar label while the layout is measured, as wide as any final one, so the
#: measured map is never larger than the drawn one.
_WIDEST_LABEL = "Attention weight (mean over heads)" + _blocks_label(99)


def mean_row_entropy(plane: np.ndarray) -> float:
    """Mean over the rows of −Σ_k A ln A (natural log, 0 ln 0 = 0): the statistics kernel's
    `entropy_mean` of this one plane, the number `fastattn stats` stores, in the calling thread."""
    from .kernels.stats import attention_stats

    return float(attention_stats(plane, 0, parallel=False)["entropy_mean"])


# ---------------------------------------------------------------- one sample


class Sample:
    """One sample of a store: its checked batch index, valid length, tokens and title.

    `draw` makes several figures of it while reading each `(query, key)` plane they need
    once, one stored chunk at a time; only the valid `length × length` block is read."""

    def __init__(self, ds: xr.Dataset, batch: int):
        self.ds = ds
        self.batch = _check_index(ds, "batch", batch)
        self.n = _length(ds, self.batch)
        self.tokens = _tokens(ds, self.batch, self.n)
        self.title = self.exact_title = _title(ds, self.batch, self.n)
        self.heads = int(ds.sizes["head"])
        # no maps (a store of statistics captured from a model): each plane drawn exactly from the
        # maps the capture kept (`kept`, when it kept that layer and head), else from its top-k
        self.topk = "attention" not in ds
        self.kept: dict[tuple[int, int], tuple[int, int]] = {}  # (layer, head) -> (kept_layer, kept_head) position
        if self.topk:
            if "topk_index" not in ds:
                raise FastattnError("this dataset has neither attention nor top-k statistics to draw")
            k = int(ds.sizes["rank"])
            self.title += f" (approximate: each query's {k} strongest keys only, the other weights drawn as 0)"
            if "kept" in ds:
                self.kept = {(int(layer), int(head)): (i, j) for i, layer in enumerate(ds["kept_layer"].values)
                             for j, head in enumerate(ds["kept_head"].values)}

    def title_for(self, wanted: dict[int, set[int]]) -> str:
        """The title of a figure drawing the planes `wanted` (layer -> heads): approximate (and
        saying so) when one of them is not held whole."""
        exact = not self.topk or all((layer, head) in self.kept for layer, heads in wanted.items() for head in heads)
        return self.exact_title if exact else self.title

    def draw(self, figures: list) -> list[Figure]:
        """Feed every plane that one of `figures` (Overview, Layers, Heads) wants to each that
        wants it, then finish them; returns their Figures in the same order."""
        wanted: dict[int, set[int]] = {}
        for figure in figures:
            for layer, heads in figure.wanted.items():
                wanted.setdefault(layer, set()).update(heads)
        for layer in sorted(wanted):
            self._feed(figures, layer, sorted(wanted[layer]))
        return [figure.finish() for figure in figures]

    def _feed(self, figures: list, layer: int, heads: list[int]) -> None:
        # a function of its own, so no plane of this layer outlives it while the next one is read
        for head, plane in self.planes(layer, heads):
            for figure in figures:
                if head in figure.wanted.get(layer, ()):
                    figure.add(layer, head, plane)

    def planes(self, layer: int, heads: list[int]):
        """Yield `(head, plane)`: the valid n × n block, float32 (float64 stays), NaN as 0.

        The heads held by one stored chunk are read together: the chunk is decoded once, and
        at most one chunk's worth of planes is in memory."""
        n = self.n
        if self.topk:
            kept = [head for head in heads if (layer, head) in self.kept]
            if kept:
                where = {"batch": self.batch, "kept_layer": self.kept[layer, kept[0]][0], "query": slice(0, n),
                         "key": slice(0, n), "kept_head": [self.kept[layer, head][1] for head in kept]}
                yield from zip(kept, np.nan_to_num(np.asarray(self.ds["kept"].isel(where).values), nan=0.0))
            rest = [head for head in heads if (layer, head) not in self.kept]
            if rest:
                yield from self._topk_planes(layer, rest)
            return
        attention = self.ds["attention"].isel(batch=self.batch, layer=layer, query=slice(0, n), key=slice(0, n))
        for group in _chunk_groups(attention, "head", heads):
            contiguous = group == list(range(group[0], group[-1] + 1))
            block = attention.isel(head=slice(group[0], group[-1] + 1) if contiguous else group).values  # a slice: no copy
            for head, plane in zip(group, block):
                plane = plane.astype(np.promote_types(plane.dtype, np.float32), copy=False)
                if np.isnan(plane).any():  # never inside an ingested block; a copy, so the dataset is unchanged
                    plane = np.nan_to_num(plane, nan=0.0)
                yield head, plane


    def _topk_planes(self, layer: int, heads: list[int]):
        """Yield `(head, plane)` rebuilt from the top-k: each query's k strongest weights at their
        keys, 0 elsewhere (an approximation: the rest of each row is not stored)."""
        n = self.n
        where = {"batch": self.batch, "layer": layer, "head": heads, "query": slice(0, n)}
        index = np.asarray(self.ds["topk_index"].isel(where).values)
        weight = np.asarray(self.ds["topk_weight"].isel(where).values)
        rows = np.broadcast_to(np.arange(n)[:, None], index.shape[1:])
        for head, idx, w in zip(heads, index, weight):
            plane = np.zeros((n, n), dtype=np.float32)
            valid = (idx >= 0) & (idx < n)
            plane[rows[valid], idx[valid]] = w[valid]
            yield head, plane


def _chunk_groups(array: xr.DataArray, dim: str, indices: list[int]) -> list[list[int]]:
    """`indices` along `dim` grouped by the array's dask chunks (one group for in-memory data)."""
    sizes = array.chunksizes.get(dim) or (array.sizes[dim],)
    edges = np.cumsum((0, *sizes))
    groups = [[i for i in indices if lo <= i < hi] for lo, hi in zip(edges[:-1], edges[1:])]
    return [group for group in groups if group]


class Overview:
    """Heatmap, incoming attention (column sums) and row distributions of one plane, or of
    the mean of a layer's heads (`head=None`). Drawn at the figure's resolution: the heatmap
    holds block means when it has more tokens than pixels, the row panel draws every k-th
    query (with the mean over all of them) above `MAX_ROW_LINES` queries, and incoming
    attention is a line, not bars, above `MAX_BARS` keys."""

    def __init__(self, sample: Sample, layer: int, head: int | None = None, *, dpi: float = 100):
        ds, n = sample.ds, sample.n
        self.sample, self.n = sample, n
        self.layer = _check_index(ds, "layer", layer)
        self.head = None if head is None else _check_index(ds, "head", head)
        heads = range(sample.heads) if head is None else [self.head]
        self.wanted = {self.layer: set(heads)}
        self.count = len(heads)

        self.fig = new_figure((17, 5.4), dpi=dpi)
        self.ax_map, self.ax_in, self.ax_rows = self.fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1, 1]})
        self.image = _heatmap(self.ax_map, n, cmap="hot", tokens=sample.tokens)
        self.colorbar = self.fig.colorbar(self.image, ax=self.ax_map, label=_WIDEST_LABEL, shrink=0.9)
        self.step = max(1, math.ceil(n / MAX_ROW_LINES))
        self.rows = np.arange(0, n, self.step)
        # every text that does not depend on the data goes in before the layout is measured
        for ax in (self.ax_in, self.ax_rows):
            _set_ticks(ax, "x", n, sample.tokens)
            ax.set_xlabel("Key position")
        self.ax_in.set_ylabel("Incoming attention (column sum)")
        self.ax_in.set_title("Incoming attention per key")
        self.ax_rows.set_ylabel("Attention weight")
        every = self.rows.size == n
        drawn = f"{n} queries" if every else f"{self.rows.size} of {n} queries drawn"
        self.ax_rows.set_title(f"Attention distribution ({drawn})")
        which = f"mean of {sample.heads} heads" if self.head is None else f"head {self.head}"
        self.fig.suptitle(f"{sample.title_for(self.wanted)}: layer {self.layer}, {which}")
        self.factor = _map_factor(self.fig, [self.ax_map], n)
        self.map = np.zeros((math.ceil(n / self.factor),) * 2)
        self.incoming = np.zeros(n)
        self.lines = np.zeros((self.rows.size, n))

    def add(self, layer: int, head: int, plane: np.ndarray) -> None:
        self.map += block_sums(plane, self.factor)
        self.incoming += plane.sum(axis=0, dtype=np.float64)
        self.lines += plane[self.rows]

    def finish(self) -> Figure:
        fig, n, tokens, factor = self.fig, self.n, self.sample.tokens, self.factor
        counts = _block_counts(n, factor)
        _fill(self.image, self.map / (self.count * np.outer(counts, counts)), factor, n)
        self.image.autoscale()
        self.ax_map.set_title("Attention matrix" + _blocks_label(factor).replace("\n", " "))
        self.colorbar.set_label("Attention weight" + _blocks_label(factor))

        incoming = self.incoming / self.count
        peak = int(np.argmax(incoming))
        keys = np.arange(n)
        ax_in = self.ax_in
        if n <= MAX_BARS:
            ax_in.bar(keys, incoming, color="tab:blue", width=0.8)
        else:  # thinner than a pixel as bars: one line through every key's value
            ax_in.fill_between(keys, incoming, color="tab:blue", alpha=0.3, linewidth=0)
            ax_in.plot(keys, incoming, color="tab:blue", linewidth=0.8)
            ax_in.set_ylim(bottom=0)
        peak_label = f"Peak (t={peak})" if tokens is None or not tokens[peak] else f"Peak (t={peak}, {tokens[peak]!r})"
        ax_in.axvline(peak, color="tab:red", linestyle="--", linewidth=1.5, label=peak_label, zorder=1.5)  # under the line
        ax_in.set_xlim(-0.7, n - 0.3)
        ax_in.legend(loc="best")

        ax_rows, lines = self.ax_rows, self.lines / self.count
        every = lines.shape[0] == n
        for i, row in enumerate(lines):
            label = None if every or i else f"{len(lines)} of {n} queries, {self.step} apart"
            ax_rows.plot(keys, row, linewidth=0.7, alpha=0.3, label=label)
        mean_label = "Mean over queries" if every else f"Mean over all {n} queries"
        ax_rows.plot(keys, incoming / n, color="black", linewidth=2.5, label=mean_label)
        ax_rows.set_xlim(0, max(n - 1, 1))
        ax_rows.legend(loc="upper right")

        return fig


def _grid(fig: Figure, count: int, ncols: int):
    """`count` axes in rows of `ncols` (the unused cells removed)."""
    nrows = math.ceil(count / ncols)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes[count:]:
        ax.remove()
    return list(axes[:count])


class Layers:
    """One heatmap per layer (mean over heads) on one shared colour scale; block means when
    a map has more tokens than pixels."""

    def __init__(self, sample: Sample, *, dpi: float = 100):
        ds, n = sample.ds, sample.n
        self.sample, self.n = sample, n
        count = int(ds.sizes["layer"])
        self.wanted = {layer: set(range(sample.heads)) for layer in range(count)}
        ncols = min(count, 4 if count not in (5, 6, 9) else 3)
        nrows = math.ceil(count / ncols)
        self.fig = new_figure((max(6.4, 3.2 * ncols + 1.4), 3.3 * nrows + 0.7), dpi=dpi)  # room for the title
        self.axes = _grid(self.fig, count, ncols)
        self.norm = Normalize(vmin=0.0, vmax=1.0)
        self.images = []
        for i, ax in enumerate(self.axes):
            self.images.append(_heatmap(ax, n, cmap="hot", norm=self.norm, tokens=sample.tokens, most=16, labels=False))
            ax.set_title(f"Layer {i}")
            if i % ncols == 0:
                ax.set_ylabel("Query position")
            if i >= count - ncols:
                ax.set_xlabel("Key position")
        self.colorbar = self.fig.colorbar(self.images[-1], ax=self.axes, label=_WIDEST_LABEL, shrink=0.8)
        separator = "\n" if count < 3 else " "  # a narrow figure gets its title on two lines
        self.fig.suptitle(f"{sample.title_for(self.wanted)}:{separator}every layer, mean over {sample.heads} heads")
        self.factor = _map_factor(self.fig, self.axes, n)
        self.sums = np.zeros((count,) + (math.ceil(n / self.factor),) * 2)

    def add(self, layer: int, head: int, plane: np.ndarray) -> None:
        self.sums[layer] += block_sums(plane, self.factor)

    def finish(self) -> Figure:
        counts = _block_counts(self.n, self.factor)
        means = self.sums / (self.sample.heads * np.outer(counts, counts))
        for image, cells in zip(self.images, means):
            _fill(image, cells, self.factor, self.n)
        self.norm.vmax = float(means.max()) or 1.0
        self.colorbar.set_label("Attention weight (mean over heads)" + _blocks_label(self.factor))
        return self.fig


class Heads:
    """Every head of one layer (viridis) on one colour scale, each titled with its mean row
    entropy; block means when a map has more tokens than pixels.

    `entropy` (one value per head) skips computing the entropies when the caller has them
    (the statistics' `entropy_mean` is the same number)."""

    def __init__(self, sample: Sample, layer: int, *, dpi: float = 100, entropy=None):
        ds, n = sample.ds, sample.n
        self.sample, self.n = sample, n
        self.layer = _check_index(ds, "layer", layer)
        count = sample.heads
        self.wanted = {self.layer: set(range(count))}
        ncols = min(count, 4 if count <= 16 else 6)
        nrows = math.ceil(count / ncols)
        self.fig = new_figure((2.9 * ncols + 1.4, 3.0 * nrows + 0.9), dpi=dpi)
        self.axes = _grid(self.fig, count, ncols)
        self.norm = Normalize(vmin=0.0, vmax=1.0)
        self.images = []
        for i, ax in enumerate(self.axes):
            self.images.append(_heatmap(ax, n, cmap="viridis", norm=self.norm, tokens=sample.tokens, most=12, labels=False))
            ax.set_title(f"Head {i}: H = 0.00 nats", fontsize=10)  # the real value comes with the data
            if i % ncols == 0:
                ax.set_ylabel("Query position")
            if i >= count - ncols:
                ax.set_xlabel("Key position")
        self.colorbar = self.fig.colorbar(self.images[-1], ax=self.axes, label=_WIDEST_LABEL, shrink=0.8)
        self.fig.suptitle(
            f"{sample.title_for(self.wanted)}: layer {self.layer}, every head"
            f" (H = mean row entropy; uniform would be ln {n} = {math.log(n):.2f})"
        )
        self.factor = _map_factor(self.fig, self.axes, n)
        self.maps = [None] * count
        self.entropy = None if entropy is None else np.asarray(entropy, dtype=np.float64)
        self.computed = np.zeros(count)

    def add(self, layer: int, head: int, plane: np.ndarray) -> None:
        self.maps[head] = block_means(plane, self.factor)
        if self.entropy is None:
            self.computed[head] = mean_row_entropy(plane)

    def finish(self) -> Figure:
        n = self.n
        entropy = self.computed if self.entropy is None else self.entropy
        for i, (ax, image, cells) in enumerate(zip(self.axes, self.images, self.maps)):
            _fill(image, cells, self.factor, n)
            ax.set_title(f"Head {i}: H = {entropy[i]:.2f} nats", fontsize=10)
        self.norm.vmax = float(max(cells.max() for cells in self.maps)) or 1.0
        self.colorbar.set_label("Attention weight" + _blocks_label(self.factor))
        return self.fig


def open_sample_data(location) -> xr.Dataset:
    """What the figures of one sample draw from: the store (lazily), or for a store of statistics
    captured from a model (no maps) its per-sample arrays and the statistics' top-k, from which
    `Sample` draws each plane approximately (the figure says so), and the maps the capture kept
    whole (`kept`, from `open_kept`), which it draws exactly."""
    from . import store

    loc = store.as_location(location)
    manifest = store.checked_manifest(loc)
    if not manifest.stats_only:
        return store.open_store(loc)
    from .stats import open_stats

    st = open_stats(loc)
    ds = store.open_store(loc, attention=False).assign(topk_index=st["topk_index"], topk_weight=st["topk_weight"])
    if manifest.kept_committed:
        from .live import open_kept

        ds = ds.assign(kept=open_kept(loc)["attention"])
    return ds


def overview(ds: xr.Dataset, batch: int, layer: int, head: int | None = None, *, dpi: float = 100) -> Figure:
    """Heatmap, incoming attention (column sums) and row distributions of one plane;
    `head=None` averages the heads of the layer. Reads that one plane (or that layer)."""
    sample = Sample(ds, batch)
    return sample.draw([Overview(sample, layer, head, dpi=dpi)])[0]


def layers(ds: xr.Dataset, batch: int, *, dpi: float = 100) -> Figure:
    """One heatmap per layer (mean over heads) on one shared colour scale; reads one layer at a time."""
    sample = Sample(ds, batch)
    return sample.draw([Layers(sample, dpi=dpi)])[0]


def heads(ds: xr.Dataset, batch: int, layer: int, *, dpi: float = 100) -> Figure:
    """Every head of one layer (viridis), each titled with its entropy."""
    sample = Sample(ds, batch)
    return sample.draw([Heads(sample, layer, dpi=dpi)])[0]


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


def nan_quantiles(values: np.ndarray, qs) -> np.ndarray:
    """`np.nanquantile(values, qs, axis=0)` (linear interpolation), vectorised: NumPy loops
    over the columns in Python, which takes seconds for thousands of keys. NaN when a
    column has no value."""
    ordered = np.sort(values, axis=0)  # NaN sorts last
    counts = (~np.isnan(values)).sum(axis=0)
    last = np.maximum(counts - 1, 0)
    result = np.full((len(qs), values.shape[1]), np.nan)
    for i, q in enumerate(qs):
        position = q * last
        below = np.floor(position).astype(np.int64)
        low = np.take_along_axis(ordered, below[None], axis=0)[0]
        high = np.take_along_axis(ordered, np.minimum(below + 1, last)[None], axis=0)[0]
        result[i] = np.where(counts > 0, low + (high - low) * (position - below), np.nan)
    return result


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
            low, high = nan_quantiles(values, [0.1, 0.9])
    peaks = np.nanargmax(np.where(present[:, :n_keys], values, -np.inf), axis=1)[present[:, :n_keys].any(axis=1)]
    total = int(stats.sizes["batch"])
    which = f"mean of {stats.sizes['head']} heads" if head is None else f"head {head}"

    fig = new_figure((14, 4.8))
    ax_mean, ax_peak = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.5, 1]})
    ax_mean.fill_between(positions, low, high, color="tab:blue", alpha=0.25, linewidth=0, label="10-90% of batches")
    marker = "o" if n_keys <= MAX_BARS else None  # markers closer than a pixel would only blot the line
    ax_mean.plot(positions, mean, color="tab:blue", linewidth=2, marker=marker, markersize=3, label="Mean over batches")
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

    width = math.ceil(n_keys / MAX_BARS)  # keys per bin: one bin per key up to MAX_BARS keys
    bins = np.arange(0, n_keys + width, width) - 0.5
    if width == 1:
        ax_peak.hist(peaks, bins=bins, color="tab:orange", edgecolor="white", linewidth=0.5)
    else:  # one outline, not a patch per bin
        ax_peak.stairs(np.histogram(peaks, bins)[0], bins, fill=True, color="tab:orange")
    ax_peak.set_xlim(-0.5, n_keys - 0.5)
    _set_ticks(ax_peak, "x", n_keys, None, most=16)
    ax_peak.set_xlabel("Peak key position" + ("" if width == 1 else f" (bins of {width} keys)"))
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
    labels = [f"{FLAG_WORDS[f][1]} ({plural('head', counts[f])})" for f in FLAG_WORDS]
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


# ---------------------------------------------------------------- corpus analyses (fastattn.corpus)


def _mean_entropy(stats, layers: int, heads: int) -> np.ndarray | None:
    if stats is None:
        return None
    if isinstance(stats, xr.Dataset):
        if "entropy_mean" not in stats:
            return None
        values = stats["entropy_mean"]
        if "batch" in values.dims:
            values = values.mean("batch")
        values = values.transpose("layer", "head").values
    else:
        values = stats
    values = np.asarray(values, dtype=np.float64)
    return values.reshape(layers * heads) if values.size == layers * heads else None


def head_map(similarity: xr.Dataset, stats: xr.Dataset | None = None, *, labels: bool = True,
             method: str = "classical", coords: np.ndarray | None = None):
    """Scatter of the heads' MDS embedding (`coords`, else `mds(similarity, method=method)`):
    colour = layer (colour bar), marker size = mean entropy over the corpus (when `stats` has
    `entropy_mean`), each labelled "L{layer}H{head}"; the title gives the method and its
    stress. Returns a matplotlib Figure (never shown)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm

    from .corpus.common import DEFAULT_EPS, _labels
    from .corpus.similarity import mds, stress

    layers, heads = similarity.attrs["layers"], similarity.attrs["heads"]
    xy = mds(similarity, method=method) if coords is None else np.asarray(coords, dtype=np.float64)
    what = "classical MDS of sqrt JS" if method == "classical" else "metric MDS (SMACOF) of JS"
    entropy = _mean_entropy(stats, layers, heads)
    if entropy is not None and np.isfinite(entropy).any():
        top = np.nanmax(entropy) or 1.0
        sizes = 20.0 + 220.0 * np.nan_to_num(entropy / top, nan=0.0)
    else:
        sizes = np.full(layers * heads, 60.0)
    layer_of = np.arange(layers * heads) // heads
    cmap = colormaps["viridis"].resampled(max(layers, 1))
    norm = BoundaryNorm(np.arange(layers + 1) - 0.5, cmap.N)
    fig = new_figure((8.5, 7.0))
    ax = fig.subplots()
    ax.scatter(xy[:, 0], xy[:, 1], c=layer_of, cmap=cmap, norm=norm, s=sizes, alpha=0.8, edgecolors="black", linewidths=0.4)
    if labels:
        for i, label in enumerate(_labels(layers, heads)):
            ax.annotate(label, xy[i], fontsize=6.5, xytext=(3, 3), textcoords="offset points")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, ticks=np.arange(layers))
    bar.set_label("Layer")
    ax.set_xlabel("MDS 1")
    ax.set_ylabel("MDS 2")
    size_note = "marker size: mean entropy" if entropy is not None else "marker size: constant (no statistics)"
    ax.set_title(
        f"Heads by Jensen–Shannon divergence ({what}, stress-1 {stress(similarity, xy, method):.3f},"
        f" ε = {similarity.attrs.get('eps', DEFAULT_EPS):g})\n"
        f"colour: layer; {size_note}",
        fontsize=10,
    )
    ax.set_aspect("equal", adjustable="datalim")
    return fig


def compare_map(cmp: xr.Dataset, value: str = "score"):
    """Layer × head heatmap of one change (default `score`), each cell annotated."""
    data = np.asarray(cmp[value].transpose("layer", "head").values, dtype=np.float64)
    layers, heads = data.shape
    signed = value.startswith("d_")
    fig = new_figure((min(22.0, max(8.0, 0.6 * heads + 4)), min(16.0, max(3.0, 0.5 * layers + 2))))
    ax = fig.subplots()
    if signed:
        bound = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 0.0
        bound = bound or 1.0
        image = ax.imshow(data, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    else:
        top = float(np.nanmax(data)) if np.isfinite(data).any() else 0.0
        image = ax.imshow(data, cmap="magma_r", vmin=0.0, vmax=top or 1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=value)
    ax.set_xticks(np.arange(heads))
    ax.set_yticks(np.arange(layers))
    ax.set_xlabel("Head")
    ax.set_ylabel("Layer")
    if layers * heads <= 400:
        for layer in range(layers):
            for head in range(heads):
                ax.text(head, layer, f"{data[layer, head]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(
        f"Change per head ({value}) over {cmp.attrs.get('batches', '?')} matched batches"
        f" (match: {cmp.attrs.get('match', '?')})",
        fontsize=10,
    )
    return fig
