"""Figures and `fastattn plot`: every kind renders, is not blank, carries its labels;
ragged samples draw only their valid block; `batches` never reads the attention array;
bad selections are one clear line. Long samples are drawn at the figure's resolution
(block means against a NumPy reference, small maps exact, thinned query rows), and a
figure reads only the chunks it draws, each once, in one chunk's worth of memory."""

from __future__ import annotations

import glob
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from fastattn import plot, summary
from fastattn.errors import FastattnError
from fastattn.ingest import ingest
from fastattn.store import open_store
from fastattn.synth import synthesize

LAYERS, HEADS = 3, 4
WORDS = "[CLS] the quick brown fox jumps over a lazy dog while hello world these are strings ## ing , . ; : !".split()

try:  # the statistics module lands separately; the figures that need it skip until it does
    from fastattn.stats import open_stats, write_stats
except ImportError as exc:  # pragma: no cover - only before fastattn.stats exists
    open_stats = write_stats = None
    STATS_MISSING = f"fastattn.stats is not available yet ({exc})"
else:
    STATS_MISSING = ""


def build_stores(root: Path) -> dict[str, str]:
    """fixed: 20 one-text dumps of 16 tokens; ragged: 6 batched dumps, lengths 12-24 (24
    batches); tokens: the ragged dumps with token strings; many: 200 short batches."""
    stores = {}
    synthesize(root / "d_fixed", files=20, layers=LAYERS, heads=HEADS, seq=16, seed=0, jobs=2)
    synthesize(root / "d_ragged", files=6, layers=LAYERS, heads=HEADS, seq="12-24", batch=4, seed=1, jobs=2)
    synthesize(root / "d_many", files=50, layers=2, heads=2, seq="6-10", batch=4, seed=2, jobs=2)
    for i, path in enumerate(sorted(glob.glob(str(root / "d_ragged" / "*.npz")))[:2]):
        arrays = dict(np.load(path))
        size = arrays["attention_mask"].shape[1]
        arrays["tokens"] = np.array([[WORDS[(j + b) % len(WORDS)] for j in range(size)] for b in range(4)])
        os.makedirs(root / "d_tokens", exist_ok=True)
        np.savez(root / "d_tokens" / f"t{i}.npz", **arrays)
    for name in ("fixed", "ragged", "tokens", "many"):
        stores[name] = str(root / f"{name}.zarr")
        assert ingest([str(root / f"d_{name}")], stores[name], jobs=2).ok
    return stores


@pytest.fixture(scope="session")
def stores(tmp_path_factory) -> dict[str, str]:
    return build_stores(tmp_path_factory.mktemp("plot_stores"))


@pytest.fixture(scope="session")
def with_stats(stores) -> dict[str, str]:
    """The same stores with their statistics written (only the tests that need them pay for it)."""
    if STATS_MISSING:
        pytest.skip(STATS_MISSING)
    for name in ("fixed", "ragged", "many"):
        write_stats(stores[name])
    return stores


@pytest.fixture(scope="session")
def datasets(stores):
    return {name: open_store(path) for name, path in stores.items()}


def ragged_batch(ds) -> tuple[int, int]:
    """A sample shorter than the store's longest one: (batch, length)."""
    lengths = ds.length.values
    batch = int(np.argmin(lengths))
    assert lengths[batch] < ds.sizes["query"]
    return batch, int(lengths[batch])


def assert_not_blank(path: Path) -> None:
    """The PNG decodes, varies, and has plenty of non-white pixels."""
    image = imread(path)[..., :3]
    assert image.std() > 0.05, f"{path.name} looks blank (pixel std {image.std():.3f})"
    background = np.all(image > 0.98, axis=-1)
    assert (~background).mean() > 0.05, f"{path.name}: only {(~background).mean():.1%} of pixels are drawn"


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text") and a.get_text())]


def legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def render(kind: str, ds, stats=None):
    if kind == "overview":
        return plot.overview(ds, 1, 1)
    if kind == "overview_head":
        return plot.overview(ds, 1, 2, head=3)
    if kind == "layers":
        return plot.layers(ds, 1)
    if kind == "heads":
        return plot.heads(ds, 1, 2)
    if kind == "batches":
        return plot.batches(stats, 1)
    if kind == "batches_head":
        return plot.batches(stats, 0, head=2)
    return plot.entropy_map(stats)


# ---------------------------------------------------------------- every kind renders and is labelled


@pytest.mark.parametrize(
    "kind, store",
    [(kind, store) for kind in plot.KINDS for store in ("fixed", "ragged")]
    + [("overview_head", "ragged"), ("batches_head", "ragged")],
)
def test_every_kind_renders_with_its_labels(kind, store, stores, datasets, tmp_path, request):
    ds = datasets[store]
    corpus = kind.startswith(("batches", "entropy"))
    stats = open_stats(request.getfixturevalue("with_stats")[store]) if corpus else None
    fig = render(kind, ds, stats)
    out = tmp_path / f"{kind}.png"
    plot.save(fig, out, dpi=50)
    assert_not_blank(out)
    axes = fig.get_axes()
    if kind.startswith("overview"):
        assert len(axes) == 4  # heatmap, bars, lines, colour bar
        heat, bars, lines, _cbar = axes
        assert (heat.get_xlabel(), heat.get_ylabel()) == ("Key position", "Query position")
        assert heat.images[0].get_cmap().name == "hot"
        assert bars.get_xlabel() == "Key position"
        peak = [t for t in legend_texts(bars) if t.startswith("Peak (t=")]
        assert len(peak) == 1 and peak[0].endswith(")")
        assert "Mean over queries" in legend_texts(lines)
        n = int(ds.length.values[1])
        thin = [ln for ln in lines.get_lines() if ln.get_alpha() == 0.3]
        assert len(thin) == n  # one thin line per valid query
        assert ("head 3" if kind == "overview_head" else f"mean of {HEADS} heads") in fig.get_suptitle()
    elif kind == "layers":
        assert len(axes) == LAYERS + 1  # one colour bar
        assert [ax.get_title() for ax in axes[:LAYERS]] == [f"Layer {i}" for i in range(LAYERS)]
        assert len({(im.norm.vmin, im.norm.vmax) for ax in axes[:LAYERS] for im in ax.images}) == 1
        assert any(ax.get_xlabel() == "Key position" for ax in axes) and axes[0].get_ylabel() == "Query position"
    elif kind == "heads":
        assert len(axes) == HEADS + 1
        titles = [ax.get_title() for ax in axes[:HEADS]]
        assert all(t.startswith(f"Head {i}: H = ") and t.endswith(" nats") for i, t in enumerate(titles))
        assert axes[0].images[0].get_cmap().name == "viridis"
    elif kind.startswith("batches"):
        ragged = store == "ragged"
        assert len(axes) == (3 if ragged else 2)  # ragged stores add the "batches this long" axis
        mean_ax, peak_ax = axes[0], axes[1]
        assert mean_ax.get_xlabel() == "Key position" and peak_ax.get_xlabel() == "Peak key position"
        assert {"Mean over batches", "10-90% of batches"} <= set(legend_texts(mean_ax))
        assert sum(p.get_height() for p in peak_ax.patches) == ds.sizes["batch"]
    else:
        assert len(axes) == 2  # map and colour bar
        ax = axes[0]
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("Head", "Layer")
        assert ax.images[0].get_array().shape == (LAYERS, HEADS)
        legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
        assert all(description in legend for _letter, description in summary.FLAG_WORDS.values())


# ---------------------------------------------------------------- what is drawn


