"""Whole-process figures: `fastattn stats` and `fastattn ingest` timed as a user runs them.

Every contestant is a command run as its own process: the `fastattn` command installed
next to this Python, and each baseline as `python -m benchmarks.baselines NAME DUMPS OUT`
with the same Python. Wall time is `time.perf_counter` around `subprocess.run`; CPU
seconds (user + system) and peak RSS come from `resource.getrusage(RUSAGE_CHILDREN)`.
Those are taken in a small launcher process (see `LAUNCHER`) rather than here: Linux
carries the parent's RSS high-water mark into a child at fork and exec, so `ru_maxrss`
read here would report at least this runner's own peak, and it is a maximum over all
children ever waited for, which deltas cannot undo. The launcher's only child is the
command, so its `RUSAGE_CHILDREN` is exactly that command's (with any processes the
command itself waited for: CPU summed, RSS the largest of them).

First and second runs. A first run gets an empty cache folder as both `NUMBA_CACHE_DIR`
and `XDG_CACHE_HOME`, so it is cold whatever fastattn's default cache location is; the
second run, right after it, gets the same folder. Both run with fastattn's default
caching (`FASTATTN_NUMBA_CACHE` removed from their environment), as users get it.
Every `fastattn stats` run, first or second, works on a fresh copy of a store ingested
without statistics (copied untimed), so the second run recomputes everything too.
With `--quick` every run uses the quick runs' shared cache, so there is no first run: those
rows are skipped (and cost nothing), which keeps the smoke test short.

Dumps come from `runner.softmax_dumps` (not `fastattn synth`). Contestants run
interleaved (A B A B …, `runner.interleave`); times and CPU are medians, peak RSS the
largest of the repetitions. GB/s counts the attention processed (files × its bytes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .ingest_bench import check_same
from .runner import NUMBA_CACHE, Context, interleave, median, remove, row, skipped, softmax_dumps

FIGURE = "whole"
LONG = "whole-long"
REPO = Path(__file__).resolve().parent.parent

FIRST, SECOND = "fastattn, first run", "fastattn, second run"
GUIDE, PER_FILE, XARRAY = "guide loop (a)", "per-file loop (b)", "xarray loop (c)"

#: A goal: its text and met(row) on the row's fields.
Goal = tuple[str, Callable[[dict], bool]]

#: The issue's goals for `fastattn stats`, second run against the guide loop (a), by dumps.
STATS_GOALS: dict[int, Goal] = {
    10: ("≤ 1.5 s", lambda r: r["fastattn"] <= 1.5),
    1000: ("≥ 4× (a)", lambda r: r["ratio"] >= 4),
    5000: ("≥ 5× (a)", lambda r: r["ratio"] >= 5),
}
#: ... and for the first run ever, at these sizes.
FIRST_RUN_GOAL: Goal = ("≤ (a)'s time", lambda r: r["fastattn"] <= r["baseline"])
FIRST_RUN_GOAL_FILES = (1000, 5000)
#: `fastattn ingest`, second run, on this many dumps against the xarray loop (c).
INGEST_GOAL_FILES = 1000
INGEST_GOAL: Goal = ("≥ 3× (c) and ≥ 400 MB/s", lambda r: r["ratio"] >= 3 and r["fastattn_gb_s"] >= 0.4)
HELP_GOAL: Goal = ("≤ 0.4 s", lambda r: r["fastattn"] <= 0.4)
LONG_RSS_GOAL: Goal = ("peak RSS ≤ 1 GB", lambda r: r["fastattn_peak_rss_mb"] <= 1000)
CHUNK_GOAL_BYTES = 16 << 20
FIGURE_GOAL: Goal = ("≤ 10 s", lambda r: r["fastattn"] <= 10)

# Runs argv[2:] and writes its wall time, CPU seconds, peak RSS and exit code to argv[1] as
# JSON. Run with `python -I -S` (standard library only, no site-packages: a small process
# whose high-water mark is all its child inherits).
LAUNCHER = """
import json, resource, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
before = resource.getrusage(resource.RUSAGE_CHILDREN)
started = time.perf_counter()
code = subprocess.run(cmd).returncode
seconds = time.perf_counter() - started
after = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB on Linux
with open(out, "w") as f:
    json.dump({"seconds": seconds, "cpu_s": cpu, "peak_rss_bytes": after.ru_maxrss * scale, "returncode": code}, f)
