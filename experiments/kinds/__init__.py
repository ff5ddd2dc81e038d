"""The sweep kinds' runners (:mod:`.registry`), one module per family that needs its own, and the generic
runner that runs every other registered family: each module registers its runner when imported, and every
module of this package is imported here."""

from __future__ import annotations

import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