def test_ragged_sample_draws_only_its_valid_block(datasets):
    ds = datasets["ragged"]
    batch, n = ragged_batch(ds)
    fig = plot.overview(ds, batch, 0)
    heat, bars, lines, _ = fig.get_axes()
    matrix = heat.images[0].get_array()
    assert matrix.shape == (n, n) and np.isfinite(matrix).all()
    expected = np.nanmean(ds.attention.isel(batch=batch, layer=0).values[:, :n, :n], axis=0)
    np.testing.assert_allclose(matrix, expected, rtol=1e-5, atol=1e-7)
    assert len(bars.patches) == n
    np.testing.assert_allclose([p.get_height() for p in bars.patches], expected.sum(axis=0), rtol=1e-5)
    peak = int(np.argmax(expected.sum(axis=0)))
    assert legend_texts(bars) == [f"Peak (t={peak})"]
    assert max(heat.get_xticks()) <= n - 1 and max(heat.get_yticks()) <= n - 1
    for fig in (plot.layers(ds, batch), plot.heads(ds, batch, 1)):
        shapes = {im.get_array().shape for ax in fig.get_axes() for im in ax.images}
        assert shapes == {(n, n)}


def test_heads_titles_carry_each_heads_entropy(datasets):
    ds = datasets["ragged"]
    batch, n = ragged_batch(ds)
    a = ds.attention.isel(batch=batch, layer=2).values[:, :n, :n].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = -np.where(a > 0, a * np.log(a), 0.0).sum(-1).mean(-1)
    titles = [ax.get_title() for ax in plot.heads(ds, batch, 2).get_axes()[:HEADS]]
    assert titles == [f"Head {h}: H = {expected[h]:.2f} nats" for h in range(HEADS)]


def test_tokens_label_the_axes(datasets):
    ds = datasets["tokens"]
    n = int(ds.length.values[0])
    tokens = [str(t) for t in ds.token.values[0, :n]]
    assert all(tokens) and tokens[0] == "[CLS]"
    heat, bars, _, _ = plot.overview(ds, 0, 0).get_axes()
    assert [t.get_text() for t in heat.get_xticklabels()] == tokens
    assert [t.get_text() for t in heat.get_yticklabels()] == tokens
    assert [t.get_text() for t in bars.get_xticklabels()] == tokens
    (peak,) = legend_texts(bars)
    assert peak.startswith("Peak (t=") and any(f"'{tok}'" in peak for tok in tokens)
    labels = plot.heads(ds, 0, 0).get_axes()[0].get_xticklabels()
    assert labels and all(t.get_text() in tokens for t in labels)
    # a store without token strings labels positions
    plain = plot.overview(datasets["fixed"], 0, 0).get_axes()[0]
    assert all(t.get_text().isdigit() for t in plain.get_xticklabels())


def test_no_pyplot_figures_are_left_behind(datasets):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plot.overview(datasets["fixed"], 0, 0)
    plot.layers(datasets["fixed"], 0)
    assert plt.get_fignums() == before


# ---------------------------------------------------------------- batches reads the stats only


def test_batches_never_reads_the_attention_array(with_stats, datasets, monkeypatch):
    path = with_stats["many"]
    ds = datasets["many"]
    assert ds.sizes["batch"] == 200
    stats = open_stats(path)
    assert "attention" not in stats
    plot.batches(stats, 1)  # the stats dataset alone is enough
    plot.batches(ds.drop_vars("attention"), 1, head=0)  # a store dataset without attention opens its stats

    import zarr.storage

    read = []
    original = zarr.storage.LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        read.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    fig = plot.batches(open_store(path), 0)  # the full store dataset: goes to its stats group
    chunks = [k for k in read if "/c/" in k or k.startswith("c/") or "/c." in k]  # the statistics' keys: c.0.0.0
    assert any(k.startswith("stats/col_sum/") for k in chunks), chunks
    assert not [k for k in read if k.startswith("attention/c")], "batches read attention chunks"
    assert sum(p.get_height() for p in fig.get_axes()[1].patches) == 200
    # the counter does see attention reads when they happen
    open_store(path).attention.isel(batch=0).values
    assert [k for k in read if k.startswith("attention/c")]


