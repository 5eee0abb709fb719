"""Which dask scheduler runs the work: local threads by default, a dask.distributed cluster
when the user asks for one (`--scheduler ADDRESS`, `--workers N`) or has a `Client` active
in the notebook. No home-made distribution: dask schedules, Zarr and fsspec store."""

from __future__ import annotations

import contextlib
import sys

from .errors import FastattnError


def active_client():
    """The `dask.distributed.Client` the user made current, or None."""
    if "distributed" not in sys.modules:
        return None  # no Client can exist; and importing distributed takes a second
    try:
        from distributed import get_client
    except ImportError:
        return None
    try:
        return get_client()
    except ValueError:
        return None


@contextlib.contextmanager
def connect(scheduler: str | None = None, workers: int | None = None):
    """Yield a Client for `scheduler` (an address), a new local cluster of `workers`
    processes, the active Client, or None for plain local threads.

    A local cluster gets one thread per worker process, so Numba (single-threaded inside
    dask tasks) × threads × processes never exceeds the cores asked for.
    """
    if scheduler is None and workers is None:
        yield active_client()
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise FastattnError("a dask scheduler or local workers need dask.distributed: pip install 'fastattn[distributed]'") from None
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="10s")
        except OSError as exc:
            raise FastattnError(f"cannot reach the dask scheduler at {scheduler} ({exc})") from None
        with client:
            yield client
        return
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        yield client