"""


# ---------------------------------------------------------------- running a whole process


@dataclass
class Proc:
    """One measured run of a command."""

    seconds: float
    cpu_s: float
    peak_rss_bytes: int
    stdout: str
    stderr: str


def run_process(cmd: list[str], env: dict[str, str] | None = None) -> Proc:
    """Run `cmd` as its own process (through LAUNCHER) and measure it; a failure raises with its stderr."""
    fd, result = tempfile.mkstemp(prefix="fastattn-bench-", suffix=".json")
    os.close(fd)
    try:
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, result, *cmd], env=env, cwd=REPO,
                              capture_output=True, text=True)
        report = json.loads(Path(result).read_text()) if proc.returncode == 0 else {"returncode": proc.returncode}
    finally:
        os.unlink(result)
    if report["returncode"] != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {report['returncode']}):\n{proc.stderr[-3000:]}")
    return Proc(report["seconds"], report["cpu_s"], report["peak_rss_bytes"], proc.stdout, proc.stderr)


def fastattn_command(ctx: Context, *args: str) -> list[str]:
    """`fastattn ARGS` with its default options (`-j` only if the run was given another --jobs)."""
    exe = Path(sys.executable).with_name("fastattn")
    found = str(exe) if exe.exists() else shutil.which("fastattn")
    if not found:
        raise RuntimeError(f"the fastattn command is neither next to {sys.executable} nor on PATH")
    jobs = [] if ctx.config.jobs == os.cpu_count() else ["-j", str(ctx.config.jobs)]
    return [found, *args, *jobs]


def baseline_command(name: str, dumps: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "benchmarks.baselines", name, str(dumps), str(out)]


def child_env(ctx: Context, cache: Path | None = None) -> dict[str, str]:
    """The environment of a measured process; `cache`, if given, is its Numba and XDG cache folder.

    Python writes the bytecode of the modules it imports (pip compiles an installed package's
    when it installs it), as users have it: with PYTHONDONTWRITEBYTECODE set (this project's
    test machine sets it) every run would compile fastattn's modules from source, the
    baselines' one module too (within the noise of whole commands here, 2026-11-30)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if cache is not None:
        env["NUMBA_CACHE_DIR"] = env["XDG_CACHE_HOME"] = str(cache)
        if not ctx.config.quick:
            env.pop("FASTATTN_NUMBA_CACHE", None)  # fastattn's default, as users get it
    return env


def new_cache(ctx: Context, label: str) -> Path:
    """An empty cache folder for a first run (with --quick: the quick runs' shared cache)."""
    if ctx.config.quick:
        return Path(os.environ.get("NUMBA_CACHE_DIR", NUMBA_CACHE))
    root = ctx.data / "scratch" / "caches"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{label}-", dir=root))


def timed(ctx: Context, commands: dict[str, Callable[[], tuple[list[str], dict]]],
          setup: Callable[[str], None] | None, repeats: int) -> dict[str, list[Proc]]:
    """Run each command `repeats` times, interleaved, `setup(name)` untimed before each run.
    `commands[name]()` gives the (argv, environment) of a run, after its setup."""
    runs: dict[str, list[Proc]] = {name: [] for name in commands}

    def contestant(name: str) -> Callable[[], None]:
        def call() -> None:
            p = run_process(*commands[name]())
            runs[name].append(p)
            ctx.log(f"    {name}: {p.seconds:.3f} s, {p.cpu_s:.2f} CPU s, peak RSS {p.peak_rss_bytes / 1e6:,.0f} MB")
        return call

    interleave({name: contestant(name) for name in commands}, repeats, warmup=0, setup=setup)
    return runs