def test_batches_matches_the_statistics(with_stats):
    stats = open_stats(with_stats["ragged"])
    fig = plot.batches(stats, 2, head=1)
    col = stats.col_sum.isel(layer=2, head=1).values.astype(np.float64)
    lengths = stats.length.values if "length" in stats else np.full(col.shape[0], col.shape[1])
    col[np.arange(col.shape[1])[None, :] >= lengths[:, None]] = np.nan
    mean_line = [ln for ln in fig.get_axes()[0].get_lines() if ln.get_label() == "Mean over batches"][0]
    np.testing.assert_allclose(mean_line.get_ydata(), np.nanmean(col, axis=0), rtol=1e-5)
    heights = [p.get_height() for p in fig.get_axes()[1].patches]
    np.testing.assert_array_equal(heights, np.bincount(np.nanargmax(np.nan_to_num(col, nan=-1), axis=1), minlength=len(heights)))


def test_entropy_map_marks_flagged_heads(with_stats):
    stats = open_stats(with_stats["fixed"])
    fig = plot.entropy_map(stats)
    ax = fig.get_axes()[0]
    expected = stats.entropy_norm.mean("batch").transpose("layer", "head").values
    np.testing.assert_allclose(ax.images[0].get_array(), expected, rtol=1e-6)
    shares = plot.flag_shares(stats)
    flagged = {(h, l) for f, s in shares.items() for l, h in zip(*np.nonzero(s >= summary.FLAG_SHARE))}
    outlines = {(round(p.get_x() + p.get_width() / 2), round(p.get_y() + p.get_height() / 2)) for p in ax.patches}
    assert outlines == flagged
    assert flagged, "the synthetic corpus has sink and local heads, so some head should be flagged"


# ---------------------------------------------------------------- bad selections


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda ds: plot.overview(ds, 40, 0), "batch 40 out of range: the store has 24 batches (0-23)"),
        (lambda ds: plot.overview(ds, -1, 0), "batch -1 out of range: the store has 24 batches (0-23)"),
        (lambda ds: plot.overview(ds, 0, 3), "layer 3 out of range: the store has 3 layers (0-2)"),
        (lambda ds: plot.overview(ds, 0, 0, head=4), "head 4 out of range: the store has 4 heads (0-3)"),
        (lambda ds: plot.layers(ds, 24), "batch 24 out of range: the store has 24 batches (0-23)"),
        (lambda ds: plot.heads(ds, 0, 7), "layer 7 out of range: the store has 3 layers (0-2)"),
    ],
)
def test_bad_selection_is_one_clear_line(call, message, datasets):
    with pytest.raises(FastattnError) as info:
        call(datasets["ragged"])
    assert str(info.value) == message


def test_empty_sample_is_refused(datasets):
    ds = datasets["ragged"]
    lengths = ds.length.values.copy()
    lengths[2] = 0
    empty = ds.assign(length=("batch", lengths))
    with pytest.raises(FastattnError, match=r"^batch 2 has length 0: it holds no valid token to plot$"):
        plot.overview(empty, 2, 0)
    with pytest.raises(FastattnError, match="length 0"):
        plot.layers(empty, 2)


def test_bad_selection_for_corpus_figures(with_stats):
    stats = open_stats(with_stats["ragged"])
    with pytest.raises(FastattnError, match=r"^layer 5 out of range: the store has 3 layers \(0-2\)$"):
        plot.batches(stats, 5)
    with pytest.raises(FastattnError, match=r"^head 9 out of range: the store has 4 heads \(0-3\)$"):
        plot.batches(stats, 0, head=9)


# ---------------------------------------------------------------- the command line


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_cli_help_lists_every_kind(cli):
    result = cli("plot", "--help")
    assert result.exit_code == 0
    for word in (*plot.KINDS, "--batch", "--layer", "--head", "--dpi", "--output", "png, svg or pdf"):
        assert word in result.output
    result = cli("report", "--help")
    assert result.exit_code == 0 and "self-contained" in result.output


