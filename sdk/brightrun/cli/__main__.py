"""``python -m brightrun.cli`` — the same as the ``brightrun`` command."""

from brightrun.cli import main

main()
