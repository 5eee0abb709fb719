"""Live figure: peak RSS of `fastattn.live.record_stats` (`capture --stats-only`) on a
random-weight GPT-2 built from a config (no download), eager attention, long inputs.

Each run is a child process (`python -m benchmarks.live_bench SEQ HEADS LAYERS TEXTS STORE`)
that reports its own high-water mark (VmHWM, `memory.peak_rss`), its RSS once the model is
loaded (before any forward pass) and how long the capture took. Memory should be set by the
model, its activations and one layer's maps of one batch: the same for 2 layers as for 4,
and for 2 texts as for 8. One text per batch; the texts are random words of a word-level
tokenizer built in memory, each exactly SEQ tokens.

The last row checks that the per-plane column statistics of such long inputs stay exact
(`python -m benchmarks.live_bench --exact SEQ HEADS STORE`): `first_token`, `peak_key` and
`distance_mean` of one SEQ-token text captured with `--stats-only`, against the float64
NumPy reference (benchmarks/reference.py) on the model's own `output_attentions`.

With --quick (a smoke run, not a measurement) the first measured run, once its figures are
taken, also runs the exactness check on its own model (every layer), into a store given as a
sixth argument. And the three runs share one child (`python -m benchmarks.live_bench --forks
RUNS_JSON`) that imports torch, transformers and fastattn once (most of a fresh child's time,
~10 CPU-s) and then forks a process per run: the first alone, then the other two at once (so
they load the kernels the first compiled rather than each compiling them). A forked process
still has its own high-water mark: Linux starts a child's VmHWM at its RSS at the fork, the
imported modules a fresh process would hold too, not at the parent's peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .memory import peak_rss
from .runner import Context, row

FIGURE = "live"
REPO = Path(__file__).resolve().parent.parent
VOCAB = 1000


def figure(ctx: Context) -> list[dict]:
    c = ctx.config
    configs = ((c.live_layers[0], c.live_texts[0]), (c.live_layers[1], c.live_texts[0]), (c.live_layers[0], c.live_texts[1]))
    exact_out = ctx.data / "scratch" / "live-exact.zarr"
    ctx.cleanup.append(exact_out)
    argv = {}
    for layers, texts in configs:
        out = ctx.data / "scratch" / f"live-{layers}-{texts}.zarr"
        ctx.cleanup.append(out)
        argv[layers, texts] = [str(c.live_seq), str(c.live_heads), str(layers), str(texts), str(out)]
    if c.quick:  # one child forking the runs, the first checking exactness too (see the module's docstring)
        argv[configs[0]].append(str(exact_out))
        runs = dict(zip(configs, _finish(_start(["--forks", json.dumps([argv[config] for config in configs])]))))
    else:
        runs = {config: _finish(_start(args)) for config, args in argv.items()}
    for (layers, texts), report in runs.items():
        ctx.log(f"    {layers} layers, {texts} texts: peak RSS {report['peak_rss_bytes'] / 1e6:,.0f} MB"
                f" (model loaded: {report['loaded_rss_bytes'] / 1e6:,.0f} MB), {report['seconds']:.1f} s")
    (l0, t0), (l1, _), (_, t1) = configs
    base = runs[l0, t0]
    one_layer = base["layer_map_bytes"]
    shape = f"GPT-2 config, {c.live_heads} heads, {c.live_seq:,} tokens, batch 1 (one layer's maps {one_layer / 1e6:,.0f} MB)"
    rows = []
    for (layers, texts), r in runs.items():
        rows.append(row(
            FIGURE, f"peak RSS of capture --stats-only, {layers} layers, {texts} texts, {shape}",
            fastattn=r["peak_rss_bytes"] / 1e6, unit="MB",
            note=f"model loaded {r['loaded_rss_bytes'] / 1e6:,.0f} MB; {r['seconds']:.1f} s,"
                 f" {r['tokens'] / r['seconds']:,.0f} tokens/s",
            seconds=r["seconds"], tokens=r["tokens"], loaded_mb=r["loaded_rss_bytes"] / 1e6,
            layer_map_mb=one_layer / 1e6,
        ))
    largest = max(runs[l1, t0]["peak_rss_bytes"], runs[l0, t1]["peak_rss_bytes"])
    growth = largest - base["peak_rss_bytes"]
    rows.append(row(
        FIGURE, f"peak RSS, {l1} layers or {t1} texts over {l0} layers and {t0} texts (the larger)",
        fastattn=largest / base["peak_rss_bytes"], unit="x", goal="grows by < one layer's maps of one batch",
        met=growth < one_layer, note=f"grows by {growth / 1e6:,.0f} MB", growth_mb=growth / 1e6,
        layer_map_mb=one_layer / 1e6,
    ))
    exact = runs[configs[0]] if c.quick else _finish(_start(["--exact", str(c.live_seq), str(c.live_heads), str(exact_out)]))
    ctx.log(f"    exactness at {c.live_seq:,} tokens: max relative error {exact['max_rel_error']:.2e},"
            f" peak_key equal: {exact['peak_key_equal']}")
    rows.append(row(
        FIGURE, f"first_token, peak_key, distance_mean of one {c.live_seq:,}-token text, --stats-only vs float64 NumPy",
        fastattn=exact["max_rel_error"], unit="max rel. error", goal="≤ 1e-6, peak_key equal",
        met=exact["max_rel_error"] <= 1e-6 and exact["peak_key_equal"],
        note=f"peak_key equal: {exact['peak_key_equal']}; {c.live_heads} heads",
    ))
    return rows


def exactness(model, tokenizer, seq: int, out: str) -> dict:
    """One `seq`-token text through `record_stats`, against the float64 reference on the
    model's own attention of the same text (every layer)."""
    import numpy as np
    import torch

    from fastattn import live
    from fastattn.stats import read_planes

    from . import reference

    text = random_texts(1, seq)[0]
    live.record_stats(model, [text], out, tokenizer=tokenizer, batch_size=1)
    got = read_planes(out, ["first_token", "peak_key", "distance_mean"])
    with torch.no_grad():
        own = model(**tokenizer([text], return_tensors="pt"), output_attentions=True, use_cache=False).attentions
    a = np.stack([layer.numpy() for layer in own], axis=1)  # (batch, layer, head, query, key)
    want = reference.summaries(a.astype(np.float64), np.array([seq]))
    errors = [np.max(np.abs(got[n] - want[n]) / np.maximum(np.abs(want[n]), 1e-300)) for n in ("first_token", "distance_mean")]
    return {"max_rel_error": float(max(errors)), "peak_key_equal": bool(np.array_equal(got["peak_key"], want["peak_key"]))}


def _start(argv: list[str]) -> subprocess.Popen:
    """A child `python -m benchmarks.live_bench ARGV`, started (see `main`)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-m", "benchmarks.live_bench", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> dict:
    """The child's report (its last line of output, JSON), once it has ended."""
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"live child failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def model_and_tokenizer(seq: int, heads: int, layers: int):
    """A random-weight GPT-2 (seed 0) with `heads` heads of dimension 4, and a word-level
    tokenizer over the words w0..w999: built here, nothing downloaded."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_head=heads, n_embd=4 * heads, vocab_size=VOCAB + 2, bos_token_id=VOCAB, eos_token_id=VOCAB,
                                     n_positions=seq)
    config._attn_implementation = "eager"
    model = transformers.GPT2Model(config).eval()
    vocab = {f"w{i}": i for i in range(VOCAB)} | {"[PAD]": VOCAB, "[UNK]": VOCAB + 1}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]",
                                                     model_max_length=seq)
    return model, tokenizer


def random_texts(count: int, seq: int, seed: int = 0) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(0, VOCAB, seq)) for _ in range(count)]


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def forks(runs: list[list[str]]) -> list[dict]:
    """--quick: the reports of `measure(argv)` for each argv in `runs`, each in a process forked
    from this one once the heavy modules are imported; the first alone, then the rest at once."""
    import torch  # noqa: F401  imported once here, for every fork
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401

    from fastattn import live  # noqa: F401

    first = _fork(runs[0])
    return [_reap(first)] + [_reap(fork) for fork in [_fork(argv) for argv in runs[1:]]]


def _fork(argv: list[str]) -> tuple[int, int]:
    """(pid, read end of its pipe) of a forked process running `measure(argv)`, which writes its
    report to the pipe as JSON (or a traceback, and exits 1)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 0
        try:
            text = json.dumps(measure(argv))
        except BaseException:
            import traceback

            text, code = traceback.format_exc(), 1
        with os.fdopen(write, "w") as out:
            out.write(text)
        os._exit(code)
    os.close(write)
    return pid, read


def _reap(fork: tuple[int, int]) -> dict:
    """The report of a process from `_fork`, once it has ended."""
    pid, read = fork
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"live run failed (exit {os.waitstatus_to_exitcode(status)}):\n{text[-3000:]}")
    return json.loads(text)


def main(argv: list[str]) -> None:
    if argv[0] == "--exact":  # --exact SEQ HEADS STORE: a 1-layer model
        seq, heads = int(argv[1]), int(argv[2])
        print(json.dumps(exactness(*model_and_tokenizer(seq, heads, 1), seq, argv[3])))
        return
    if argv[0] == "--forks":  # --forks RUNS_JSON: --quick's runs (see forks)
        print(json.dumps(forks(json.loads(argv[1]))))
        return
    print(json.dumps(measure(argv)))


def measure(argv: list[str]) -> dict:
    """One run: SEQ HEADS LAYERS TEXTS STORE [EXACT_STORE] (see the module's docstring)."""
    seq, heads, layers, count = (int(a) for a in argv[:4])
    out = argv[4]
    from fastattn import live

    model, tokenizer = model_and_tokenizer(seq, heads, layers)
    texts = random_texts(count, seq)
    loaded = _rss()
    started = time.perf_counter()
    result = live.record_stats(model, texts, out, tokenizer=tokenizer, batch_size=1)
    seconds = time.perf_counter() - started
    report = {"seconds": seconds, "peak_rss_bytes": peak_rss(), "loaded_rss_bytes": loaded,
              "tokens": result.tokens, "texts": result.computed, "layers": layers,
              "layer_map_bytes": heads * seq * seq * 4}
    if len(argv) > 5:  # the exactness check too, after the figures above are taken
        report |= exactness(model, tokenizer, seq, argv[5])
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
