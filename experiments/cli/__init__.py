"""The ``probe-atlas`` command line (``probe-atlas = "experiments.cli:app"``): :data:`app` and the
:func:`~experiments.cli.main.command` decorator live in :mod:`.main`; every other module of this package adds
its commands, and all are imported here."""

from __future__ import annotations

import importlib
import pkgutil

from experiments.cli.main import app, command

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "__main__":
        importlib.import_module(f"{__name__}.{_mod.name}")  # each registers its commands

__all__ = ["app", "command"]