@pytest.mark.parametrize("kind, fmt", [("overview", "png"), ("layers", "svg"), ("heads", "pdf")])
def test_cli_writes_each_format(kind, fmt, cli, stores, tmp_path):
    out = tmp_path / f"fig.{fmt}"
    result = cli("plot", stores["ragged"], kind, "--batch", 3, "--layer", 1, "--dpi", 40, "-o", out)
    assert result.exit_code == 0, result.output
    head = out.read_bytes()[:300]
    if fmt == "png":
        assert_not_blank(out)
    elif fmt == "svg":
        assert b"<svg" in head and out.stat().st_size > 10_000
    else:
        assert head.startswith(b"%PDF") and out.stat().st_size > 5_000


@pytest.mark.parametrize("kind", ["batches", "entropy"])
def test_cli_corpus_figures(kind, cli, with_stats, tmp_path):
    out = tmp_path / "fig.png"
    result = cli("plot", with_stats["fixed"], kind, "--layer", 2, "--head", 1, "--dpi", 40, "-o", out)
    assert result.exit_code == 0, result.output
    assert_not_blank(out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["overview", "--batch", 40], "error: batch 40 out of range: the store has 24 batches (0-23)"),
        (["heads", "--layer", 9], "error: layer 9 out of range: the store has 3 layers (0-2)"),
        (["overview", "--head", 4], "error: head 4 out of range: the store has 4 heads (0-3)"),
    ],
)
def test_cli_bad_selection(args, message, cli, stores, tmp_path):
    out = tmp_path / "fig.png"
    assert one_error_line(cli("plot", stores["ragged"], *args, "-o", out)) == message
    assert not out.exists()


def test_cli_unknown_kind_is_a_usage_error(cli, stores, tmp_path):
    out = tmp_path / "fig.png"
    result = cli("plot", stores["ragged"], "spectrum", "-o", out)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'spectrum' is not one of 'overview', 'layers', 'heads', 'batches', 'entropy'" in result.output
    assert not out.exists()


def test_cli_bad_format_and_store(cli, stores, tmp_path):
    line = one_error_line(cli("plot", stores["ragged"], "overview", "-o", tmp_path / "fig.jpg"))
    assert line.endswith("cannot tell the image format from '.jpg'; use .png, .svg or .pdf")
    line = one_error_line(cli("plot", stores["ragged"], "overview", "-o", tmp_path / "fig"))
    assert "no extension" in line
    line = one_error_line(cli("plot", tmp_path / "nothing.zarr", "overview", "-o", tmp_path / "fig.png"))
    assert line == f"error: {tmp_path / 'nothing.zarr'}: no such store"
    line = one_error_line(cli("plot", stores["ragged"], "overview", "-o", tmp_path / "no" / "dir" / "fig.png"))
    assert "cannot write it" in line
    line = one_error_line(cli("report", stores["ragged"], "-o", tmp_path / "report.pdf"))
    assert "ending in .html" in line
    if not STATS_MISSING:  # the corpus figures need statistics, and say so (the tokens store never gets any)
        line = one_error_line(cli("plot", stores["tokens"], "entropy", "-o", tmp_path / "fig.png"))
        assert "no statistics" in line and "fastattn stats" in line


# ---------------------------------------------------------------- long sequences: drawn at the figure's resolution

LONG, SHORT, LONG_LAYERS, LONG_HEADS = 1000, 300, 4, 2


