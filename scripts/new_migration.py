"""Autogenerate an Alembic migration from the models against a scratch SQLite
database at the current head, then make it self-contained (plain SQL types, no
import of the live models, so old migrations never change meaning).

    python scripts/new_migration.py "add foo to jobs"
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "server" / "brightrun_server" / "store" / "migrations"


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    versions = sorted(p.name for p in (MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))
    rev_id = f"{len(versions) + 1:04d}"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.set_main_option("sqlalchemy.url", f"sqlite:///{tmp}/scratch.db")
        command.upgrade(cfg, "head")
        script = command.revision(cfg, message=sys.argv[1], autogenerate=True, rev_id=rev_id)
    path = Path(script.path)  # type: ignore[union-attr]
    text = path.read_text()
    text = text.replace("brightrun_server.store.models.UTCDateTime(timezone=True)", "sa.DateTime(timezone=True)")
    text = text.replace("astext_type=Text()", "astext_type=sa.Text()")
    text = re.sub(r"^\s*# ### .*\n", "", text, flags=re.MULTILINE)
    text = re.sub(r"^import brightrun_server\.store\.models\n", "", text, flags=re.MULTILINE)
    text = text.replace("Revises: \n", "Revises:\n")
    path.write_text(text)
    subprocess.run([sys.executable, "-m", "ruff", "format", "-q", str(path)], check=False)
    subprocess.run([sys.executable, "-m", "ruff", "check", "-q", "--fix", str(path)], check=False)
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
