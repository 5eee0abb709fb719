"""`fastattn plot` and `fastattn report`: figures and the self-contained HTML report."""

from __future__ import annotations

from pathlib import Path

import click

from fastattn.choices import PLOT_KINDS

from ._common import PATH, err, fail, run

PLOT_HELP = """Draw one figure of a store into FILE (png, svg or pdf, from FILE's extension).

\b
KIND is one of:
  overview  one sample: heatmap, incoming attention, row distributions
            (--batch, --layer, --head; no --head: mean of the heads)
  layers    one sample: a heatmap per layer, mean of the heads (--batch)
  heads     one sample: every head of a layer, with its entropy
            (--batch, --layer)
  batches   all batches: mean incoming attention per key, peak histogram
            (--layer, --head); reads only the statistics (fastattn stats)
  entropy   all batches: layer x head normalised entropy, flagged heads
            marked (needs fastattn stats)

Only each sample's valid tokens are drawn; tick labels are the token strings when the dumps had them, else positions. Long samples are drawn at the image's resolution: a heatmap with more tokens than pixels shows means of square blocks (its colour bar says so), and the row panel of overview draws every k-th query above 64.

\b
Examples:
  fastattn plot store.zarr overview --batch 3 --layer 5 -o fig.png
  fastattn plot store.zarr entropy -o entropy.svg
"""

REPORT_HELP = """Write one self-contained HTML page about a store (open it offline, mail it).

It opens with the figures for the whole corpus and for a representative sample (the one with the median length), then the findings (heads grouped by what they do, one line each, as `fastattn stats` prints them), the store's summary, and a layer x head table (entropy, self-attention, previous/next/first/last-token scores, most common peak key, flag counts).

Images are embedded; the page loads nothing from the network and runs no scripts. Statistics missing for any batch are computed (and saved in the store) first.
"""


@click.command("plot", help=PLOT_HELP, no_args_is_help=True)
@click.argument("store", metavar="STORE", help="The store (.zarr) made by `fastattn ingest`.")
@click.argument("kind", metavar="KIND", type=click.Choice(PLOT_KINDS), help="overview, layers, heads, batches or entropy.")
@click.option("-o", "--output", type=PATH, required=True, metavar="FILE", help="Image file to write: .png, .svg or .pdf.")
@click.option("--batch", default=0, help="Sample to draw (overview, layers, heads).")
@click.option("--layer", default=0, help="Layer to draw (overview, heads, batches).")
@click.option("--head", type=int, help="Head to draw (overview, batches); default: mean over heads.")
@click.option("--dpi", type=click.IntRange(10, 1200), default=100, help="Resolution of PNG output (dots per inch).")
def plot(store: str, kind: str, output: Path, batch: int, layer: int, head: int | None, dpi: int) -> None:
    from fastattn import plot as plot_mod

    fmt = run(plot_mod.file_format, output)

    def work():
        from fastattn.stats import open_stats
        from fastattn.store import open_store

        # the corpus figures read only the statistics (a store of statistics only has no maps)
        ds = open_stats(store) if kind in ("batches", "entropy") else plot_mod.open_sample_data(store)
        if kind == "overview":
            fig = plot_mod.overview(ds, batch, layer, head, dpi=dpi)
        elif kind == "layers":
            fig = plot_mod.layers(ds, batch, dpi=dpi)
        elif kind == "heads":
            fig = plot_mod.heads(ds, batch, layer, dpi=dpi)
        elif kind == "batches":
            fig = plot_mod.batches(ds, layer, head)
        else:
            fig = plot_mod.entropy_map(ds)
        try:
            plot_mod.save(fig, output, dpi=dpi)
        except OSError as exc:
            fail(f"{output}: cannot write it ({exc.strerror or exc})")

    run(work)
    err.print(f"wrote {kind} ({fmt}) to {output}", markup=False, highlight=False)


@click.command("report", help=REPORT_HELP, no_args_is_help=True)
@click.argument("store", metavar="STORE", help="The store (.zarr) made by `fastattn ingest`.")
@click.option("-o", "--output", type=PATH, default=Path("report.html"), help="HTML file to write.")
@click.option("--batch", type=int, help="Sample to show; default: the one with the median length.")
@click.option("--dpi", type=click.IntRange(30, 300), default=80, help="Resolution of the embedded images.")
def report(store: str, output: Path, batch: int | None, dpi: int) -> None:
    from fastattn import report as report_mod

    if output.suffix.lower() not in (".html", ".htm"):
        fail(f"{output}: the report is an HTML page; give a file name ending in .html")
    run(lambda: report_mod.write_report(store, output, batch=batch, dpi=dpi))
    err.print(f"wrote the report to {output}", markup=False, highlight=False)


def register(app: click.Group) -> None:
    """Add `plot` and `report` to the `fastattn` app."""
    app.add_command(plot)
    app.add_command(report)