def diagonal_softmax(rng, layers: int, heads: int, n: int) -> np.ndarray:
    """Softmax rows of random logits plus a diagonal bias, float32 (layer, head, n, n)."""
    logits = rng.standard_normal((layers, heads, n, n), dtype=np.float32) * 1.5
    logits += 4.0 * np.eye(n, dtype=np.float32)
    logits -= logits.max(axis=-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    return logits


@pytest.fixture(scope="module")
def long_store(tmp_path_factory) -> str:
    """Batch 0 of LONG tokens, batch 1 of SHORT (NaN-padded to LONG); one chunk per (batch, layer)."""
    from conftest import write_dump

    root = tmp_path_factory.mktemp("long")
    rng = np.random.default_rng()
    write_dump(root / "d" / "a_long.npz", diagonal_softmax(rng, LONG_LAYERS, LONG_HEADS, LONG))
    write_dump(root / "d" / "b_short.npz", diagonal_softmax(rng, LONG_LAYERS, LONG_HEADS, SHORT))
    path = str(root / "long.zarr")
    assert ingest([str(root / "d")], path, jobs=2).ok
    return path


def reference_block_means(a: np.ndarray, factor: int) -> np.ndarray:
    """float64 block means by padding with NaN to whole blocks and taking nanmean (independent of plot)."""
    q, k = (math.ceil(s / factor) * factor for s in a.shape)
    padded = np.full((q, k), np.nan)
    padded[: a.shape[0], : a.shape[1]] = a
    return np.nanmean(padded.reshape(q // factor, factor, k // factor, factor), axis=(1, 3))


def block_factor_of(label: str) -> int:
    """The f of "(mean of f × f blocks)" in a colour bar label; 1 when the map is exact."""
    found = re.search(r"mean of (\d+) × (\d+) blocks", label)
    if not found:
        return 1
    assert found[1] == found[2]
    return int(found[1])


@pytest.mark.parametrize("shape, factor", [((1000, 1000), 8), ((1003, 997), 7), ((64, 64), 1), ((50, 40), 64), ((1, 9), 2)])
def test_block_means_match_a_numpy_reference(shape, factor, rng):
    a = rng.random(shape, dtype=np.float32)
    got = plot.block_means(a, factor)
    expected = reference_block_means(a.astype(np.float64), factor)
    assert got.shape == expected.shape == tuple(math.ceil(s / factor) for s in shape)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    if factor == 1:
        assert np.array_equal(got, a.astype(np.float64))  # small maps: the values themselves
    # the sums keep the total: nothing is dropped at the ragged edge
    assert math.isclose(plot.block_sums(a, factor).sum(), a.astype(np.float64).sum(), rel_tol=1e-6)
    assert plot.block_factor(1000, 483) == 3 and plot.block_factor(300, 483) == 1


def test_mean_row_entropy_matches_float64(rng, samples):
    """Random softmax rows with exact zeros, and a real MiniLM plane."""
    a = rng.random((300, 257), dtype=np.float32) ** 6
    a[rng.random(a.shape) < 0.2] = 0.0
    a /= a.sum(axis=1, keepdims=True)
    real = np.load(sorted(samples.rglob("*.npz"))[0], allow_pickle=False)["attention_weights"]
    real = real.reshape(-1, *real.shape[-2:])[3]
    for plane in (a, real):
        p = plane.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            expected = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1).mean()
        assert math.isclose(plot.mean_row_entropy(plane), expected, rel_tol=1e-6)


def drawn_pixels(fig, ax, dpi) -> int:
    """Pixels along the shorter side of `ax` as saved at `dpi` (after the final layout)."""
    import io

    fig.savefig(io.BytesIO(), format="png", dpi=dpi)
    box = ax.get_window_extent()
    return int(min(box.width, box.height))


def test_long_sample_heatmap_holds_block_means(long_store):
    ds = open_store(long_store)
    fig = plot.overview(ds, 0, 1, dpi=80)
    heat, bars, lines, cbar = fig.get_axes()
    cells = heat.images[0].get_array()
    factor = block_factor_of(cbar.get_ylabel())
    assert factor > 1 and f"(mean of {factor} × {factor} blocks)" in heat.get_title()
    # about one cell per pixel: never more cells than pixels, never fewer than half
    pixels = drawn_pixels(fig, heat, 80)
    assert cells.shape == (math.ceil(LONG / factor),) * 2
    assert pixels / 2 < cells.shape[0] <= pixels + 1
    stored = ds.attention.isel(batch=0, layer=1).values.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(cells, reference_block_means(stored, factor), rtol=1e-5)
    # on token positions: the last partial block is cropped at the sample's end
    assert heat.get_xlim() == (-0.5, LONG - 0.5) and heat.get_ylim() == (LONG - 0.5, -0.5)
    left, right, bottom, top = heat.images[0].get_extent()
    assert (left, top) == (-0.5, -0.5) and right == bottom == cells.shape[0] * factor - 0.5

    # incoming attention: every key's exact column sum, as one line (no bar per key)
    assert not bars.patches
    (incoming,) = [ln for ln in bars.get_lines() if len(ln.get_xdata()) == LONG]
    np.testing.assert_allclose(incoming.get_ydata(), stored.sum(axis=0), rtol=1e-5)
    assert legend_texts(bars) == [f"Peak (t={int(np.argmax(stored.sum(axis=0)))})"]

    # rows: every step-th query, at most MAX_ROW_LINES, and the mean over all of them
    step = math.ceil(LONG / plot.MAX_ROW_LINES)
    thin = [ln for ln in lines.get_lines() if ln.get_alpha() == 0.3]
    assert len(thin) == len(range(0, LONG, step)) <= plot.MAX_ROW_LINES
    np.testing.assert_allclose(np.array([ln.get_ydata() for ln in thin]), stored[::step], rtol=1e-5)
    mean_line = [ln for ln in lines.get_lines() if ln.get_label() == f"Mean over all {LONG} queries"][0]
    np.testing.assert_allclose(mean_line.get_ydata(), stored.mean(axis=0), rtol=1e-5)
    assert f"{len(thin)} of {LONG} queries, {step} apart" in legend_texts(lines)


def test_short_sample_is_drawn_exactly(long_store):
    """The 300-token sample of the same store gets one cell per token where it has the
    pixels (the overview), block means where it has not (a heads grid at low dpi)."""
    ds = open_store(long_store)
    stored = ds.attention.isel(batch=1, layer=2).values[:, :SHORT, :SHORT].astype(np.float64)
    fig = plot.overview(ds, 1, 2, head=1, dpi=100)
    heat, _, lines, cbar = fig.get_axes()
    assert cbar.get_ylabel() == "Attention weight" and heat.get_title() == "Attention matrix"
    np.testing.assert_array_equal(heat.images[0].get_array(), stored[1])
    assert drawn_pixels(fig, heat, 100) >= SHORT
    fig = plot.heads(ds, 1, 2, dpi=40)
    factor = block_factor_of(fig.get_axes()[-1].get_ylabel())
    assert factor > 1
    for head in range(LONG_HEADS):
        cells = fig.get_axes()[head].images[0].get_array()
        np.testing.assert_allclose(cells, reference_block_means(stored[head], factor), rtol=1e-5)
        assert cells.shape[0] <= drawn_pixels(fig, fig.get_axes()[head], 40) + 1


def test_report_style_figures_share_one_read(long_store):
    """Several figures of one sample from one read: the same maps and titles as drawn
    alone; the statistics' entropy gives the same titles as computing it."""
    ds = open_store(long_store)
    sample = plot.Sample(ds, 0)
    together = sample.draw([plot.Overview(sample, 2, dpi=60), plot.Layers(sample, dpi=60), plot.Heads(sample, 2, dpi=60)])
    alone = [plot.overview(ds, 0, 2, dpi=60), plot.layers(ds, 0, dpi=60), plot.heads(ds, 0, 2, dpi=60)]
    for a, b in zip(together, alone):
        for ax_a, ax_b in zip(a.get_axes(), b.get_axes()):
            assert ax_a.get_title() == ax_b.get_title()
            for im_a, im_b in zip(ax_a.images, ax_b.images):
                np.testing.assert_array_equal(im_a.get_array(), im_b.get_array())
    computed = [ax.get_title() for ax in together[2].get_axes()[:LONG_HEADS]]
    planes = ds.attention.isel(batch=0, layer=2).values.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(planes > 0, planes * np.log(planes), 0.0).sum(-1).mean(-1)
    assert computed == [f"Head {h}: H = {entropy[h]:.2f} nats" for h in range(LONG_HEADS)]
    given = sample.draw([plot.Heads(sample, 2, dpi=60, entropy=entropy)])[0]
    assert [ax.get_title() for ax in given.get_axes()[:LONG_HEADS]] == computed


def attention_reads(monkeypatch) -> list[tuple[str, int]]:
    """(key, bytes) of every attention chunk read from a local store from now on."""
    import zarr.storage

    read: list[tuple[str, int]] = []
    original = zarr.storage.LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        value = await original(self, key, *args, **kwargs)
        if key.startswith("attention/c."):
            read.append((key, len(value) if value is not None else 0))
        return value

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    return read


def test_figures_read_only_the_chunks_they_draw(long_store, monkeypatch):
    ds = open_store(long_store)
    chunks = ds.attention.encoding["chunks"]
    assert chunks[0] == chunks[1] == 1 and chunks[3:] == (LONG, LONG)  # whole planes; heads as the store splits them
    step = chunks[2]
    chunk_bytes = {
        str(p.relative_to(long_store)): p.stat().st_size for p in Path(long_store, "attention").glob("c.*")
    }

    def chunk(b, layer, head):
        return f"attention/c.{b}.{layer}.{head // step}.0.0"

    read = attention_reads(monkeypatch)
    plot.overview(ds, 0, 1, head=1, dpi=50)
    assert read == [(chunk(0, 1, 1), chunk_bytes[chunk(0, 1, 1)])]  # one plane: its chunk, once
    read.clear()
    plot.heads(ds, 1, 2, dpi=50)
    want = sorted({chunk(1, 2, h) for h in range(LONG_HEADS)})
    assert sorted(read) == [(key, chunk_bytes[key]) for key in want]
    read.clear()
    sample = plot.Sample(ds, 0)
    heads_grids = [plot.Heads(sample, layer, dpi=50) for layer in range(LONG_LAYERS)]
    sample.draw([plot.Overview(sample, 0, dpi=50), plot.Layers(sample, dpi=50), *heads_grids])
    assert sorted(read) == sorted((key, size) for key, size in chunk_bytes.items() if key.startswith("attention/c.0."))


def traced_peak(call) -> int:
    """Peak bytes traced by tracemalloc while `call()` runs."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_layers_memory_is_one_chunk_not_the_sample(long_store):
    """`layers` holds one layer's chunk at a time: its peak is what reading one chunk costs
    (zarr's own buffers included) plus a little, far under reading the whole sample."""
    ds = open_store(long_store)
    chunk = LONG_HEADS * LONG * LONG * 4
    plot.layers(ds, 0, dpi=50)  # warm: imports and caches outside the measurement
    one_chunk = traced_peak(lambda: ds.attention.isel(batch=0, layer=1).values)
    whole_sample = traced_peak(lambda: ds.attention.isel(batch=0).values)
    peak = traced_peak(lambda: plot.layers(ds, 0, dpi=50))
    assert peak < one_chunk + 3 * chunk < whole_sample, (peak, one_chunk, whole_sample)


def test_nan_quantiles_match_numpy(rng):
    values = rng.standard_normal((37, 300))
    values[rng.random(values.shape) < 0.4] = np.nan  # ragged: keys past a sample's length
    values[:, 7] = np.nan  # a key no batch reaches
    values[:-1, 8] = np.nan  # one batch only
    with pytest.warns(RuntimeWarning):
        expected = np.nanquantile(values, [0.1, 0.5, 0.9], axis=0)
    np.testing.assert_allclose(plot.nan_quantiles(values, [0.1, 0.5, 0.9]), expected, rtol=1e-12, atol=1e-15)
    full = rng.random((1, 50))
    np.testing.assert_allclose(plot.nan_quantiles(full, [0.1, 0.9]), np.quantile(full, [0.1, 0.9], axis=0), rtol=1e-12)
