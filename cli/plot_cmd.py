"""`fastattn plot` and `fastattn report`: figures and the self-contained HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fastattn.choices import PLOT_KINDS

from ._common import choices, err, fail, run

Kind = choices("Kind", PLOT_KINDS)

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


def plot(
    store: str = typer.Argument(..., metavar="STORE", help="The store (.zarr) made by `fastattn ingest`."),
    kind: Kind = typer.Argument(..., metavar="KIND", help="overview, layers, heads, batches or entropy."),
    output: Path = typer.Option(..., "--output", "-o", metavar="FILE", help="Image file to write: .png, .svg or .pdf."),
    batch: int = typer.Option(0, help="Sample to draw (overview, layers, heads)."),
    layer: int = typer.Option(0, help="Layer to draw (overview, heads, batches)."),
    head: Optional[int] = typer.Option(None, help="Head to draw (overview, batches); default: mean over heads."),
    dpi: int = typer.Option(100, min=10, max=1200, help="Resolution of PNG output (dots per inch)."),
) -> None:
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
    err.print(f"wrote {kind.value} ({fmt}) to {output}", markup=False, highlight=False)


def report(
    store: str = typer.Argument(..., metavar="STORE", help="The store (.zarr) made by `fastattn ingest`."),
    output: Path = typer.Option(Path("report.html"), "--output", "-o", help="HTML file to write."),
    batch: Optional[int] = typer.Option(None, help="Sample to show; default: the one with the median length."),
    dpi: int = typer.Option(80, min=30, max=300, help="Resolution of the embedded images."),
) -> None:
    from fastattn import report as report_mod

    if output.suffix.lower() not in (".html", ".htm"):
        fail(f"{output}: the report is an HTML page; give a file name ending in .html")
    run(lambda: report_mod.write_report(store, output, batch=batch, dpi=dpi))
    err.print(f"wrote the report to {output}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add `plot` and `report` to the `fastattn` app."""
    app.command("plot", help=PLOT_HELP, no_args_is_help=True)(plot)
    app.command("report", help=REPORT_HELP, no_args_is_help=True)(report)
