"""What every command shares: consoles, the one-line error, the progress bar."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, NoReturn

import typer
from rich.console import Console

from fastattn.errors import FastattnError

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """One clear line on stderr, no traceback."""
    err.print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(code)


def run(work: Callable, *args):
    """Call the library; its deliberate errors become one line and exit code 1."""
    try:
        return work(*args)
    except FastattnError as exc:
        fail(str(exc))
    except MemoryError:
        fail("out of memory; try fewer --jobs")


def storage_options(pairs: list[str] | None) -> dict:
    """`--storage-option KEY=VALUE` pairs as fsspec storage options; `a.b=v` nests, and
    true/false become booleans (e.g. anon=true, endpoint_url=http://…, client_kwargs.region_name=…)."""
    options: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--storage-option takes KEY=VALUE, not '{pair}'")
        parsed = {"true": True, "false": False}.get(value.lower(), value)
        *parents, leaf = key.split(".")
        target = options
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = parsed
    return options


SCHEDULER_HELP = "Address of a dask scheduler (tcp://host:8786) to run on; default: local threads."
WORKERS_HELP = "Start a local dask cluster of N worker processes (one thread each) for this run."
STORAGE_HELP = "fsspec option for a store URL such as s3://bucket/store.zarr, as KEY=VALUE (repeatable)."


@contextlib.contextmanager
def progress_bar(label: str):
    """Yield a `(done, total)` callback that drives a bar on a terminal, and does nothing in a pipe."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance
