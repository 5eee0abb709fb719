"""Statistics end to end: `fastattn stats` (library `write_stats`) vs the guide's per-file loop.

Also, on its own (one process, existing dumps and store; see `notebook`):

    python -m benchmarks.stats_bench DUMPS STORE [--repeats 3] [--k 5]

fastattn's side computes every statistic of a freshly ingested store "from nothing"
(its statistics are removed, untimed, before each repetition) and commits them to the
store; a third contestant also pays for the ingest, from the same dumps the per-file
loop reads. The per-file loop computes fewer statistics (row and column sums,
entropy, top-k) and saves them to one `.npz`. GB/s counts the attention analysed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import baselines
from .ingest_bench import fastattn_ingest
from .runner import Context, interleave, median, remove, row, synthetic

FIGURE = "stats"
_warm = set()


def warm_up(ctx: Context) -> None:
    """Compile the statistics kernels (JIT) once per process, on a tiny store of the same dtype."""
    from fastattn.stats import write_stats
    from fastattn.synth import synthesize

    if "stats" in _warm:
        return
    c = ctx.config
    folder, store = ctx.scratch("warmup-dumps"), ctx.scratch("warmup.zarr")
    t = time.perf_counter()
    synthesize(folder, files=4, layers=c.layers, heads=c.heads, seq=c.seq, seed=c.seed, jobs=1)
    fastattn_ingest([str(folder)], store, c.jobs, files=4)
    write_stats(store, k=c.k, jobs=c.jobs)
    remove(folder)
    remove(store)
    _warm.add("stats")
    ctx.log(f"   warm-up (JIT) {time.perf_counter() - t:.1f} s")


def reset_stats(store_path) -> None:
    """Back to a store without statistics: uncommit them and delete the stats group."""
    from fastattn import store

    location = store.Location(store_path)
    manifest = store.read_manifest(location)
    manifest.stats_committed, manifest.stats_k = 0, 0
    store.commit(location, manifest)
    remove(Path(store_path) / "stats")


def figure(ctx: Context) -> list[dict]:
    from fastattn.stats import write_stats

    c = ctx.config
    paths = synthetic(ctx, c.files)
    nbytes = len(paths) * c.bytes_per_file
    warm_up(ctx)
    store = ctx.scratch("stats.zarr")
    fresh = ctx.scratch("stats-e2e.zarr")
    out = ctx.scratch("per-file-stats.npz")
    fastattn_ingest(paths, store, c.jobs)

    def setup(name: str) -> None:
        if name == "fastattn stats":
            reset_stats(store)
        elif name == "fastattn ingest + stats":
            remove(fresh)
        else:
            remove(out)

    def ingest_and_stats() -> None:
        fastattn_ingest(paths, fresh, c.jobs)
        write_stats(fresh, k=c.k, jobs=c.jobs)

    cpu = {}
    times = interleave(
        {
            "fastattn stats": lambda: write_stats(store, k=c.k, jobs=c.jobs),
            "per-file loop": lambda: baselines.per_file_stats(paths, out, k=c.k),
            "fastattn ingest + stats": ingest_and_stats,
        },
        c.stats_repeats,
        warmup=0,  # kernels are compiled by warm_up(); the dumps are in the page cache from the ingest
        setup=setup,
        log=ctx.log,
        cpu=cpu,
    )
    fa, loop, e2e = (median(times[n]) for n in ("fastattn stats", "per-file loop", "fastattn ingest + stats"))
    what = f"{len(paths)} dumps, {nbytes / 1e9:.2f} GB, k={c.k}"
    rows = [
        row(FIGURE, f"write_stats on the store vs per-file np.load/argsort loop, {what}", fastattn=fa,
            baseline=loop, nbytes=nbytes, goal="≥ 20×", met=loop / fa >= 20,
            times={"fastattn": times["fastattn stats"], "per-file loop": times["per-file loop"]},
            cpu=(median(cpu["fastattn stats"]), median(cpu["per-file loop"]))),
        row(FIGURE, f"ingest + write_stats from the dumps vs the same loop, {what}", fastattn=e2e,
            baseline=loop, nbytes=nbytes,
            times={"fastattn": times["fastattn ingest + stats"], "per-file loop": times["per-file loop"]},
            cpu=(median(cpu["fastattn ingest + stats"]), median(cpu["per-file loop"]))),
    ]
    for path in (store, fresh, out):
        remove(path)
    return rows


def notebook(dumps, store, repeats: int = 3, k: int = 5, log=None) -> dict:
    """The notebook path against the command and the guide, in this one process.

    `write_stats(store)` from nothing (its statistics removed, untimed, before each call),
    `compute_stats(open_store(store)).compute()`, and the guide's per-file loop over the
    dumps the store was ingested from; one untimed warm-up call each (JIT, page cache), then
    `repeats` interleaved calls. Returns every time per contestant and the medians."""
    import fastattn

    paths = sorted(str(p) for p in Path(dumps).glob("*.npz"))
    nbytes = int(fastattn.open_store(store).attention.nbytes)

    def setup(name: str) -> None:
        if name == "write_stats":
            reset_stats(store)

    cpu: dict[str, list[float]] = {}
    times = interleave(
        {
            "write_stats": lambda: fastattn.write_stats(store, k=k),
            "compute_stats": lambda: fastattn.compute_stats(fastattn.open_store(store), k=k).compute(),
            "guide loop": lambda: baselines.guide_loop(paths, k=k),
        },
        repeats,
        warmup=1,
        setup=setup,
        log=log,
        cpu=cpu,
    )
    return {"files": len(paths), "nbytes": nbytes, "times": times, "cpu": cpu,
            "median": {name: median(t) for name, t in times.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="write_stats vs compute_stats(...).compute() vs the guide's loop")
    parser.add_argument("dumps", help="folder of the .npz dumps the store was ingested from")
    parser.add_argument("store", help="the store (its statistics are recomputed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args(argv)
    load = os.getloadavg()
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    r = notebook(args.dumps, args.store, args.repeats, args.k, log=log)
    m, gb = r["median"], r["nbytes"] / 1e9
    print(f"{r['files']} dumps, {gb:.2f} GB of attention, k={args.k}, {args.repeats} interleaved repeats after"
          f" one warm-up (medians); load average {load[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print(f"{'contestant':16s} {'median s':>9s} {'GB/s':>6s} {'cpu s':>6s}  all runs")
    for name, t in r["times"].items():
        print(f"{name:16s} {m[name]:9.3f} {gb / m[name]:6.2f} {median(r['cpu'][name]):6.2f}  "
              + " ".join(f"{x:.3f}" for x in t))
    print(f"compute_stats / write_stats: {m['compute_stats'] / m['write_stats']:.2f}x (goal <= 1.3x)")
    print(f"guide loop / compute_stats: {m['guide loop'] / m['compute_stats']:.2f}x (goal >= 3x)")
    return r


if __name__ == "__main__":
    main(sys.argv[1:])
