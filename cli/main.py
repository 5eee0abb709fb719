"""`fastattn`: the command line. Parses arguments, calls the library, prints; nothing else."""

from __future__ import annotations

import gc
import importlib
import json
from pathlib import Path

import click

from ._common import (
    PATH,
    SCHEDULER_HELP,
    STORAGE_HELP,
    STORE_DTYPE,
    WORKERS_HELP,
    console,
    err,
    fail,
    progress_bar,
    repeatable,
    run,
    storage_options,
)


class _Commands(click.Group):
    """Lists the commands in the order of a session (click sorts them by name), each with the
    whole first sentence of its help (click cuts it at ~60 characters, mid-sentence); the
    second column wraps instead."""

    def list_commands(self, ctx) -> list[str]:
        return list(self.commands)

    def format_commands(self, ctx, formatter) -> None:
        rows = [(name, self.get_command(ctx, name).get_short_help_str(limit=1000)) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        """Ctrl-C ends a command with one line and exit code 130 (click would say "Aborted!", 1)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            err.print("interrupted; the store still opens at its last commit")
            raise click.exceptions.Exit(130) from None


app = _Commands(
    name="fastattn",
    help=(
        "Analyse thousands of transformer attention dumps as one labelled array.\n\n"
        "Typical session: `fastattn synth dumps/` (or your own .npz dumps), "
        "`fastattn ingest dumps/ store.zarr`, `fastattn stats store.zarr`, "
        "`fastattn plot store.zarr overview -o fig.png`."
    ),
    no_args_is_help=True,
    context_settings={"show_default": True},
)


@app.command()
@click.argument("out_dir", type=PATH, help="Folder to write attention_batch_NNNNN.npz files into.")
@click.option("-n", "--files", type=click.IntRange(min=1), default=100, help="How many dump files.")
@click.option("--layers", type=click.IntRange(min=1), default=6, help="Layers per dump.")
@click.option("--heads", type=click.IntRange(min=1), default=12, help="Heads per layer.")
@click.option("--seq", default="64", help="Sequence length, or a range MIN-MAX for ragged lengths (e.g. 24-64).")
@click.option(
    "--batch", type=click.IntRange(min=1),
    help="Samples per file: adds the batch axis (layer, batch, head, q, k) and an attention_mask.",
)
@click.option("--seed", default=0, help="Random seed; the same seed gives the same files.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Threads (default: all cores).")
def synth(out_dir: Path, files: int, layers: int, heads: int, seq: str, batch: int | None, seed: int,
          jobs: int | None) -> None:
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
@click.argument(
    "inputs", nargs=-1, required=True,
    help="Dump folders (searched recursively for *.npz), files or glob patterns, then the STORE path last.",
)
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Parallel readers/writers (default: all cores).")
@click.option(
    "--layout",
    help="Axis order of attention_weights when it is not the default: letters b(atch) l(ayer) h(ead) q(uery) k(ey), "
    "e.g. 'blhqk'. Default: detected from ndim (4 → lhqk, 5 → lbhqk).",
)
@click.option(
    "--dtype", type=STORE_DTYPE, default="float32",
    help="Storage dtype when the store is created: float32, or float16 to halve the store "
    "(float16 keeps ~3 significant digits: relative error up to 4.9e-4, weights below 6e-8 become 0).",
)
@click.option("--replace/--no-replace", help="Re-ingest files that changed since they were ingested (same sample count).")
@click.option("--strict/--no-strict", help="Validate every file first; write nothing if any file is bad.")
@click.option(
    "--infer-padding/--no-infer-padding", default=True,
    help="A self-attention dump without attention_mask: cut each sample's trailing key columns that are "
    "exactly 0 everywhere (padding saved without its mask). --no-infer-padding keeps the full length.",
)
@click.option("--json", "json_out", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--scheduler", help=SCHEDULER_HELP)
@click.option("--workers", type=click.IntRange(min=1), help=WORKERS_HELP)
@repeatable("--storage-option", help=STORAGE_HELP)
def ingest(inputs: tuple[str, ...], jobs: int | None, layout: str | None, dtype: str, replace: bool, strict: bool,
           infer_padding: bool, json_out: bool, scheduler: str | None, workers: int | None,
           storage_option: list[str] | None) -> None:
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
                sources, store, jobs=jobs, layout=layout, dtype=dtype, replace=replace, strict=strict,
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
        err.print(report.summary(), markup=False, highlight=False)
    raise click.exceptions.Exit(0 if report.ok else 1)


@app.command()
@click.argument("path", help="A store (.zarr) or a single .npz dump.")
@click.option("--layout", help="For a dump: its axis order, as for ingest.")
@click.option("--json", "json_out", is_flag=True, help="Print JSON instead of text.")
def info(path: str, layout: str | None, json_out: bool) -> None:
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
    finally:
        # The process ends here. Python's last full collection would walk every object the
        # imports made (Numba's types and registries, zarr's), ~0.3 CPU-s of a `fastattn stats`
        # (docs/performance.md): frozen, they are left to the exit.
        gc.freeze()
