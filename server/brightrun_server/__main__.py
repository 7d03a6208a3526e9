"""`brightrun-server` (also `python -m brightrun_server`, and `brightrun server`
for the first form): run the server until SIGINT or SIGTERM, then shut down
gracefully, leaving trainers running. Administration that needs no running
server has its own subcommands:

    brightrun-server [serve] [--data-dir D ...]       run the server (the default)
    brightrun-server backup DEST [--data-dir D]       online copy of the embedded SQLite store
    brightrun-server restore SOURCE [--data-dir D]    put a backup in place (no server may run)
    brightrun-server create-key --project P --role admin --name N
                                                      a key for a new project, printed once
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path

from brightrun_server.app import BrightRunServer
from brightrun_server.logs import configure_logging
from brightrun_server.settings import ServerSettings


async def serve(settings: ServerSettings, *, ready_file: Path | None = None) -> None:
    server = BrightRunServer(settings)
    running = await server.start()
    # Startup built the heap that lives as long as the process (modules, protobuf
    # descriptors, SQLAlchemy metadata: ~110k objects). Frozen, the cyclic GC's
    # full collections no longer walk it: unfrozen, each took ~50-100 ms on the
    # event loop and set every RPC's p99 (bench/control_plane.py).
    gc.collect()
    gc.freeze()
    if ready_file is not None:
        await asyncio.to_thread(ready_file.write_text, f"{running.port}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"BrightRun server on {settings.host}:{running.port} — data in {settings.data_dir}",
        flush=True,
    )
    await stop.wait()
    logging.getLogger(__name__).info("shutting down")
    await server.stop()


COMMANDS = ("serve", "backup", "restore", "create-key")


def _store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--database-url")


def _settings(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings.load(args.config, data_dir=args.data_dir, database_url=args.database_url)


def _embedded_db(settings: ServerSettings) -> Path:
    from brightrun_server.store.embedded import sqlite_path

    path = sqlite_path(settings.resolved_database_url)
    if path is None:
        raise SystemExit(
            "backup and restore are for the embedded SQLite store; "
            "back PostgreSQL up with its own tools (pg_dump / pg_restore)"
        )
    return path


def _backup(argv: list[str]) -> None:
    from brightrun_server.store.embedded import StoreError, backup

    parser = argparse.ArgumentParser(prog="brightrun-server backup", description="Online backup of the SQLite store.")
    parser.add_argument("dest", type=Path, help="the backup file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    _store_args(parser)
    args = parser.parse_args(argv)
    try:
        summary = backup(_embedded_db(_settings(args)), args.dest, overwrite=args.overwrite)
    except StoreError as e:
        raise SystemExit(f"backup failed: {e}") from None
    print(f"backed up to {args.dest}: {summary.describe()}")


def _restore(argv: list[str]) -> None:
    from brightrun_server.store.embedded import StoreError, restore

    parser = argparse.ArgumentParser(
        prog="brightrun-server restore", description="Replace the SQLite store with a backup (stop the server first)."
    )
    parser.add_argument("source", type=Path, help="a file written by `brightrun-server backup`")
    _store_args(parser)
    args = parser.parse_args(argv)
    try:
        summary, moved = restore(args.source, _embedded_db(_settings(args)))
    except StoreError as e:
        raise SystemExit(f"restore failed: {e}") from None
    print(f"restored {summary.describe()}")
    if moved is not None:
        print(f"the database it replaced was kept at {moved}")


def _create_key(argv: list[str]) -> None:
    from datetime import timedelta

    from brightrun_server.domain.caller import Role
    from brightrun_server.services.keys import ApiKeys
    from brightrun_server.store.db import Database

    parser = argparse.ArgumentParser(
        prog="brightrun-server create-key",
        description="Create an API key directly in the store (e.g. a new project's first admin key). "
        "The secret is printed once; only its hash is kept.",
    )
    parser.add_argument("--project", required=True, help="the project the key belongs to")
    parser.add_argument("--role", choices=[r.value for r in Role], default=Role.ADMIN.value)
    parser.add_argument("--name", default="admin", help="a label (1-64 characters)")
    parser.add_argument("--ttl-days", type=float, default=0.0, help="expiry in days (0: never)")
    _store_args(parser)
    args = parser.parse_args(argv)
    project, name = args.project.strip(), args.name.strip()
    if not 1 <= len(project) <= 64:
        raise SystemExit("--project must be 1 to 64 characters")
    if not 1 <= len(name) <= 64:
        raise SystemExit("--name must be 1 to 64 characters")
    if not 0 <= args.ttl_days <= 3650:
        raise SystemExit("--ttl-days must be between 0 (no expiry) and 3650")
    settings = _settings(args)

    async def make() -> str:
        db = Database(settings.resolved_database_url)
        try:
            await asyncio.to_thread(db.migrate)
            _, secret = await ApiKeys(db).insert(
                project=project,
                name=name,
                role=Role(args.role),
                created_by="brightrun-server create-key",
                ttl=timedelta(days=args.ttl_days) if args.ttl_days else None,
            )
            return secret
        finally:
            await db.close()

    secret = asyncio.run(make())
    print(f"# {args.role} key {name!r} for project {project!r}; shown once, store it now", file=sys.stderr)
    print(secret)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "serve"
    if argv and argv[0] in COMMANDS:
        argv = argv[1:]
    if command == "backup":
        return _backup(argv)
    if command == "restore":
        return _restore(argv)
    if command == "create-key":
        return _create_key(argv)
    parser = argparse.ArgumentParser(prog="brightrun-server", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--database-url")
    parser.add_argument("--max-concurrent-jobs", type=int)
    parser.add_argument("--ready-file", type=Path, help="write the bound port here once serving")
    args = parser.parse_args(argv)
    settings = ServerSettings.load(
        args.config,
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        database_url=args.database_url,
        max_concurrent_jobs=args.max_concurrent_jobs,
    )
    configure_logging(settings.log_level)
    asyncio.run(serve(settings, ready_file=args.ready_file))


if __name__ == "__main__":
    main()
