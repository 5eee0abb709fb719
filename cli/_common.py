"""What every command shares: consoles, the one-line error, the progress bar."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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


@contextlib.contextmanager
def progress_bar(label: str):
    """Yield a `(done, total)` callback that drives a bar on a terminal, and does nothing in a pipe."""
    if not sys.stderr.isatty():
        yield None
        return
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance
