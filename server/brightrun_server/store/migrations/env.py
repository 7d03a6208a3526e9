"""Alembic environment: runs migrations on the URL the server configured."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from brightrun_server.store.db import compare_column_types
from brightrun_server.store.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    assert url, "set config.attributes['url'] (or sqlalchemy.url) to the database URL"
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=compare_column_types,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
