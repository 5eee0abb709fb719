"""Ingest figure: `fastattn.ingest` vs the straightforward xarray loop; and the scaling figure.

Both sides read the same cached synthetic dumps (warm in the page cache after the
warm-up calls) and write a new store each repetition (the old one is deleted, untimed).
MB/s counts the attention ingested: files × layers × heads × seq × seq × 4 bytes.
"""

from __future__ import annotations

import numpy as np

from . import baselines
from .runner import Context, disk_bytes, interleave, median, remove, row, synthetic

FIGURE = "ingest"


def fastattn_ingest(paths, store_path, jobs, files: int | None = None):
    """`fastattn.ingest` into a new store; `files` expected (default: one per path)."""
    import fastattn

    report = fastattn.ingest(paths, store_path, jobs=jobs)
    if report.rejected or report.files_ingested != (len(paths) if files is None else files):
        raise AssertionError(f"ingest rejected files: {report.summary()}")
    return report


def figure(ctx: Context) -> list[dict]:
    c = ctx.config
    paths = synthetic(ctx, c.files)
    nbytes = len(paths) * c.bytes_per_file
    ours, theirs = ctx.scratch("ingest-fastattn.zarr"), ctx.scratch("ingest-xarray.zarr")
    stores = {"fastattn": ours, "xarray": theirs}
    cpu = {}
    times = interleave(
        {
            "fastattn": lambda: fastattn_ingest(paths, ours, c.jobs),
            "xarray": lambda: baselines.xarray_ingest(paths, theirs, c.group_size),
        },
        c.ingest_repeats,
        setup=lambda name: remove(stores[name]),
        log=ctx.log,
        cpu=cpu,
    )
    fa, xr_ = median(times["fastattn"]), median(times["xarray"])
    size_ours, size_theirs = disk_bytes(ours), disk_bytes(theirs)
    check_same(ours, theirs, len(paths))
    speedup = xr_ / fa
    mb_s = nbytes / fa / 1e6
    rows = [
        row(
            FIGURE,
            f"ingest {len(paths)} dumps of ({c.layers}, {c.heads}, {c.seq}, {c.seq}), {nbytes / 1e9:.2f} GB,"
            f" jobs={c.jobs}, vs xarray concat/to_zarr(append_dim) per {c.group_size} files",
            fastattn=fa,
            baseline=xr_,
            nbytes=nbytes,
            goal="≥ 3× and ≥ 500 MB/s",
            met=speedup >= 3 and mb_s >= 500,
            times=times,
            cpu=(median(cpu["fastattn"]), median(cpu["xarray"])),
            fastattn_mb_s=mb_s,
            baseline_mb_s=nbytes / xr_ / 1e6,
            files=len(paths),
        ),
        row(FIGURE, "store size on disk", fastattn=size_ours / 1e6, baseline=size_theirs / 1e6, unit="MB",
            note=f"dumps {sum(_size(p) for p in paths) / 1e6:,.0f} MB",
            fastattn_bytes=size_ours, baseline_bytes=size_theirs),
    ]
    for path in stores.values():
        remove(path)
    return rows


def _size(path: str) -> int:
    import os

    return os.path.getsize(path)


def check_same(ours, theirs, files: int) -> None:
    """Both stores hold the same attention (spot check of a few batches)."""
    import fastattn
    import xarray as xr

    a = fastattn.open_store(ours)
    b = xr.open_zarr(theirs)
    for i in sorted({0, files // 2, files - 1}):
        np.testing.assert_array_equal(a.attention.isel(batch=i).values, b.attention.isel(batch=i).values)


# ---------------------------------------------------------------- scaling


def scaling(ctx: Context) -> list[dict]:
    """Ingest then stats at each size (first n of the cached dumps); a line fit per step."""
    from fastattn.stats import write_stats

    from .stats_bench import warm_up

    c = ctx.config
    sizes = list(c.scaling_files)
    paths = synthetic(ctx, max(c.files, max(sizes)))
    warm_up(ctx)
    store = ctx.scratch("scaling.zarr")
    results: dict[str, dict[int, list[float]]] = {"ingest": {}, "stats": {}}
    import time

    for rep in range(c.scaling_repeats):
        for n in sizes:
            remove(store)
            t = time.perf_counter()
            fastattn_ingest(paths[:n], store, c.jobs)
            ingest_s = time.perf_counter() - t
            t = time.perf_counter()
            write_stats(store, k=c.k, jobs=c.jobs)
            stats_s = time.perf_counter() - t
            results["ingest"].setdefault(n, []).append(ingest_s)
            results["stats"].setdefault(n, []).append(stats_s)
            ctx.log(f"    {n} files: ingest {ingest_s:.2f} s, stats {stats_s:.2f} s (rep {rep + 1})")
    remove(store)
    rows = []
    for step, by_size in results.items():
        x = np.array(sizes, dtype=float)
        y = np.array([median(by_size[n]) for n in sizes])
        slope, intercept, r2 = fit_line(x, y)
        per_file_ms = {int(n): 1e3 * t / n for n, t in zip(sizes, y)}
        rows.append(
            row(
                "scaling",
                f"{step}: s per 1,000 files (line fit over {', '.join(str(n) for n in sizes)} files)",
                fastattn=slope * 1000,
                unit="s/1000 files",
                goal="linear (R² ≥ 0.99)",
                met=r2 >= 0.99,
                note=f"R² {r2:.4f}, intercept {intercept:.2f} s, ms/file "
                + ", ".join(f"{n}: {v:.1f}" for n, v in per_file_ms.items()),
                step=step,
                sizes=sizes,
                seconds=[float(v) for v in y],
                times={str(n): by_size[n] for n in sizes},
                slope_s_per_1000=slope * 1000,
                intercept_s=intercept,
                r2=r2,
                ms_per_file=per_file_ms,
            )
        )
    return rows


def fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares line y = slope·x + intercept and its R²."""
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (residual**2).sum() / total if total > 0 else 1.0
    return float(slope), float(intercept), float(r2)
