"""Where a sweep runs: in this process (:mod:`.local`) or on a Ray cluster (:mod:`.ray`). Every module of this
package is imported here, so every backend is registered (Ray itself is imported only when used)."""

from __future__ import annotations

import importlib
import pkgutil

from experiments.backends.base import BACKENDS, Backend, Session, get_backend, register_backend

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["BACKENDS", "Backend", "Session", "get_backend", "register_backend"]
