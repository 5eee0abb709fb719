"""Commands that live in modules of their own register themselves on the app here."""

from __future__ import annotations

import importlib

from .main import app

for module in ():
    importlib.import_module(f"{__package__}.{module}").register(app)
