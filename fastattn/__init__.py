"""fastattn: analyse thousands of transformer attention dumps as one labelled array.

The public API; everything else is private to its module.
"""

from .errors import DumpError, FastattnError, StoreError
from .ingest import IngestReport, ingest
from .store import open_store
from .synth import synthesize

__version__ = "0.1.0"

__all__ = [
    "DumpError",
    "FastattnError",
    "IngestReport",
    "StoreError",
    "ingest",
    "open_store",
    "synthesize",
]
