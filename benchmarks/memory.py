"""Memory figure: peak RSS of `fastattn ingest` and `fastattn stats` on a store of ≥ 5 GB of attention.

Each step runs in a child process (`python -m benchmarks.memory ingest|stats …`), so the
peak is that step's alone: the child reports its own high-water mark (VmHWM, exact;
see `peak_rss`) and the parent also polls the child's RSS with
psutil every 20 ms as a cross-check. The dumps are the cached ingest corpus plus extra
files (another seed) up to `memory_files`; those extra dumps and the store are deleted
after the run unless --keep.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from .runner import Context, disk_bytes, row, synthetic

FIGURE = "memory"
REPO = Path(__file__).resolve().parent.parent
GOAL_BYTES = 1.5e9


def run_child(args: list[str], log, quick: bool = False) -> dict:
    """Run `python -m benchmarks.memory ARGS` and return its report plus the polled peak RSS."""
    import psutil

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if not quick:
        # As a user's first `fastattn stats` runs: the JIT compilation (and its memory) included.
        env["FASTATTN_NUMBA_CACHE"] = "0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.memory", *args], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    polled = 0
    try:
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                polled = max(polled, rss)
            except psutil.Error:
                pass
            time.sleep(0.02)
    finally:
        stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {' '.join(args[:1])} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    report["polled_rss_bytes"] = polled
    log(f"    {args[0]}: peak RSS {report['peak_rss_bytes'] / 1e6:,.0f} MB (polled {polled / 1e6:,.0f} MB),"
        f" {report['seconds']:.1f} s")
    return report


def figure(ctx: Context) -> list[dict]:
    c = ctx.config
    inputs = synthetic(ctx, min(c.files, c.memory_files))
    extra = c.memory_files - len(inputs)
    if extra > 0:
        more = synthetic(ctx, extra, seed=c.seed + 1)
        ctx.cleanup.append(Path(more[0]).parent)
        inputs = inputs + more
    nbytes = len(inputs) * c.bytes_per_file
    store = ctx.data / f"memory-{len(inputs)}.zarr"
    ctx.cleanup.append(store)
    from .runner import remove

    remove(store)
    # The file list goes through a file: thousands of paths would not fit a command line.
    listing = ctx.data / "scratch" / "memory-inputs.txt"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("\n".join(inputs))
    ingest = run_child(["ingest", str(store), str(listing), str(c.jobs)], ctx.log, c.quick)
    stats = run_child(["stats", str(store), str(c.k), str(c.jobs)], ctx.log, c.quick)
    size = disk_bytes(store)
    shape = f"{len(inputs)} dumps, {nbytes / 1e9:.2f} GB of attention, store {size / 1e9:.2f} GB on disk"
    big = nbytes >= 5e9
    rows = [
        row(FIGURE, f"peak RSS of fastattn stats (write_stats, jobs={c.jobs}), {shape}",
            fastattn=stats["peak_rss_bytes"] / 1e6, unit="MB", goal="< 1,500 MB on ≥ 5 GB",
            met=(stats["peak_rss_bytes"] < GOAL_BYTES) if big else None,
            note="" if big else "store under 5 GB: goal not applicable",
            polled_mb=stats["polled_rss_bytes"] / 1e6, seconds=stats["seconds"],
            gb_s=nbytes / stats["seconds"] / 1e9, nbytes=nbytes, store_bytes=size),
        row(FIGURE, f"peak RSS of the ingest that built it (jobs={c.jobs})",
            fastattn=ingest["peak_rss_bytes"] / 1e6, unit="MB",
            polled_mb=ingest["polled_rss_bytes"] / 1e6, seconds=ingest["seconds"],
            gb_s=nbytes / ingest["seconds"] / 1e9, nbytes=nbytes),
    ]
    return rows


# ---------------------------------------------------------------- the child process


def _child(argv: list[str]) -> None:
    step = argv[0]
    started = time.perf_counter()
    if step == "ingest":
        import fastattn

        store, listing, jobs = argv[1], argv[2], int(argv[3])
        paths = Path(listing).read_text().split("\n")
        report = fastattn.ingest(paths, store, jobs=jobs)
        if report.rejected:
            raise SystemExit(f"rejected: {report.rejected[:3]}")
        detail = {"files": report.files_ingested, "bytes_read": report.bytes_read}
    elif step == "stats":
        from fastattn.stats import write_stats

        store, k, jobs = argv[1], int(argv[2]), int(argv[3])
        detail = write_stats(store, k=k, jobs=jobs)
    else:
        raise SystemExit(f"unknown step {step}")
    seconds = time.perf_counter() - started
    print(json.dumps({"step": step, "seconds": seconds, "peak_rss_bytes": peak_rss(), **detail}))


def peak_rss() -> int:
    """This process's peak RSS in bytes.

    VmHWM from /proc (Linux): the high-water mark of this process's own memory map.
    Not `ru_maxrss`, which Linux carries over across exec from the parent that forked
    us (a 600 MB benchmark runner would make every child report at least 600 MB).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


if __name__ == "__main__":
    _child(sys.argv[1:])
