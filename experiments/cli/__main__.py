"""``python -m experiments.cli``: the ``probe-atlas`` command line."""

from experiments.cli import app

app()
