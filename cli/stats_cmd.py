"""`fastattn stats`: compute what is missing, then print the layer × head summary."""

from __future__ import annotations

import csv
import io
import json
import click

from ._common import (
    SCHEDULER_HELP,
    STORAGE_HELP,
    TABLE_JSON_OR_CSV,
    WORKERS_HELP,
    console,
    err,
    progress_bar,
    repeatable,
    rich_table,
    run,
    storage_options,
)


#: Findings listed under the table (all of them, with every head, go to --format json).
MAX_FINDINGS = 24
#: Table columns of the duplicate-token and induction scores (means over the batches with repeats).
REPEAT_COLUMNS = {"duplicate_token": "dup. token", "induction": "induction"}


def _pct(value: float) -> str:
    return f"{value:.0%}" if value else "-"


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


@click.command()
@click.argument("store", help="The store (.zarr) written by fastattn ingest.")
@click.option("-k", type=click.IntRange(1, 64), default=5, help="Top-k keys kept per query.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Threads (default: all cores).")
@click.option("--format", "fmt", type=TABLE_JSON_OR_CSV, default="table", help="table, json or csv.")
@repeatable("--layer", type=int, help="Show only this layer (repeatable).")
@repeatable("--head", type=int, help="Show only this head (repeatable).")
@click.option("--scheduler", help=SCHEDULER_HELP)
@click.option("--workers", type=click.IntRange(min=1), help=WORKERS_HELP)
@repeatable("--storage-option", help=STORAGE_HELP)
@repeatable(
    "--token-class", metavar="NAME=REGEX",
    help="A class of tokens (repeatable): the tokens whose whole string matches REGEX, beside the default"
    " classes special and punct. Token classes are reported when the store has token strings.",
)
@click.option(
    "--sep-sep", is_flag=True,
    help="Also [SEP]→[SEP]: reads the attention again at the separators (no other option does).",
)
def stats(store: str, k: int, jobs: int | None, fmt: str, layer: list[int] | None, head: list[int] | None,
          scheduler: str | None, workers: int | None, storage_option: list[str] | None,
          token_class: list[str] | None, sep_sep: bool) -> None:
    """Compute attention statistics for every (batch, layer, head) and summarise them.

    Only batches without statistics are computed (incremental), in one fused Numba pass per
    chunk; results go to the store's `stats` group. Then prints a layer × head table (mean
    entropy, normalised entropy, self-attention, most common peak key, flag shares) and the
    findings, one line each: the heads grouped by what they do. Previous-token, next-token,
    first-token and last-token heads by their mean attention mass on q−1, q+1, key 0 and
    the last key; duplicate-token and induction heads by TransformerLens's scores (when the
    dumps carried input_ids; means over the batches whose tokens repeat); then the heads where a flag holds in at least half the batches (dominant
    and critical keys grouped by key, diagonal_only, strong_self, uniform, weak; thresholds
    scale with each sample's length, see fastattn.stats).

    When the store has token strings: the attention on each token class per head (mean over
    queries of the weight on the class's keys: special tokens, punctuation, each --token-class,
    from the statistics alone), with --sep-sep [SEP]→[SEP] (mean over separator queries of
    their weight on separators), and the heads that put at least half of their attention on
    one class (see fastattn.tokens).
    """
    from fastattn import cluster, summary, tokens
    from fastattn import stats as stats_mod

    options = storage_options(storage_option)
    classes = run(tokens.parse_token_classes, token_class or ())

    def work(advance):
        with cluster.connect(scheduler, workers) as client:
            return stats_mod.write_stats(
                store, k=k, jobs=jobs, storage_options=options, client=client, progress=advance,
                planes=summary.TABLE_PLANES,
            )

    with progress_bar("statistics") as advance:
        done = run(work, advance)

    def read_table():
        if "planes" in done:  # every batch computed now: the arrays just stored, not read back
            return summary.computed_head_table(done["planes"], layer=layer, head=head)
        with stats_mod.read_errors(store):
            return summary.store_head_table(store, layer=layer, head=head, storage_options=options)

    table = run(read_table)

    def read_token_classes():
        try:
            with stats_mod.read_errors(store):
                return tokens.token_class_stats(
                    store, classes=classes, sep_sep=sep_sep, layer=layer, head=head, storage_options=options
                )
        except tokens.NoTokenStrings:
            if classes or sep_sep:  # asked for: say why there are none
                raise
            return None

    scores = run(read_token_classes)
    if scores is not None:
        tokens.add_to_table(table, scores)
    rows = summary.head_rows(table)
    found = summary.findings(table)
    err.print(f"statistics: {done['computed']} batches computed now, {done['total']} in store", markup=False, highlight=False)
    if fmt == "json":
        print(json.dumps({"batches": done["total"], "computed": done["computed"], "heads": rows, "findings": found}, indent=1))
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["layer", "head"])
        writer.writeheader()
        writer.writerows(rows)
        print(out.getvalue(), end="")
    else:
        grid = rich_table(f"{store}: {done['total']} batches")
        token_columns = table.get("token_means", [])
        titles = [name[3:] if name.startswith("to_") else "sep→sep" for name in token_columns]
        # the repeat scores only when some batch repeats a token id (they need the dumps' input_ids)
        repeats = [name for name in ("duplicate_token", "induction") if any(r.get(name) is not None for r in rows)]
        columns = ("layer", "head", "entropy", "norm.", "self-attn", *(REPEAT_COLUMNS[n] for n in repeats), *titles,
                   "peak key", "flags (share of batches)")
        for column in columns:
            grid.add_column(column, justify="right" if column != "flags (share of batches)" else "left")
        for r in rows:
            flags = ", ".join(
                f"{name} {r[name]:.0%}" for name in stats_mod.FLAGS if r[name] >= 0.05
            )
            grid.add_row(
                str(r["layer"]),
                str(r["head"]),
                _num(r["entropy_mean"]),
                _num(r["entropy_norm"]),
                _num(r["self_attention"]),
                *(_num(r[name]) for name in repeats),
                *(_num(r[name]) for name in token_columns),
                f"{r['peak_key']} ({_pct(r['peak_key_share'])})",
                flags,
            )
        console.print(grid)
        for finding in found[:MAX_FINDINGS]:
            console.print(summary.finding_line(finding), highlight=False, markup=False)
        if len(found) > MAX_FINDINGS:
            console.print(f"… and {len(found) - MAX_FINDINGS} more findings (see --format json)")


def register(app: click.Group) -> None:
    """Add `fastattn stats` to the app."""
    app.add_command(stats)
