"""The benchmark runner: interleaved timing, one row per comparison, a table and JSON.

Every comparison is measured in one process run, interleaved (A B A B …) so that
load from other processes on the machine falls on both sides alike; each callable
is warmed up first (JIT compilation, imports, page cache), and the median of the
repetitions is reported.

A figure is a function ``figure(ctx) -> list[dict]``; each dict is one row (see
:func:`row`). Figures are registered in ``FIGURES`` in the order they run.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "latest.json"
DEFAULT_DATA = RESULTS / "data"
NUMBA_CACHE = RESULTS / "numba-cache"  # --quick only (see __main__)


# ---------------------------------------------------------------- configuration


@dataclass
class Config:
    """Sizes of every figure; `quick()` is the under-a-minute smoke-test variant."""

    quick: bool = False
    # kernels (benchmarks/kernels.py)
    kernel_gb: float = 1.0
    kernel_repeats: int = 5
    # sdpa: (batch, heads, seq, head_dim)
    sdpa_shape: tuple[int, int, int, int] = (64, 12, 128, 64)
    sdpa_repeats: int = 7
    # synthetic dumps: (layers, heads, seq)
    files: int = 2000
    layers: int = 6
    heads: int = 12
    seq: int = 64
    seed: int = 0
    ingest_repeats: int = 3
    stats_repeats: int = 3
    group_size: int = 100  # files per xr.concat in the straightforward ingest
    k: int = 5
    # memory: files of the big store (>= 5 GB of attention at the default shape)
    memory_files: int = 4500
    # scaling
    scaling_files: tuple[int, ...] = (250, 500, 1000, 2000)
    scaling_repeats: int = 1
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)

    @classmethod
    def quick_config(cls) -> Config:
        return cls(
            quick=True,
            kernel_gb=0.064,
            kernel_repeats=3,
            sdpa_shape=(8, 4, 64, 32),
            sdpa_repeats=3,
            files=100,
            layers=2,
            heads=4,
            seq=32,
            ingest_repeats=2,
            stats_repeats=1,
            group_size=25,
            memory_files=150,
            scaling_files=(25, 50, 100),
        )

    @property
    def bytes_per_file(self) -> int:
        return self.layers * self.heads * self.seq * self.seq * 4


@dataclass
class Context:
    config: Config
    data: Path  # cached synthetic dumps and scratch stores
    keep: bool = False
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True)
    cleanup: list[Path] = field(default_factory=list)  # deleted after the run unless keep

    def scratch(self, name: str) -> Path:
        """A fresh, empty scratch path under the data folder (removed if present)."""
        path = self.data / "scratch" / name
        remove(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def disk_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


# ---------------------------------------------------------------- timing


def interleave(
    contestants: dict[str, Callable[[], object]],
    repeats: int,
    *,
    warmup: int = 1,
    setup: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Time each callable `repeats` times, interleaved A B A B …, after `warmup` untimed calls each.

    `setup(name)` runs untimed before every call (e.g. deletes the store the call writes).
    Returns every wall-clock timing per name, in seconds; `cpu`, when given, receives the
    process CPU seconds of each call (all threads: on a shared machine, the work done
    whatever the wait).
    """
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(warmup):
        for name, fn in contestants.items():
            if setup:
                setup(name)
            fn()
    for rep in range(repeats):
        for name, fn in contestants.items():
            if setup:
                setup(name)
            gc.collect()
            started, cpu_started = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - started)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - cpu_started)
            if log:
                log(f"    {name}: {times[name][-1]:.3f} s (rep {rep + 1}/{repeats})")
    return times


def median(values) -> float:
    return float(statistics.median(values))


def row(
    figure: str,
    name: str,
    *,
    fastattn: float | None,
    baseline: float | None = None,
    unit: str = "s",
    nbytes: int | None = None,
    goal: str = "",
    met: bool | None = None,
    times: dict | None = None,
    cpu: tuple[float | None, float | None] | None = None,
    note: str = "",
    **extra,
) -> dict:
    """One table row. For times (unit "s") `ratio` is baseline / fastattn, i.e. the speed-up,
    and `gb_s` is `nbytes` / time for each side."""
    r = {"figure": figure, "name": name, "unit": unit, "fastattn": fastattn, "baseline": baseline}
    if unit == "s" and fastattn and baseline:
        r["ratio"] = baseline / fastattn
    else:
        r["ratio"] = None
    if nbytes is not None and unit == "s":
        r["nbytes"] = nbytes
        r["fastattn_gb_s"] = nbytes / fastattn / 1e9 if fastattn else None
        r["baseline_gb_s"] = nbytes / baseline / 1e9 if baseline else None
    if cpu is not None:
        r["fastattn_cpu_s"], r["baseline_cpu_s"] = cpu
    r["goal"], r["met"], r["note"] = goal, met, note
    if times is not None:
        r["times"] = times
    r.update(extra)
    return r


