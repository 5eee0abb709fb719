"""Benchmarks against what users would otherwise write.

    python -m benchmarks [--quick] [--out results.json] [--only NAME ...] [--keep] [--data DIR] [--dumps N]

Figures, in the order they run: whole, whole-long, kernels, sdpa, ingest, stats, scaling,
memory, live (peak RSS of capture --stats-only on a random GPT-2, benchmarks/live_bench.py). `whole` and `whole-long` time `fastattn` commands as whole processes, first and
second run (benchmarks/whole.py); the others call the library in this process, after
a warm-up. Each comparison is measured in this one run, interleaved (A B A B …), and
the median is reported. Prints a table and writes the same rows as
JSON (default benchmarks/results/latest.json). Synthetic dumps are cached in
benchmarks/results/data/ (keyed by their parameters); the ≥ 5 GB memory corpus and
every store are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import ingest_bench, live_bench, memory, sdpa_bench, stats_bench, whole
from .runner import DEFAULT_DATA, DEFAULT_OUT, NUMBA_CACHE, Config, Context, markdown_table, print_table, row, run, skipped, write_json


def kernels_figure(ctx: Context) -> list[dict]:
    """benchmarks/kernels.py's in-memory comparison, as rows of this table."""
    try:
        from . import kernels
    except ImportError as exc:
        return [skipped("kernels", "plane_stats / topk vs NumPy", f"benchmarks/kernels.py not importable ({exc})")]
    c = ctx.config
    rows = []
    for r in kernels.run(gb=c.kernel_gb, repeats=c.kernel_repeats):
        nbytes = r["gbps"] * r["fastattn_s"] * 1e9
        name = r["figure"]
        goal, met = "", None
        if name.startswith("plane_stats (") and "threads" in name and r["baseline"].startswith("numpy"):
            goal, met = "≥ 30×", r["ratio"] >= 30
        elif name.startswith("all statistics") and r["baseline"].startswith("the guide"):
            goal, met = "≥ 10×", r["ratio"] >= 10
        elif "vs floor" in name:
            goal, met = "within 4× of np.sum", r["fastattn_s"] <= 4 * r["baseline_s"]
        rows.append(
            row("kernels", f"{name} vs {r['baseline']}, {nbytes / 1e9:.2f} GB", fastattn=r["fastattn_s"],
                baseline=r["baseline_s"], nbytes=int(round(nbytes)), goal=goal, met=met,
                cpu=(r.get("fastattn_cpu_s"), r.get("baseline_cpu_s")) if "fastattn_cpu_s" in r else None, source=r)
        )
    return rows


FIGURES = {
    "whole": whole.figure,
    "whole-long": whole.long_figure,
    "kernels": kernels_figure,
    "sdpa": sdpa_bench.figure,
    "ingest": ingest_bench.figure,
    "stats": stats_bench.figure,
    "scaling": ingest_bench.scaling,
    "memory": memory.figure,
    "live": live_bench.figure,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[4:]),
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one timed repetition each, the live runs forked from one child: a smoke test, not a measurement")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT.relative_to(Path.cwd()) if DEFAULT_OUT.is_relative_to(Path.cwd()) else DEFAULT_OUT})")
    parser.add_argument("--only", nargs="+", choices=list(FIGURES), metavar="NAME", help=f"run only these figures: {', '.join(FIGURES)}")
    parser.add_argument("--keep", action="store_true", help="keep the memory corpus and the stores after the run")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder for cached dumps and scratch stores")
    parser.add_argument("--jobs", type=int, default=None, help="threads for fastattn (default: all cores)")
    parser.add_argument("--dumps", type=int, default=None, metavar="N",
                        help="whole: only the stats and ingest rows at N dumps (default: stats at 10, 1000, 5000; ingest at 1000)")
    args = parser.parse_args(argv)

    if args.quick:
        # A smoke run: reuse compiled kernels across runs (and in the memory children), so the
        # run is not mostly JIT compilation. Full runs compile as a user's first run does.
        os.environ.setdefault("FASTATTN_NUMBA_CACHE", "1")
        os.environ.setdefault("NUMBA_CACHE_DIR", str(NUMBA_CACHE))
    config = Config.quick_config() if args.quick else Config()
    if args.jobs:
        config.jobs = args.jobs
    if args.dumps:
        config.whole_stats_files, config.whole_ingest_files = (args.dumps,), args.dumps
    args.data.mkdir(parents=True, exist_ok=True)
    ctx = Context(config=config, data=args.data, keep=args.keep)
    result = run(FIGURES, ctx, only=args.only)
    print()
    print_table(result["rows"])
    m = result["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores; load average {m['load_average']} at start,"
          f" {m['load_average_end']} at end; {result['seconds']:.0f} s")
    write_json(result, args.out)
    markdown = args.out.with_suffix(".md")
    markdown.write_text(
        f"{result['date']}, {m['cpu']} ({m['cores']} cores, {m['memory_gb']} GB), load average"
        f" {', '.join(f'{x:.2f}' for x in m['load_average'])} at start; `{result['command']}`\n\n"
        + markdown_table(result["rows"]) + "\n"
    )
    print(f"results: {args.out} (table: {markdown})")
    return 1 if any(r.get("error") for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
