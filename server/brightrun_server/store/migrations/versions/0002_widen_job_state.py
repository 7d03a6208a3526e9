"""widen jobs.state to 32 characters

'awaiting_decision' (17) did not fit VARCHAR(16): on PostgreSQL every job whose
automatic recoveries ran out failed to settle (StringDataRightTruncation) and was
force-failed instead of waiting for a decision. SQLite does not enforce VARCHAR
lengths, so only PostgreSQL needs the change (and SQLite's ALTER would rebuild
the table for nothing).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    op.alter_column("jobs", "state", existing_type=sa.String(16), type_=sa.String(32), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    op.alter_column("jobs", "state", existing_type=sa.String(32), type_=sa.String(16), existing_nullable=False)
