"""``python -m brightrun.validation FILE [--base-model M] [--max-seq-len N] [--format F] [--json]``."""

import sys

from brightrun.validation.cli import main

sys.exit(main())
