"""What every command shares: consoles, the one-line error, the progress bar, the click pieces."""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Callable, NoReturn

import click

from fastattn.choices import STORE_DTYPES
from fastattn.errors import FastattnError


class _Console:
    """A rich Console made on first use: `--help`, usage errors and the JSON and CSV output never
    import rich (a tenth of a second of start-up)."""

    def __init__(self, stderr: bool):
        self.stderr = stderr

    @functools.cached_property
    def rich(self):
        from rich.console import Console

        return Console(stderr=self.stderr, soft_wrap=True)

    def print(self, *objects, **options) -> None:
        if options == {"markup": False, "highlight": False} and all(type(o) is str for o in objects):
            # plain text: printed as it is, without importing rich (or its ":name:" emoji codes)
            print(*objects, file=sys.stderr if self.stderr else sys.stdout, flush=True)
            return
        self.rich.print(*objects, **options)


console = _Console(stderr=False)
err = _Console(stderr=True)


def rich_table(title: str):
    """A rich Table for `--format table` (rich imported here, on first use)."""
    from rich.table import Table

    return Table(title=title)


#: `--format` of the commands that print a table or JSON.
TABLE_OR_JSON = click.Choice(("table", "json"))
#: `--format` of `fastattn stats`.
TABLE_JSON_OR_CSV = click.Choice(("table", "json", "csv"))
#: `--dtype` of ingest and capture.
STORE_DTYPE = click.Choice(STORE_DTYPES)
#: A file path, given to the command as a pathlib.Path.
PATH = click.Path(path_type=Path)


def repeatable(*names: str, **attrs):
    """A repeatable option (`--layer 1 --layer 3`): a list, or None when it is not given, as the
    library takes them."""
    return click.option(*names, multiple=True, callback=lambda ctx, param, values: list(values) or None, **attrs)


def fail(message: str, code: int = 1) -> NoReturn:
    """One clear line on stderr, no traceback."""
    err.print(f"error: {message}", markup=False, highlight=False)
    raise click.exceptions.Exit(code)


def run(work: Callable, *args):
    """Call the library; its deliberate errors become one line and exit code 1.

    An OSError the library did not foresee is one line too, `path: reason`: a last resort
    (each known cause has its own message), never a reason to skip one."""
    try:
        return work(*args)
    except FastattnError as exc:
        fail(f"--{exc.parameter.replace('_', '-')}: {exc.reason}" if exc.parameter else str(exc))
    except MemoryError:
        fail("out of memory; try fewer --jobs")
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        fail(f"{exc.filename}: {reason}" if exc.filename else reason.splitlines()[0])


def storage_options(pairs: list[str] | None) -> dict:
    """`--storage-option KEY=VALUE` pairs as fsspec storage options; `a.b=v` nests, and
    true/false become booleans (e.g. anon=true, endpoint_url=http://…, client_kwargs.region_name=…)."""
    options: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key or "" in key.split("."):
            fail(f"--storage-option takes KEY=VALUE (KEY may be a.b for a nested option), not '{pair}'", 2)
        parsed = {"true": True, "false": False}.get(value.lower(), value)
        *parents, leaf = key.split(".")
        target = options
        for depth, parent in enumerate(parents, start=1):
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                fail(f"--storage-option {pair}: {'.'.join(parents[:depth])} was given a value, so it cannot hold options", 2)
        if isinstance(target.get(leaf), dict):
            fail(f"--storage-option {pair}: {key} holds nested options ({key}.NAME=VALUE), it cannot be a value", 2)
        target[leaf] = parsed
    return options


SCHEDULER_HELP = "Address of a dask scheduler (tcp://host:8786) to run on; default: local threads."
WORKERS_HELP = "Start a local dask cluster of N worker processes (one thread each) for this run."
STORAGE_HELP = "fsspec option for a store URL such as s3://bucket/store.zarr, as KEY=VALUE (repeatable)."


@contextlib.contextmanager
def progress_bar(label: str):
    """Yield a `(done, total, note="")` callback that drives a bar on a terminal (the note, such
    as a rate, shown after the count), and does nothing in a pipe."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=err.rich, transient=True) as bar:
        task = bar.add_task(label, total=None, note="")

        def advance(done: int, total: int, note: str = "") -> None:
            bar.update(task, completed=done, total=total, note=note)

        yield advance
