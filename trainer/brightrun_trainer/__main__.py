"""Command line of the trainer.

``python -m brightrun_trainer run --spec SPEC.json`` runs one attempt and exits
with :data:`~brightrun_trainer.spec.EXIT_SUCCEEDED`, ``EXIT_FAILED`` or
``EXIT_STOPPED``. ``python -m brightrun_trainer tiny OUT_DIR`` builds a tiny
test model (see :mod:`brightrun_trainer.tiny`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from brightrun_trainer.spec import EXIT_FAILED, AttemptSpec


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["tiny"]:
        from brightrun_trainer.tiny import main as tiny_main

        return tiny_main(args[1:])
    parser = argparse.ArgumentParser(prog="python -m brightrun_trainer")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one training attempt")
    run.add_argument("--spec", type=Path, required=True, help="AttemptSpec JSON file")
    commands.add_parser("tiny", help="build a tiny test model (see --help of that command)")
    parsed = parser.parse_args(args)
    try:
        spec = AttemptSpec.model_validate_json(parsed.spec.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"brightrun_trainer: cannot read spec {parsed.spec}: {e}", file=sys.stderr)
        return EXIT_FAILED
    from brightrun_trainer.runner import run_attempt

    code = run_attempt(spec)
    # Everything durable is fsynced and the reporter is closed: skip the slow
    # interpreter teardown (torch, grpc), during which a late SIGTERM would kill
    # the process with a misleading status.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
