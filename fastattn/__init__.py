"""fastattn: analyse thousands of transformer attention dumps as one labelled array.

The public API; everything else is private to its module.
"""

from . import accessor  # noqa: F401  (registers the `.attn` accessor on xarray objects)
from .errors import DumpError, FastattnError, StoreError
from .ingest import IngestReport, ingest
from .stats import compute_stats, open_stats, write_stats
from .store import open_store
from .synth import synthesize

__version__ = "0.1.0"

__all__ = [
    "DumpError",
    "FastattnError",
    "IngestReport",
    "StoreError",
    "compute_stats",
    "ingest",
    "open_stats",
    "open_store",
    "synthesize",
    "write_stats",
]
