"""`python -m unshortcut`: the command line (also what torchrun launches with -m)."""

from unshortcut.cli import app

app()