def compared(name: str, ours: list[Proc], theirs: list[Proc] | None, nbytes: int | None, goal: Goal | None = None,
             *, figure: str = FIGURE, **extra) -> dict:
    """A row from the runs of both sides: median times and CPU, the largest peak RSS."""
    times = {"fastattn": [p.seconds for p in ours]}
    if theirs:
        times["baseline"] = [p.seconds for p in theirs]
    r = row(
        figure, name, fastattn=median(times["fastattn"]), baseline=median(times["baseline"]) if theirs else None,
        nbytes=nbytes, times=times,
        cpu=(median(p.cpu_s for p in ours), median(p.cpu_s for p in theirs) if theirs else None),
        rss=(max(p.peak_rss_bytes for p in ours), max(p.peak_rss_bytes for p in theirs) if theirs else None),
        **extra,
    )
    if goal:
        r["goal"], r["met"] = goal[0], bool(goal[1](r))
    return r


def first_run(ctx: Context, name: str, ours: list[Proc], theirs: list[Proc], nbytes: int, goal: Goal | None,
              **extra) -> dict:
    """The first-run row; with --quick a skipped row (its cache is shared, so no run there is a first run)."""
    if ctx.config.quick:
        return skipped(FIGURE, name, "--quick shares one Numba cache across runs, so it has no first run")
    return compared(name, ours, theirs, nbytes, goal, **extra)


# ---------------------------------------------------------------- figures


def figure(ctx: Context) -> list[dict]:
    """`fastattn stats` (per size), `fastattn ingest` and `fastattn --help` as whole processes."""
    c = ctx.config
    setup_cache = new_cache(ctx, "setup")  # for untimed ingests that make stores to copy
    ingest, template = ingest_rows(ctx, c.whole_ingest_files)
    stats = []
    for n in c.whole_stats_files:
        stats += stats_rows(ctx, n, template if n == c.whole_ingest_files else None, setup_cache)
    return stats + ingest + [help_row(ctx)]


def stats_rows(ctx: Context, n: int, template: Path | None, setup_cache: Path) -> list[dict]:
    """`fastattn stats STORE` on n dumps, first and second run, against loops (a) and (b)."""
    c = ctx.config
    dumps = softmax_dumps(ctx, n, c.whole_shape)
    nbytes = n * int(np.prod(c.whole_shape)) * 4
    if template is None:
        template = ctx.scratch(f"whole-template-{n}.zarr")
        run_process(fastattn_command(ctx, "ingest", str(dumps), str(template)), child_env(ctx, setup_cache))
    work, out = ctx.scratch(f"whole-stats-{n}.zarr"), ctx.scratch(f"whole-stats-{n}.npz")
    caches: list[Path] = []

    def setup(name: str) -> None:
        if name in (FIRST, SECOND):
            remove(work)
            shutil.copytree(template, work)  # a store without statistics, every time
            os.sync()  # written back before the clock starts, as a user's store is: the run reads, not flushes
            if name == FIRST or not caches:
                caches.append(new_cache(ctx, "stats"))
        else:
            remove(out)

    def stats():
        return fastattn_command(ctx, "stats", str(work)), child_env(ctx, caches[-1])

    ctx.log(f"   fastattn stats, {n} dumps")
    runs = timed(ctx, {
        **({} if c.quick else {FIRST: stats}), SECOND: stats,
        GUIDE: lambda: (baseline_command("guide", dumps, out), child_env(ctx)),
        PER_FILE: lambda: (baseline_command("per-file", dumps, out), child_env(ctx)),
    }, setup, c.whole_repeats)
    check_stats(work, n)
    if (template / "stats").exists():
        raise AssertionError(f"{template} has statistics: the runs did not all compute them")
    what = f"{n:,} dumps of {tuple(c.whole_shape)}, {size_text(nbytes)}"
    extra = {"files": n, "shape": list(c.whole_shape), "cache": "first run: empty; second: the first run's"}
    return [
        compared(f"`fastattn stats STORE`, second run, vs the guide's loop (a), {what}", runs[SECOND], runs[GUIDE],
                 nbytes, STATS_GOALS.get(n), **extra),
        first_run(ctx, f"`fastattn stats STORE`, first run (empty cache), vs the guide's loop (a), {what}",
                  runs.get(FIRST), runs[GUIDE], nbytes, FIRST_RUN_GOAL if n in FIRST_RUN_GOAL_FILES else None, **extra),
        compared(f"`fastattn stats STORE`, second run, vs the per-file loop (b), {what}", runs[SECOND],
                 runs[PER_FILE], nbytes, **extra),
    ]


