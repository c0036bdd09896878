"""The ``unshortcut`` command line: a thin typer layer over library functions.

Each command parses options, calls one library function and prints a summary. A
user's mistake (:class:`UnshortcutError`) becomes a one-line ``error:`` message and
exit code 2, never a traceback. Commands register with :func:`command`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from unshortcut import __version__
from unshortcut.errors import UnshortcutError

app = typer.Typer(
    name="unshortcut",
    help="Find and remove shortcut learning in patch-wise tumor classification.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
error_console = Console(stderr=True)


def command(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command whose UnshortcutError becomes a one-line message and exit 2."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except UnshortcutError as error:
                error_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None

        return app.command(name)(wrapper)

    return decorate


def _version(value: bool) -> None:
    if value:
        console.print(f"unshortcut {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Find and remove shortcut learning in patch-wise tumor classification."""
