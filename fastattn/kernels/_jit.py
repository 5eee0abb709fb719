"""How every kernel compiles, where compiled code is cached, how kernels use threads, and
the argument plumbing the kernels share.

One jit alias is used everywhere (the datashader/numbagg pattern) so that compile
options live in one place: ``ngjit``, single-threaded, releasing the GIL
(``nogil``).  It compiles lazily, on the first call with a new type signature,
and only that signature; importing ``fastattn`` compiles nothing.

Threads.  A kernel takes a range ``lo … hi − 1`` of independent planes (or
samples); ``parallel_for`` runs it over pieces of the planes in Python threads,
which run side by side because the kernel releases the GIL.  So one compiled
kernel serves ``parallel=True`` and ``parallel=False`` (inside dask), where
Numba's ``parallel=True``/``prange`` needs a second variant of every kernel:
compiling that variant took ~8 CPU-s more than the serial one for the
statistics kernel, on every first run.

Compile time (a first run's cost; measured on the statistics kernel, float32):

- One function per kernel, not a call tree: Numba compiles a called ``njit``
  function to machine code on its own and then links its LLVM code into each
  caller and optimises and generates it again there.  Folding the per-plane
  function into the kernel saved ~3 CPU-s.
- ``njit(inline="always")`` (IR inlining) copies the callee's IR block by
  block, re-copying its whole variable scope for each block: cheap for small
  helpers (the per-row ones, which must be inlined for speed: as calls they
  cost ~25%), slow for big ones.  Each call site is one more copy; the top-k
  ranking has one call site (a second cost ~2 CPU-s).
- ``@overload(inline="always")`` compiles its implementation in full once just
  to type it, then again inside the caller: overloads here are small (they only
  pick the dtype's few lines).

Fast-math is limited to ``reassoc`` (reductions may be reordered, which is what
lets LLVM vectorise them), ``contract`` (FMA) and ``nsz``.  ``nnan``/``ninf``
stay off because NaN is a real value here: it marks everything outside a
plane's valid block.  ``error_model="numpy"`` drops Python's division-by-zero
checks, which would otherwise put a branch in every vectorised loop.

The disk cache.  Compiling the statistics kernel takes ~5 CPU-s, so compiled code
is kept on disk and a machine pays that once, not every command:
``$NUMBA_CACHE_DIR/fastattn/<tag>`` if the user set ``NUMBA_CACHE_DIR``, else
``$XDG_CACHE_HOME/fastattn/numba/<tag>`` (``~/.cache/fastattn/numba/<tag>``).
``FASTATTN_NUMBA_CACHE=0`` turns it off.  It is off on Windows (no ``flock``)
and, with a warning, when the directory cannot be written.

Numba's own ``cache=True`` has known failures, and the reason this project kept
it off; each is closed here rather than by turning the cache off:

- *Stale code* (numba keys a function's cache on its own source file only, so an
  edit to a helper module, to the jit options in this file, or a NumPy upgrade
  goes unnoticed): ``<tag>`` is the fastattn, Numba and NumPy versions plus a
  hash of every kernel source file, so any of those changes starts a fresh
  directory.  Old ones are never read again (``rm -r ~/.cache/fastattn`` frees them).
- *Processes compiling at once* (dask workers, parallel test runs; numba #4807
  reports segfaults from caches written in parallel): numba writes each file atomically (a temporary file, then
  ``os.replace``), but saves an overload as read index → write index → write
  data, so two processes adding different signatures of one function can leave
  an index entry that names the other signature's code, a wrong-type load and a
  crash on every later run.  Here a save holds an ``flock`` on the cache
  directory, re-reads the index under it, writes the data file before the index
  entry that names it, and never changes an entry, so a reader that sees an entry
  always finds that entry's complete code.  Compilation itself is not under the
  lock: processes compile side by side and the later ones find their entry saved.
  (numba #10128, a ``guvectorize`` wrapper and its kernel saved by two processes to
  two files, cannot happen: fastattn has only ``njit`` functions, one file each.)
- A cached function that calls a ``parallel=True`` one segfaults when loaded from
  the cache (numba #8578, #10184), and a parallel and a serial dispatcher of one
  function share one index entry: fastattn has no ``parallel=True`` function.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

import numba
import numpy as np
from numba.core import caching

from .. import __version__

FASTMATH = {"reassoc", "contract", "nsz"}
_OPTIONS = {"nogil": True, "fastmath": FASTMATH, "error_model": "numpy"}


def _sources_hash() -> str:
    """A hash of every kernel source file (this one included)."""
    sources = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        sources.update(path.name.encode() + b"\0" + path.read_bytes())
    return sources.hexdigest()[:16]


def _cache_dir() -> Path | None:
    """The directory compiled kernels are cached in, created; None when caching is off."""
    if os.environ.get("FASTATTN_NUMBA_CACHE", "").strip() == "0" or os.name != "posix":
        return None
    if os.environ.get("NUMBA_CACHE_DIR"):
        root = Path(os.environ["NUMBA_CACHE_DIR"]) / "fastattn"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastattn" / "numba"
    path = root / f"{__version__}-numba{numba.__version__}-numpy{np.__version__}-{SOURCES}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write to {path}")
    except OSError as exc:
        warnings.warn(
            f"fastattn: compiled kernels are not cached ({exc}), so every run compiles them; "
            "set NUMBA_CACHE_DIR to a writable folder, or FASTATTN_NUMBA_CACHE=0 to silence this",
            stacklevel=2,
        )
        return None
    return path


SOURCES = _sources_hash()
CACHE_DIR = _cache_dir()


@contextmanager
def _locked(folder: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder/lock``, between processes and between threads."""
    import fcntl

    fd = os.open(os.path.join(folder, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class _IndexFile(caching.IndexDataCacheFile):
    """Numba's index and data files, saved as the module docstring says.  A cache file that
    cannot be read or written (a full disk, a file damaged by hand, a file system without
    locks) means compiling again, never a failed run."""

    def load(self, key):
        try:
            return super().load(key)
        except Exception:
            return None

    def save(self, key, data):
        try:
            self._save_locked(key, data)
        except Exception:
            pass

    def _save_locked(self, key, data):
        with _locked(self._cache_path):
            overloads = self._load_index()
            name = overloads.get(key)
            if name is not None and os.path.exists(self._data_path(name)):
                return  # another process saved this overload meanwhile
            if name is None:
                taken = set(overloads.values())
                name = next(n for n in map(self._data_name, itertools.count(1)) if n not in taken)
            self._save_data(name, data)
            if key not in overloads:
                overloads[key] = name
                self._save_index(overloads)


class _Locator(caching._CacheLocator):
    """Every kernel's files in CACHE_DIR, under numba's names (module.function-line.pyXY)."""

    def __init__(self, py_func):
        self._lineno = py_func.__code__.co_firstlineno

    def get_cache_path(self):
        return str(CACHE_DIR)

    def get_source_stamp(self):
        return SOURCES  # constant within a directory: its name already has the sources' hash

    def get_disambiguator(self):
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func, py_file):
        return cls(py_func)


class _CacheImpl(caching.CompileResultCacheImpl):
    _locator_classes = [_Locator]


class _Cache(caching.FunctionCache):
    """A dispatcher's disk cache: CACHE_DIR and the locked save."""

    _impl_class = _CacheImpl

    def __init__(self, py_func):
        super().__init__(py_func)
        self._cache_file = _IndexFile(self._cache_path, self._impl.filename_base, SOURCES)

    def load_overload(self, sig, target_context):
        """Numba's own, without its ``target_context.refresh()``: only the runtime the loaded
        code calls (NRT) is started.  The refresh builds the typing and lowering registries
        a compile needs (importing ~60 Numba modules, and SciPy's BLAS for its check),
        ~0.6 CPU-s that a process which only loads cached code never uses; a cache miss
        still gets them, since every compile refreshes both contexts first."""
        try:
            from numba.core.runtime import rtsys

            rtsys.initialize(target_context)
            guard, load = self._guard_against_spurious_io_errors, self._load_overload
        except (ImportError, AttributeError):  # another Numba's internals: its own way, with the refresh
            return super().load_overload(sig, target_context)
        with guard():
            return load(sig, target_context)
        return None  # the guard swallowed an error: compile instead


def ngjit(function, signature=None):
    """A lazy single-threaded kernel with this module's options and disk cache (set before any
    compile).  With ``signature``: compiled for exactly that one, now, and calls with other
    array layouts are converted to it instead of compiling again."""
    dispatcher = numba.njit(**_OPTIONS)(function)
    if CACHE_DIR is not None:
        dispatcher._cache = _Cache(function)
    if signature is not None:
        dispatcher.compile(signature)
        dispatcher.disable_compile()
    return dispatcher


# One parallel kernel call at a time per process.  A second caller (another Python
# thread, e.g. a dask worker) runs its call in its own thread instead of waiting:
# threads never multiply past the cores.
_PARALLEL_SLOT = threading.Lock()
_THREADS: ContextVar[int | None] = ContextVar("fastattn_kernel_threads", default=None)
_POOL: ThreadPoolExecutor | None = None  # the helper threads, started on the first parallel call


def _forget_threads() -> None:
    """In a forked child: the parent's helper threads do not exist there, nor its lock holders."""
    global _PARALLEL_SLOT, _POOL
    _PARALLEL_SLOT, _POOL = threading.Lock(), None


os.register_at_fork(after_in_child=_forget_threads)


@contextmanager
def kernel_threads(n: int | None) -> Iterator[None]:
    """Parallel kernel calls made in this context use at most ``n`` threads (None: all).

    Never more than ``numba.config.NUMBA_NUM_THREADS`` (the cores, or the
    ``NUMBA_NUM_THREADS`` environment variable)."""
    token = _THREADS.set(n)
    try:
        yield
    finally:
        _THREADS.reset(token)


def parallel_for(kernel, n: int, *args, parallel: bool = True) -> None:
    """Run ``kernel(lo, hi, *args)`` over the indices ``[0, n)``, in threads if ``parallel``.

    ``kernel`` is an ``ngjit`` function (it releases the GIL) that handles
    indices ``lo … hi − 1`` (planes, samples), each on its own, writing only
    that index's outputs.  Parallel: ``[0, n)`` is cut into contiguous pieces
    (4 per thread, so a thread that another process slows down takes fewer),
    and this thread plus ``threads − 1`` helper threads take them until none
    is left.  Each index is computed by one thread in a fixed order, so results
    never depend on the thread count or on ``parallel``.  Only one call at a
    time runs parallel (``_PARALLEL_SLOT``); another runs single-threaded
    meanwhile.  The helper threads are kept between calls (idle), since
    starting them cost ~0.4 ms a call.  (Why not ``prange``: the module docstring.)
    """
    if n <= 0:
        return
    threads = min(_THREADS.get() or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS, n)
    if not parallel or threads <= 1 or not _PARALLEL_SLOT.acquire(blocking=False):
        kernel(0, n, *args)
        return
    todo: queue.SimpleQueue = queue.SimpleQueue()
    pieces = min(n, 4 * threads)
    for i in range(pieces):
        todo.put((n * i // pieces, n * (i + 1) // pieces))

    def work() -> None:
        while True:
            try:
                lo, hi = todo.get_nowait()
            except queue.Empty:
                return
            kernel(lo, hi, *args)

    global _POOL
    try:
        if _POOL is None:  # only the slot's holder gets here
            _POOL = ThreadPoolExecutor(numba.config.NUMBA_NUM_THREADS - 1, "fastattn-kernel")
        helpers = [_POOL.submit(work) for _ in range(threads - 1)]
        try:
            work()
        finally:  # after an error here (Ctrl-C), the helpers stop at their current piece
            while not todo.empty():
                todo.get_nowait()
            for helper in helpers:
                helper.result()  # waits; a helper's error is raised here
    finally:
        _PARALLEL_SLOT.release()


def float_dtype(*arrays: np.ndarray) -> np.dtype:
    """float32 if every input is float32, else float64."""
    dt = np.result_type(*arrays)
    return np.dtype(np.float32) if dt == np.float32 else np.dtype(np.float64)


def plane_lengths(lengths, lead: tuple[int, ...], limit: int) -> np.ndarray:
    """Per-plane valid lengths, shape ``(prod(lead),)`` int64, clipped to [0, limit].

    ``lengths`` is None (every plane fully valid) or an integer array whose
    shape is a prefix of ``lead``; it applies to every plane under that prefix,
    e.g. lengths of shape (B,) for planes laid out as (B, layer, head).
    """
    n_planes = int(np.prod(lead, dtype=np.int64))
    if lengths is None:
        return np.full(n_planes, limit, dtype=np.int64)
    lengths = np.asarray(lengths)
    if lengths.dtype.kind not in "iub":
        raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
    if lengths.shape != lead[: lengths.ndim]:
        raise ValueError(
            f"lengths shape {lengths.shape} is not a prefix of the leading dims {lead}"
        )
    lengths = lengths.astype(np.int64)
    if lengths.size and lengths.min() < 0:
        raise ValueError("lengths must be >= 0")
    expanded = lengths.reshape(lengths.shape + (1,) * (len(lead) - lengths.ndim))
    flat = np.broadcast_to(expanded, lead).reshape(n_planes)
    return np.minimum(flat, limit).astype(np.int64)