def ingest_rows(ctx: Context, n: int) -> tuple[list[dict], Path]:
    """`fastattn ingest DUMPS STORE` on n dumps, first and second run, against the xarray loop (c).
    Also returns the last fastattn store (no statistics), for the stats rows to copy."""
    c = ctx.config
    dumps = softmax_dumps(ctx, n, c.whole_shape)
    nbytes = n * int(np.prod(c.whole_shape)) * 4
    ours, theirs = ctx.scratch(f"whole-ingest-{n}.zarr"), ctx.scratch(f"whole-xarray-{n}.zarr")
    caches: list[Path] = []

    def setup(name: str) -> None:
        remove(theirs if name == XARRAY else ours)
        if name == FIRST or not caches:
            caches.append(new_cache(ctx, "ingest"))

    def ingest():
        return fastattn_command(ctx, "ingest", str(dumps), str(ours)), child_env(ctx, caches[-1])

    ctx.log(f"   fastattn ingest, {n} dumps")
    runs = timed(ctx, {**({} if c.quick else {FIRST: ingest}), SECOND: ingest,
                       XARRAY: lambda: (baseline_command("xarray-ingest", dumps, theirs), child_env(ctx))},
                 setup, c.whole_repeats)
    check_same(ours, theirs, n)
    remove(theirs)
    what = f"{n:,} dumps of {tuple(c.whole_shape)}, {size_text(nbytes)}"
    extra = {"files": n, "shape": list(c.whole_shape), "cache": "first run: empty; second: the first run's"}
    rows = [
        compared(f"`fastattn ingest DUMPS STORE`, second run, vs the xarray loop (c), {what}", runs[SECOND],
                 runs[XARRAY], nbytes, INGEST_GOAL if n == INGEST_GOAL_FILES else None, fastattn_mb_s=nbytes / median(p.seconds for p in runs[SECOND]) / 1e6,
                 **extra),
        first_run(ctx, f"`fastattn ingest DUMPS STORE`, first run (empty cache), vs the xarray loop (c), {what}",
                  runs.get(FIRST), runs[XARRAY], nbytes, None, **extra),
    ]
    return rows, ours


def help_row(ctx: Context) -> dict:
    """`fastattn --help`, after one untimed run (none with --quick)."""
    command = [fastattn_command(ctx)[0], "--help"]
    env = child_env(ctx)
    if not ctx.config.quick:
        run_process(command, env)
    runs = timed(ctx, {"fastattn --help": lambda: (command, env)}, None, ctx.config.whole_repeats)
    return compared("`fastattn --help`, second run", runs["fastattn --help"], None, None, HELP_GOAL)


