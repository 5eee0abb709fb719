"""`fastattn capture`: run a local Hugging Face model over texts and write attention dumps."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import click

from ._common import PATH, STORE_DTYPE, err, fail, progress_bar, run


def _index_list(text: str | None, option: str) -> list[int] | None:
    """'0,2,5' → [0, 2, 5]; None stays None (all)."""
    if text is None:
        return None
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        fail(f"{option} takes a comma list of integers like 0,2,5, not {text!r}")
    if not values:
        fail(f"{option} takes a comma list of integers like 0,2,5, not {text!r}")
    return values


@click.command("capture")
@click.argument(
    "model_dir", type=PATH,
    help="A local model folder, as saved by save_pretrained (config.json, weights, tokenizer files).",
)
@click.argument(
    "paths", nargs=-1, required=True, metavar="[TEXTS] OUT",
    help="TEXTS: a text file with one input per line (blank lines skipped), or a .jsonl with a \"text\" field"
    " (none with --repeat). OUT: a folder for the dumps (attention_batch_NNNNN.npz), or a path ending in .zarr"
    " to ingest into that store.",
)
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=8, help="Texts per forward pass, and per dump.")
@click.option(
    "--max-length", type=click.IntRange(min=1),
    help="Truncate inputs to this many tokens (default: the tokenizer's limit).",
)
@click.option("--layers", help="Keep only these layers, a comma list like 0,2,5 (default: all).")
@click.option("--heads", help="Keep only these heads of each layer, e.g. 0,3 (default: all).")
@click.option(
    "--dtype", type=STORE_DTYPE, default="float32",
    help="float32 (exactly the model's weights), or float16 to halve the dumps (~3 significant digits).",
)
@click.option("--overwrite", is_flag=True, help="Replace attention_batch_*.npz dumps already in the OUT folder.")
@click.option(
    "--repeat", type=click.IntRange(min=1),
    help="Instead of TEXTS, the classic induction-head input: N random token ids (no special tokens), then the"
    " same N again, framed like a text by the tokenizer. fastattn stats then scores duplicate-token and induction heads.",
)
@click.option("--samples", type=click.IntRange(min=1), default=32, help="With --repeat: how many random sequences.")
@click.option("--seed", default=0, help="With --repeat: the random generator's seed.")
@click.option(
    "--stats-only", is_flag=True,
    help="Write only the statistics of `fastattn stats` into OUT (a .zarr store), computed layer by layer as the"
    " model runs; no attention map is kept. Resumable: texts already in the store are skipped.",
)
@click.option(
    "-k", "--keep-topk", "k", type=click.IntRange(1, 64), default=5,
    help="With --stats-only: each query's K strongest keys kept (index and weight), from which plot draws"
    " overview, layers and heads approximately.",
)
@click.option(
    "--keep-layers",
    help="With --stats-only: also store the full maps of these layers (a comma list like 0,5; with --keep-heads"
    " alone, every layer), in the store's kept group; plot draws them exactly.",
)
@click.option(
    "--keep-heads", help="With --stats-only: the heads whose full maps are stored (default with --keep-layers: all)."
)
@click.option(
    "--commit-seconds", type=click.FloatRange(min=0), default=10.0,
    help="With --stats-only: commit the finished batches at least this often (a kill loses at most this much work).",
)
@click.option(
    "--window", type=click.IntRange(min=1),
    help="With --stats-only: cut each text into windows of W tokens (each a sample; source_index is the window's"
    " number), for texts longer than the model takes.",
)
@click.option(
    "--stride", type=click.IntRange(min=1), help="With --window: tokens between the starts of two windows (default: the window)."
)
def capture(model_dir: Path, paths: tuple[str, ...], batch_size: int, max_length: int | None, layers: str | None,
            heads: str | None, dtype: str, overwrite: bool, repeat: int | None, samples: int, seed: int,
            stats_only: bool, k: int, keep_layers: str | None, keep_heads: str | None, commit_seconds: float,
            window: int | None, stride: int | None) -> None:
    """Capture attention weights from a model, one dump per batch of texts.

    Runs the base model (no task head) with eager attention and output_attentions=True, in eval mode without gradients, and writes per batch: attention_weights (layer, batch, head, query, key), attention_mask, input_ids and tokens (padding included).

    Decoders too: a tokenizer that pads on the left gets position ids counted from each text's first token, as generate() does; ingest then moves each text's tokens to the start.

    Memory holds one batch's attention at a time: layers x batch x heads x seq² x 4 bytes. Only the local folder is read; nothing is downloaded.

    Example: `fastattn capture ./all-MiniLM-L6-v2 texts.txt dumps/`, then `fastattn ingest dumps/ store.zarr`;
    `fastattn capture ./gpt2 --repeat 50 dumps/` for the induction test input.

    With --stats-only no map is kept: each layer's statistics are computed as soon as it has run (memory: the model, its activations and one layer's maps of one batch) and committed into OUT's stats group; `fastattn stats`, `roles`, `compare`, `plot` and `report` read them. Example: `fastattn capture ./model texts.txt stats.zarr --stats-only --window 4000 --stride 2000`.
    """
    if repeat is None and len(paths) != 2:
        fail("give TEXTS and OUT (or --repeat N and OUT alone)", code=2)
    if repeat is not None and len(paths) != 1:
        fail("with --repeat give OUT alone: the inputs are random token ids, not TEXTS", code=2)
    texts, out = (None, paths[0]) if repeat is not None else (Path(paths[0]), paths[1])
    layer_list = _index_list(layers, "--layers")
    head_list = _index_list(heads, "--heads")
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder only: never reach the hub
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from fastattn import capture as capture_mod

    if (window is not None or stride is not None) and not stats_only:
        fail("--window and --stride apply to --stats-only", 2)
    if (keep_layers is not None or keep_heads is not None) and not stats_only:
        fail("--keep-layers and --keep-heads apply to --stats-only (without it every map is stored)", 2)
    keep = (_index_list(keep_layers, "--keep-layers"), _index_list(keep_heads, "--keep-heads"), commit_seconds)
    if stats_only:
        if repeat is not None:
            fail("--repeat writes dumps; --stats-only reads TEXTS", 2)
        if not out.rstrip("/\\").lower().endswith(".zarr"):
            fail(f"--stats-only writes into a store: give an OUT ending in .zarr, not {out}")
        if dtype != "float32":
            fail("--dtype does not apply to --stats-only (the statistics are float32 and float64)")
    inputs = run(capture_mod.load_texts, texts) if texts is not None else None
    if stats_only:
        _capture_stats(model_dir, texts, inputs, out, batch_size, max_length, layer_list, head_list, k, window, stride, *keep)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # third-party deprecation chatter is not the user's business here
        model, tokenizer = run(capture_mod.load_model, model_dir)
        if inputs is None:
            batches = run(lambda: capture_mod.repeated_batches(tokenizer, repeat, samples, batch_size, seed=seed))
        else:
            batches = capture_mod.batched(inputs, batch_size)

        def work(advance):
            return capture_mod.record(
                model,
                batches,
                out,
                layers=layer_list,
                heads=head_list,
                dtype=dtype,
                tokenizer=tokenizer,
                progress=advance,
                max_length=max_length,
                overwrite=overwrite,
            )

        with progress_bar("capturing") as advance:
            result = run(work, advance)
    shape = f"{result.layers} layers x {result.heads} heads"
    noun = "texts" if repeat is None else "repeated sequences"
    if result.ingests:
        err.print(
            f"captured {result.samples} {noun} in {result.batches} batches ({shape}) into {out};"
            f" {result.store_batches} in store",
            markup=False,
            highlight=False,
        )
    else:
        err.print(
            f"wrote {result.batches} dumps ({result.samples} {noun}, {shape}) to {out}", markup=False, highlight=False
        )


def _capture_stats(model_dir, texts, inputs, out, batch_size, max_length, layers, heads, k, window, stride,
                   keep_layers, keep_heads, commit_seconds) -> None:
    """`--stats-only`: the statistics straight from the model (fastattn.live)."""
    import time

    from fastattn import capture as capture_mod
    from fastattn import live

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer = run(capture_mod.load_model, model_dir)
        with progress_bar("statistics from the model") as advance:
            started = time.perf_counter()

            def report(done: int, total: int, tokens: int) -> None:
                elapsed = time.perf_counter() - started
                advance(done, total, f"{tokens / elapsed:,.0f} tokens/s" if tokens and elapsed > 0 else "")

            result = run(
                lambda: live.record_stats(
                    model, inputs, out, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, k=k,
                    layers=layers, heads=heads, source=Path(texts).name, progress=report if advance else None,
                    window=window, stride=stride, keep_layers=keep_layers, keep_heads=keep_heads,
                    commit_seconds=commit_seconds,
                )
            )
    rate = f", {result.tokens / result.seconds:,.0f} tokens/s" if result.seconds > 0 else ""
    err.print(
        f"statistics of {result.computed} texts ({result.tokens:,} tokens{rate}; {result.layers} layers x"
        f" {result.heads} heads) committed into {out}; {result.skipped} already there; {result.committed} in store",
        markup=False,
        highlight=False,
    )


def register(app: click.Group) -> None:
    """Add `fastattn capture` to the app."""
    app.add_command(capture)