def skipped(figure: str, name: str, reason: str) -> dict:
    return {"figure": figure, "name": name, "unit": "s", "fastattn": None, "baseline": None,
            "ratio": None, "goal": "", "met": None, "note": f"skipped: {reason}", "skipped": True}


# ---------------------------------------------------------------- table


def _value(value, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    if unit == "MB":
        return f"{value:,.0f} MB"
    return f"{value:.3g} {unit}"


def _gbs(r: dict) -> str:
    a, b = r.get("fastattn_gb_s"), r.get("baseline_gb_s")
    if a is None and b is None:
        return "—"
    fmt = lambda v: "—" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}")  # noqa: E731
    return f"{fmt(a)} / {fmt(b)}"


def _cpu(r: dict) -> str:
    a, b = r.get("fastattn_cpu_s"), r.get("baseline_cpu_s")
    if a is None and b is None:
        return "—"
    fmt = lambda v: "—" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}")  # noqa: E731
    return f"{fmt(a)} / {fmt(b)}"


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        ratio = f"{r['ratio']:.1f}×" if r.get("ratio") else "—"
        met = {True: "yes", False: "**no**", None: ""}[r.get("met")]
        goal = r.get("goal") or ""
        if goal and met:
            goal = f"{goal} ({met})"
        name = r["name"] + (f" — {r['note']}" if r.get("note") else "")
        out.append([r["figure"], name, _value(r["fastattn"], r["unit"]), _value(r["baseline"], r["unit"]),
                    ratio, _gbs(r), _cpu(r), goal])
    return out


HEADER = ["figure", "what", "fastattn", "baseline", "ratio", "GB/s (fastattn / baseline)", "CPU s (fastattn / baseline)", "goal"]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "| " + " | ".join("---" for _ in HEADER) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines)


def print_table(rows: list[dict], file=None) -> None:
    file = file or sys.stdout
    cells = [HEADER] + table_rows(rows)
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    for n, line in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip(), file=file)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=file)


# ---------------------------------------------------------------- machine


def machine() -> dict:
    model = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    import numba
    import zarr

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(_total_memory() / 1e9, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "zarr": zarr.__version__,
        "load_average": load,
    }


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


# ---------------------------------------------------------------- run


def run(figures: dict[str, Callable[[Context], list[dict]]], ctx: Context, only: list[str] | None = None) -> dict:
    """Run the chosen figures in order; a figure that fails gives one error row, the rest still run."""
    started = time.time()
    info = machine()
    rows: list[dict] = []
    names = [n for n in figures if not only or n in only]
    try:
        for name in names:
            ctx.log(f"== {name}")
            t = time.perf_counter()
            try:
                rows.extend(figures[name](ctx))
            except Exception as exc:  # one broken figure must not lose the others
                import traceback

                traceback.print_exc()
                rows.append(skipped(name, name, f"failed: {type(exc).__name__}: {exc}") | {"error": True})
            ctx.log(f"   {name} took {time.perf_counter() - t:.1f} s")
    finally:
        if not ctx.keep:
            for path in ctx.cleanup:
                remove(path)
            remove(ctx.data / "scratch")
    info["load_average_end"] = list(os.getloadavg())
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
        "quick": ctx.config.quick,
        "seconds": round(time.time() - started, 1),
        "machine": info,
        "config": {k: v for k, v in ctx.config.__dict__.items()},
        "figures": names,
        "rows": rows,
    }


def write_json(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=_jsonable))
    os.replace(tmp, out)


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ---------------------------------------------------------------- synthetic data, cached


def synthetic(ctx: Context, files: int, *, seed: int | None = None) -> list[str]:
    """Paths of `files` synthetic dumps at the configured shape, synthesised once and cached
    in the data folder, keyed by the parameters (a `complete.json` marks a finished folder)."""
    from fastattn.synth import synthesize

    c = ctx.config
    seed = c.seed if seed is None else seed
    key = f"dumps-L{c.layers}-H{c.heads}-S{c.seq}-seed{seed}-n{files}"
    folder = ctx.data / key
    marker = folder / "complete.json"
    params = {"files": files, "layers": c.layers, "heads": c.heads, "seq": c.seq, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == params:
        paths = sorted(str(p) for p in folder.glob("attention_batch_*.npz"))
        if len(paths) == files:
            return paths
    remove(folder)
    ctx.log(f"   synthesising {files} dumps of ({c.layers}, {c.heads}, {c.seq}, {c.seq}) into {folder}")
    t = time.perf_counter()
    paths = synthesize(folder, files=files, layers=c.layers, heads=c.heads, seq=c.seq, seed=seed, jobs=c.jobs)
    marker.write_text(json.dumps(params))
    ctx.log(f"   synthesised in {time.perf_counter() - t:.1f} s")
    return sorted(paths)