def long_figure(ctx: Context) -> list[dict]:
    """`fastattn ingest` then `fastattn stats` on long-sequence dumps: time, peak RSS, largest chunk
    file; then the figures of one long dump (`figure_rows`)."""
    c = ctx.config
    dumps = softmax_dumps(ctx, c.long_files, c.long_shape)
    nbytes = c.long_files * int(np.prod(c.long_shape)) * 4
    store = ctx.scratch("whole-long.zarr")
    env = child_env(ctx, new_cache(ctx, "long"))  # empty for the first repetition
    ingest, stats = [], []
    for rep in range(c.long_repeats):
        remove(store)
        for name, runs, cmd in (("ingest", ingest, ["ingest", str(dumps), str(store)]),
                                ("stats", stats, ["stats", str(store)])):
            p = run_process(fastattn_command(ctx, *cmd), env)
            runs.append(p)
            ctx.log(f"    {name}: {p.seconds:.1f} s, {p.cpu_s:.1f} CPU s, peak RSS {p.peak_rss_bytes / 1e6:,.0f} MB"
                    f" (rep {rep + 1}/{c.long_repeats})")
    check_stats(store, c.long_files)
    size, chunk = largest_chunk(store)
    what = f"{c.long_files} dumps of {tuple(c.long_shape)}, {size_text(nbytes)}"
    if c.quick:
        note = "--quick: shared Numba cache"
    elif c.long_repeats == 1:
        note = "first run (empty cache)"
    else:
        note = f"median of {c.long_repeats} runs, the first with an empty cache"
    rows = [compared(f"`fastattn {name}`, {what}", runs, None, nbytes, LONG_RSS_GOAL, figure=LONG, note=note,
                     files=c.long_files, shape=list(c.long_shape))
            for name, runs in (("ingest DUMPS STORE", ingest), ("stats STORE", stats))]
    rows.append(row(LONG, "largest chunk file in that store", fastattn=size / 1e6, unit="MB",
                    goal=f"≤ {CHUNK_GOAL_BYTES >> 20} MiB", met=size <= CHUNK_GOAL_BYTES, note=chunk,
                    chunk_bytes=size))
    return rows + figure_rows(ctx, env)


def figure_rows(ctx: Context, env: dict[str, str]) -> list[dict]:
    """`fastattn plot STORE overview` and `fastattn report STORE` on a store of one long dump
    (ingested and its statistics computed untimed first), `whole_repeats` runs each, interleaved."""
    c = ctx.config
    dumps = softmax_dumps(ctx, 1, c.figure_shape)
    store, figures = ctx.scratch("whole-figures.zarr"), ctx.scratch("whole-figures")
    figures.mkdir()
    for cmd in (["ingest", str(dumps), str(store)], ["stats", str(store)]):
        run_process(fastattn_command(ctx, *cmd), env)
    commands = {
        "plot STORE overview": ["plot", str(store), "overview", "-o", str(figures / "overview.png")],
        "report STORE": ["report", str(store), "-o", str(figures / "report.html")],
    }
    ctx.log(f"   fastattn plot overview / report, one dump of {tuple(c.figure_shape)}")
    runs = timed(ctx, {name: (lambda cmd=cmd: (fastattn_command(ctx, *cmd), env)) for name, cmd in commands.items()},
                 None, c.whole_repeats)
    for cmd in commands.values():  # each command's last argument is the file it draws
        if Path(cmd[-1]).stat().st_size < 1000:
            raise AssertionError(f"{cmd[-1]}: no figure drawn")
    what = f"one dump of {tuple(c.figure_shape)}, {size_text(int(np.prod(c.figure_shape)) * 4)}"
    return [compared(f"`fastattn {name}`, {what}", runs[name], None, None, FIGURE_GOAL, figure=LONG,
                     note="statistics computed before", shape=list(c.figure_shape))
            for name in commands]


# ---------------------------------------------------------------- checks


def size_text(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def check_stats(store: Path, n: int) -> None:
    """The store's committed statistics cover its n batches."""
    import fastattn

    batches = fastattn.open_stats(store).sizes["batch"]
    if batches != n:
        raise AssertionError(f"{store}: statistics for {batches} batches, expected {n}")


def largest_chunk(store: Path) -> tuple[int, str]:
    """Size and store-relative path of the largest chunk file (`c.0.0.0`, or under a `c/` folder)."""
    sizes = [(p.stat().st_size, str(p.relative_to(store))) for p in store.rglob("*")
             if p.is_file() and (p.name.startswith("c.") or "c" in p.relative_to(store).parts)]
    if not sizes:
        raise AssertionError(f"{store}: no chunk files")
    return max(sizes)
