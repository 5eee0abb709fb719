"""`fastattn`: the command line. Parses arguments, calls the library, prints; nothing else."""

from __future__ import annotations

import gc
import importlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from ._common import (
    SCHEDULER_HELP,
    STORAGE_HELP,
    WORKERS_HELP,
    StoreDtype,
    console,
    err,
    fail,
    progress_bar,
    run,
    storage_options,
)


class _Commands(TyperGroup):
    """Lists each command with the whole first sentence of its help (click cuts it at ~60
    characters, mid-sentence); the second column wraps instead."""

    def format_commands(self, ctx, formatter) -> None:
        rows = [(name, self.get_command(ctx, name).get_short_help_str(limit=1000)) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


app = typer.Typer(
    name="fastattn",
    cls=_Commands,
    help=(
        "Analyse thousands of transformer attention dumps as one labelled array.\n\n"
        "Typical session: `fastattn synth dumps/` (or your own .npz dumps), "
        "`fastattn ingest dumps/ store.zarr`, `fastattn stats store.zarr`, "
        "`fastattn plot store.zarr overview -o fig.png`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: paragraphs reflowed to the terminal's width, and no rich to import
    # (typer's rich help took a third of `fastattn --help`'s time)
    rich_markup_mode=None,
)


@app.command()
def synth(
    out_dir: Path = typer.Argument(..., help="Folder to write attention_batch_NNNNN.npz files into."),
    files: int = typer.Option(100, "--files", "-n", min=1, help="How many dump files."),
    layers: int = typer.Option(6, min=1, help="Layers per dump."),
    heads: int = typer.Option(12, min=1, help="Heads per layer."),
    seq: str = typer.Option("64", help="Sequence length, or a range MIN-MAX for ragged lengths (e.g. 24-64)."),
    batch: Optional[int] = typer.Option(
        None, min=1, help="Samples per file: adds the batch axis (layer, batch, head, q, k) and an attention_mask."
    ),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same files."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Threads (default: all cores)."),
) -> None:
    """Write realistic synthetic dumps for demos, tests and benchmarks.

    Weights are a real softmax(QKᵀ/√d) with local, previous-token, sink, critical-key and broad heads."""
    from fastattn import synth as synth_mod

    def work(advance):
        return synth_mod.synthesize(
            out_dir, files=files, layers=layers, heads=heads, seq=seq, batch=batch, seed=seed, jobs=jobs, progress=advance
        )

    with progress_bar("synthesising") as advance:
        paths = run(work, advance)
    err.print(f"wrote {len(paths)} dumps to {out_dir}")


@app.command()
def ingest(
    inputs: list[str] = typer.Argument(
        ..., help="Dump folders (searched recursively for *.npz), files or glob patterns, then the STORE path last."
    ),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Parallel readers/writers (default: all cores)."),
    layout: Optional[str] = typer.Option(
        None,
        help="Axis order of attention_weights when it is not the default: letters b(atch) l(ayer) h(ead) q(uery) k(ey), "
        "e.g. 'blhqk'. Default: detected from ndim (4 → lhqk, 5 → lbhqk).",
    ),
    dtype: StoreDtype = typer.Option(
        StoreDtype.float32,
        help="Storage dtype when the store is created: float32, or float16 to halve the store "
        "(float16 keeps ~3 significant digits: relative error up to 4.9e-4, weights below 6e-8 become 0).",
    ),
    replace: bool = typer.Option(False, help="Re-ingest files that changed since they were ingested (same sample count)."),
    strict: bool = typer.Option(False, help="Validate every file first; write nothing if any file is bad."),
    infer_padding: bool = typer.Option(
        True,
        "--infer-padding/--no-infer-padding",
        help="A self-attention dump without attention_mask: cut each sample's trailing key columns that are "
        "exactly 0 everywhere (padding saved without its mask). --no-infer-padding keeps the full length.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    scheduler: Optional[str] = typer.Option(None, help=SCHEDULER_HELP),
    workers: Optional[int] = typer.Option(None, min=1, help=WORKERS_HELP),
    storage_option: Optional[list[str]] = typer.Option(None, "--storage-option", help=STORAGE_HELP),
) -> None:
    """Consolidate .npz attention dumps into one chunked, compressed Zarr store.

    Idempotent (re-running adds nothing), resumable (a killed run is completed by running it
    again), parallel. Each bad file is reported as one line `path: reason` and skipped; the
    exit code is 1 if any file was rejected.
    """
    from fastattn import cluster
    from fastattn.ingest import ingest as ingest_dumps

    gc.freeze()  # the imports' objects (zarr's, NumPy's): the full collection during an ingest skips them (see main)
    if len(inputs) < 2:
        fail("give at least one dump folder, file or pattern, and the store path last")
    *sources, store = inputs
    options = storage_options(storage_option)

    def work(advance):
        with cluster.connect(scheduler, workers) as client:
            return ingest_dumps(
                sources, store, jobs=jobs, layout=layout, dtype=dtype.value, replace=replace, strict=strict,
                infer_padding=infer_padding, progress=advance, storage_options=options, client=client,
            )

    with progress_bar("ingesting") as advance:
        report = run(work, advance)
    for rejection in report.rejected:
        err.print(str(rejection), markup=False, highlight=False)
    for duplicate in report.duplicates:
        err.print(str(duplicate), markup=False, highlight=False)
    if strict and report.rejected:
        err.print(f"--strict: {len(report.rejected)} bad files, nothing written")
    if json_out:
        body = {k: v for k, v in report.__dict__.items() if k not in ("rejected", "duplicates")}
        body["rejected"] = [r.__dict__ for r in report.rejected]
        body["duplicates"] = [r.__dict__ for r in report.duplicates]
        body["mb_per_s"] = report.mb_per_s
        print(json.dumps(body, indent=1))
    else:
        err.print(report.summary(), highlight=False)
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def info(
    path: str = typer.Argument(..., help="A store (.zarr) or a single .npz dump."),
    layout: Optional[str] = typer.Option(None, help="For a dump: its axis order, as for ingest."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Describe a store or a single dump.

    A store: batches, shape, length histogram, size on disk and compression, sources, last ingest.
    A dump: its arrays, shapes, dtypes and the layout detected."""
    from fastattn import dumps, summary
    from fastattn.errors import DumpError

    is_dump = Path(path).is_file()

    def describe():
        try:
            return dumps.describe(path, layout)
        except DumpError as exc:  # its message is the reason alone
            if path.lower().endswith(".npz"):
                fail(f"{path}: {exc}")
            fail(f"{path}: a file that is neither a store (a folder) nor an .npz dump: {exc}")

    body = run(describe if is_dump else lambda: summary.store_info(path))
    if json_out:
        print(json.dumps(body, indent=1))
    else:
        console.print(summary.format_dump(body) if is_dump else summary.format_store(body), highlight=False)


# Commands that live in modules of their own.
for _module in ("stats_cmd", "plot_cmd", "capture_cmd", "check_cmd", "corpus_cmd"):
    importlib.import_module(f"{__package__}.{_module}").register(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; the store still opens at its last commit")
        sys.exit(130)
    finally:
        # The process ends here. Python's last full collection would walk every object the
        # imports made (Numba's types and registries, zarr's), ~0.3 CPU-s of a `fastattn stats`
        # (docs/performance.md): frozen, they are left to the exit.
        gc.freeze()
