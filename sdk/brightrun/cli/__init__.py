"""The ``brightrun`` command line: ``brightrun --help``.

Built on the SDK (typer + rich); importing it imports no server or trainer code —
``brightrun server`` and ``brightrun demo`` load those lazily.
"""

from __future__ import annotations

from brightrun.cli.app import app


def main() -> None:
    """Entry point of the ``brightrun`` console script."""
    app(prog_name="brightrun")


__all__ = ["app", "main"]
