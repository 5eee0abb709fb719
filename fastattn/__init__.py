"""fastattn: analyse thousands of transformer attention dumps as one labelled array.

The public API; everything else is private to its module.

`import fastattn` is cheap: each name below is imported from its module on first use
(PEP 562), and so are the submodules (`fastattn.stats`, ...). So the command line, whose
error handling imports `fastattn.errors`, answers `--help` without loading NumPy, xarray,
zarr or Numba.

The `.attn` accessor on xarray objects is registered as soon as both fastattn and xarray
are imported, in either order: at once if xarray is already loaded, else by a one-shot
import hook that registers it right after xarray's own import finishes (`import fastattn`
then `import xarray` is the usual order, and `xr.open_zarr(...).attn` must work).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import types

from .errors import DumpError, FastattnError, StoreError

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_API = {
    "IngestReport": "ingest",
    "ingest": "ingest",
    "compute_stats": "stats",
    "open_stats": "stats",
    "open_kept": "live",
    "write_stats": "stats",
    "open_store": "store",
    "synthesize": "synth",
    "token_class_stats": "tokens",
}

__all__ = sorted(["DumpError", "FastattnError", "StoreError", *_API])


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise  # a submodule's own missing dependency
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


class _Package(types.ModuleType):
    """Keeps `fastattn.ingest` the function: importing the submodule of the same name
    (`from fastattn.ingest import ...`) would otherwise rebind it to the module."""

    def __setattr__(self, name, value):
        if name in _API and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


class _RegisterAccessor(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """The one-shot hook: finds xarray as usual, runs its loader, then registers `.attn`."""

    def find_spec(self, name, path=None, target=None):
        if name != "xarray":
            return None
        sys.meta_path.remove(self)  # one shot; also lets the search below skip this finder
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self._loader  # xarray sees its own loader
        self._loader.exec_module(module)
        from . import accessor  # noqa: F401


if "xarray" in sys.modules:
    from . import accessor  # noqa: F401
else:
    sys.meta_path.insert(0, _RegisterAccessor())
