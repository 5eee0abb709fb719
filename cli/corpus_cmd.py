"""`fastattn compare`, `roles`, `similarity` and `rollout`: corpus-level analyses (fastattn.corpus)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fastattn.choices import COMPARE_MATCHES, JS_WEIGHTS, MDS_METHODS

from ._common import PATH, TABLE_OR_JSON, console, err, rich_table, run


def _check_plot(path: Path | None) -> None:
    if path is not None:
        from fastattn.plot import file_format

        run(file_format, path)


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def _save(fig, path: Path) -> None:
    from fastattn.plot import save

    run(save, fig, path)
    err.print(f"wrote {path}", highlight=False)


SMOOTHING_HELP = (
    "Entropy of smoothed rows, p' = (1 - s) p + s / length, as Clark et al. 2019 (What Does BERT"
    " Look At?) compute it with s = 0.0001; 0 (default): the exact entropy. Reads every attention weight."
)


#: `--entropy-smoothing` of compare, roles and similarity.
smoothing_option = click.option(
    "--entropy-smoothing", "smoothing", metavar="S", type=click.FloatRange(0.0, 0.5), default=0.0, help=SMOOTHING_HELP
)


COMPARE_HELP = """Compare two stores head by head: what changed from A to B.

Batches are paired by position (the first min(A, B) batches) or by --match source (the
same sample of the same dump file: equal source and source_index). Per (layer, head),
over the paired batches: the change in mean entropy and in self-attention, the total
variation distance between the two histograms of the peak key, and the Jensen-Shannon
divergence (natural log) between the mean incoming attention of A and of B. Heads are
ranked by score = |change in normalised entropy| + |change in self-attention| + peak
TV + JS / ln 2 (each term in [0, 1]). Uses each store's statistics when `fastattn
stats` computed them for every batch, else computes them (nothing is written).
"""

ROLES_HELP = """Name the role of every head from the corpus statistics.

Each batch gets the first rule that holds, in this order: previous-token / next-token /
self (at least half of all attention falls on key q-1 / q+1 / q: the attention mass of
Clark et al. 2019 and TransformerLens's previous-token score), first-token / last-token /
single-key (key 0 / the last valid key / any one key receives at least a quarter of all
attention), local (mean attention distance at most min(2, length/8) tokens), broad
(normalised entropy at least 0.85). A head's role is the label of at least half of its
batches (samples of 4 tokens or more), else mixed; "support" is that share. The table
shows prev / next / self as mass/argmax: the attention mass, and the share of queries
whose top key is q-1 / q+1 / q (the argmax evidence of Voita et al. 2019). Uses the
statistics of `fastattn stats` when they cover every batch, else computes them (nothing
is written).
"""

SIMILARITY_HELP = """How alike the heads are: Jensen-Shannon divergence between every pair of heads.

Each query row is smoothed first (p' = (1 - eps) p + eps / length), the divergence (natural
log, 0 to ln 2) is averaged over the valid queries, then over the batches (each batch
weighs the same; --weight token: each token does, as Clark et al. 2019). Prints each
head's nearest head and its 2-D position from classical MDS of sqrt(JS), or from metric
MDS (SMACOF) of JS as Clark et al. 2019 (--mds smacof, needs scikit-learn: the compat extra), with the
map's stress-1; --plot draws the heads on that map (colour: layer, marker size: mean
entropy). Reads every attention weight.
"""

ROLLOUT_HELP = """Attention rollout (Abnar & Zuidema 2020) of every sample, saved in the store.

Per sample: average the heads, add the residual (A + I, rows renormalised) and multiply
through the layers. Writes `rollout_incoming (batch, layer, key)` (the mean over queries
of each column of the rollout: how much each input token feeds the sequence after each
layer) to the store's `rollout` group, plus the matrices `rollout (batch, layer, query,
key)` with --keep-matrix; read them back with fastattn.corpus.open_rollout. Then prints,
per layer, the mean share of the first key ([CLS]), of the last valid key ([SEP]) and of
the other keys, and the key that most often receives the most.
"""


@click.command(help=COMPARE_HELP)
@click.argument("a", metavar="A", help="The first store (.zarr): the baseline.")
@click.argument("b", metavar="B", help="The second store (.zarr): compared against A.")
@click.option("--match", type=click.Choice(COMPARE_MATCHES), default="position", help="Pair batches by 'position' or by 'source'.")
@click.option("--format", "fmt", type=TABLE_OR_JSON, default="table", help="table or json.")
@click.option("--top", type=click.IntRange(min=1), default=10, help="How many of the most changed heads to list.")
@click.option("--plot", type=PATH, metavar="FILE", help="Also draw a layer x head heatmap of the score (.png, .svg, .pdf).")
@smoothing_option
def compare(a: str, b: str, match: str, fmt: str, top: int, plot: Path | None, smoothing: float) -> None:
    from fastattn import corpus

    _check_plot(plot)
    cmp = run(lambda: corpus.compare(a, b, match=match, entropy_smoothing=smoothing))
    rows = corpus.ranked_changes(cmp, top=top)
    if plot is not None:
        from fastattn.plot import compare_map

        _save(compare_map(cmp), plot)
    if fmt == "json":
        body = {key: cmp.attrs[key] for key in ("match", "batches", "batches_a", "batches_b", "entropy_smoothing")}
        body.update({"a": a, "b": b, "score": "|d_entropy_norm| + |d_self| + peak_tv + incoming_js / ln 2", "heads": rows})
        print(json.dumps(body, indent=1))
        return
    table = rich_table(f"{a} -> {b}: {cmp.attrs['batches']} batches matched by {match}; top {len(rows)} heads by score")
    for column in ("head", "score", "d entropy", "d self-attn", "peak TV", "incoming JS"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["label"], _num(r["score"]), _signed(r["d_entropy"]), _signed(r["d_self"]),
            _num(r["peak_tv"]), _num(r["incoming_js"], 4),
        )
    console.print(table)


@click.command(help=ROLES_HELP)
@click.argument("store", metavar="STORE", help="The store (.zarr) written by fastattn ingest.")
@click.option("--format", "fmt", type=TABLE_OR_JSON, default="table", help="table or json.")
@smoothing_option
def roles(store: str, fmt: str, smoothing: float) -> None:
    from fastattn import corpus

    rows = run(lambda: corpus.head_roles(corpus.corpus_stats(store, entropy_smoothing=smoothing)))
    if fmt == "json":
        body = {
            "store": store, "rules": list(corpus.ROLE_RULES), "entropy_smoothing": smoothing,
            "thresholds": {"position_mass": corpus.POSITION_MASS, "sink_share": corpus.SINK_SHARE,
                           "local_distance": corpus.LOCAL_DISTANCE, "broad_entropy": corpus.BROAD_ENTROPY,
                           "role_share": corpus.ROLE_SHARE, "min_length": corpus.MIN_LENGTH},
            "heads": rows,
        }
        print(json.dumps(body, indent=1))
        return
    table = rich_table(f"{store}: head roles (support = share of batches; prev/next/self = attention mass/argmax share)")
    for column in ("head", "role", "support", "prev", "next", "self", "key 0", "last key", "entropy", "distance", "other labels"):
        table.add_column(column, justify="left" if column in ("role", "other labels") else "right",
                         no_wrap=column != "other labels")
    for r in rows:
        others = ", ".join(f"{k} {v:.0%}" for k, v in r["shares"].items() if k != r["role"] and v >= 0.05)
        table.add_row(
            r["label"], r["role"], f"{r['support']:.0%}",
            *(f"{_num(r[mass], 2)}/{_num(r[top], 2)}" for mass, top in zip(corpus.MASS_EVIDENCE, corpus.ARGMAX_EVIDENCE)),
            _num(r["first_token"], 2), _num(r["last_token"], 2), _num(r["entropy"], 2), _num(r["distance"], 1), others,
        )
    console.print(table)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["role"]] = counts.get(r["role"], 0) + 1
    console.print("roles: " + ", ".join(f"{role} {n}" for role, n in counts.items()), highlight=False)


@click.command(help=SIMILARITY_HELP)
@click.argument("store", metavar="STORE", help="The store (.zarr) written by fastattn ingest.")
@click.option("--plot", type=PATH, metavar="FILE", help="Draw the heads' MDS map into this file (.png, .svg, .pdf).")
@click.option("--format", "fmt", type=TABLE_OR_JSON, default="table", help="table or json (json includes the whole matrix).")
@click.option("--eps", type=click.FloatRange(0.0, 0.5), default=1e-3, help="Uniform part mixed into each row before the divergence.")
@click.option(
    "--batches", type=click.IntRange(min=1),
    help="Use only the first N batches (the cost grows as batches x length^2 x (layers x heads)^2).",
)
@click.option(
    "--weight", type=click.Choice(JS_WEIGHTS), default="sample",
    help="How the corpus average weighs the batches: 'sample' (each the same) or 'token' (each by its"
    " valid tokens, as Clark et al. 2019's head_distances.py, which sums over all tokens).",
)
@click.option(
    "--mds", "method", type=click.Choice(MDS_METHODS), default="classical",
    help="'classical' (Torgerson MDS of sqrt(JS)) or 'smacof' (metric MDS of JS by stress majorisation,"
    " as Clark et al. 2019 with scikit-learn's MDS; needs scikit-learn, the 'compat' extra of fastattn).",
)
@smoothing_option
def similarity(store: str, plot: Path | None, fmt: str, eps: float, batches: int | None, weight: str, method: str,
               smoothing: float) -> None:
    from fastattn import corpus, store as store_mod

    _check_plot(plot)

    def work():
        ds = store_mod.open_store(store)
        if batches is not None:
            ds = ds.isel(batch=slice(0, batches))
        sim = corpus.head_similarity(ds, eps=eps, weight=weight).compute()
        coords = corpus.mds(sim, method=method)
        return ds, sim, coords, corpus.stress(sim, coords, method)

    ds, sim, coords, fit = run(work)
    rows = corpus.similarity_table(sim, coords)
    if plot is not None:
        def stats():
            st = corpus.corpus_stats(store, entropy_smoothing=smoothing)
            return st.isel(batch=slice(0, ds.sizes["batch"]))

        from fastattn.plot import head_map

        _save(head_map(sim, run(stats) if ds.sizes["batch"] else None, method=method, coords=coords), plot)
    if fmt == "json":
        body = {
            "store": store, "eps": eps, "batches": int(ds.sizes["batch"]), "log": "natural", "weight": weight,
            "mds": method, "stress": None if fit != fit else fit, "labels": [r["label"] for r in rows], "js": sim["js"].values.tolist(),
            "heads": rows,
        }
        print(json.dumps(body, indent=1))
        return
    mds_name = "classical MDS of sqrt JS" if method == "classical" else "metric MDS (SMACOF) of JS"
    table = rich_table(
        f"{store}: Jensen-Shannon divergence between heads (eps {eps:g}, {ds.sizes['batch']} batches,"
        f" {weight}-weighted); {mds_name}, stress-1 {fit:.3f}"
    )
    for column in ("head", "nearest", "JS", "mean JS", "MDS x", "MDS y"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["label"], r["nearest"], _num(r["nearest_js"], 4), _num(r["mean_js"], 4), _num(r["x"]), _num(r["y"]))
    console.print(table)


@click.command(help=ROLLOUT_HELP)
@click.argument("store", metavar="STORE", help="The store (.zarr) written by fastattn ingest.")
@click.option("--keep-matrix", is_flag=True, help="Also save the rollout matrices (batch, layer, query, key), float32.")
@click.option("--format", "fmt", type=TABLE_OR_JSON, default="table", help="table or json.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Threads (default: all cores).")
def rollout(store: str, keep_matrix: bool, fmt: str, jobs: int | None) -> None:
    from fastattn import corpus
    from fastattn.store.schema import ROLLOUT

    done = run(lambda: corpus.write_rollout(store, keep_matrix=keep_matrix, jobs=jobs))
    rows = run(lambda: corpus.rollout_summary(corpus.open_rollout(store)))
    err.print(
        f"rollout of {done['batches']} batches written to {store}/{ROLLOUT.name}"
        + (" (with matrices)" if keep_matrix else ""),
        highlight=False,
    )
    if fmt == "json":
        print(json.dumps({"store": store, **done, "layers": rows}, indent=1))
        return
    table = rich_table(f"{store}: attention rollout, mean share of the input tokens after each layer")
    for column in ("layer", "first key", "last key", "other keys", "most often the top key"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r["layer"]), _num(r["first_key"]), _num(r["last_key"]), _num(r["other_keys"]),
            f"{r['top_key']} ({r['top_key_share']:.0%})",
        )
    console.print(table)


def register(app: click.Group) -> None:
    """Add compare, roles, similarity and rollout to the app."""
    for cmd in (compare, roles, similarity, rollout):
        app.add_command(cmd)
