"""``brightrun keys`` (create, list, revoke) and ``brightrun whoami``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from brightrun.cli._common import (
    fmt_ago,
    fmt_time,
    globals_of,
    parse_duration,
    print_json,
    stderr,
    stdout,
)
from brightrun.cli.app import JsonOpt, _enum, app
from brightrun.enums import Role
from brightrun.types import ApiKey, Caller

keys_app = typer.Typer(help="Create, list and revoke the project's API keys (admin keys only).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _state(key: ApiKey) -> Text:
    if key.is_revoked:
        return Text(f"revoked {fmt_ago(key.revoke_time)}", style="red")
    if key.is_expired:
        return Text("expired", style="red")
    return Text("active", style="green")


def _expires(key: ApiKey) -> str:
    return fmt_time(key.expire_time) if key.expire_time is not None else "never"


def key_details(key: ApiKey) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", justify="right")
    grid.add_column()
    grid.add_row("key", Text(key.id, style="bold"))
    grid.add_row("name", key.name)
    grid.add_row("project", key.project)
    grid.add_row("role", key.role.label)
    grid.add_row("state", _state(key))
    grid.add_row("created", f"{fmt_time(key.create_time)} by {key.created_by or '-'}")
    grid.add_row("expires", _expires(key))
    grid.add_row("last used", fmt_ago(key.last_use_time) if key.last_use_time is not None else "never")
    return grid


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Who or what uses it, e.g. ana-laptop or ci (recorded as the actor).")],
    role: Annotated[str, typer.Option(help="viewer, member or admin.")] = "member",
    ttl: Annotated[str | None, typer.Option(help="Lifetime, e.g. 30d, 12h or 90m (default: never expires).")] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the secret, for KEY=$(brightrun keys create ...).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the key and its secret as JSON.")] = False,
) -> None:
    """Create an API key and print its secret: the only time it is shown."""
    parsed = _enum(Role, role, "--role")
    lifetime = None
    if ttl is not None:
        try:
            lifetime = parse_duration(ttl)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--ttl") from None
    with globals_of(ctx).client() as client:
        created = client.api_keys.create(name, role=parsed or Role.MEMBER, ttl=lifetime)
    key = created.api_key
    if as_json:
        print_json(created)  # the secret included: it is what --json is for
    elif quiet:
        sys.stdout.write(created.secret + "\n")
        sys.stdout.flush()
    else:
        out = stdout()
        out.print(key_details(key))
        out.print(Text.assemble(("secret", "bold"), "  ", (created.secret, "bold green")))
    stderr().print(
        f"[yellow]the secret of key {key.id} is shown only this once (the server keeps a hash): store it now[/]"
    )


@keys_app.command("list")
def keys_list(
    ctx: typer.Context,
    show_all: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List the project's API keys, newest first (never their secrets)."""
    with globals_of(ctx).client() as client:
        keys = list(client.api_keys.list(show_revoked=show_all))
    if as_json:
        print_json(keys)
        return
    if not keys:
        stderr().print("no API keys" if show_all else "no active API keys (--all shows revoked ones)")
        return
    table = Table(box=None, padding=(0, 2), header_style="bold")
    for column in ("ID", "NAME", "ROLE", "STATE", "CREATED", "BY", "EXPIRES", "LAST USED"):
        table.add_column(column)
    for key in keys:
        table.add_row(
            key.id,
            key.name,
            key.role.label,
            _state(key),
            fmt_ago(key.create_time),
            key.created_by,
            _expires(key),
            fmt_ago(key.last_use_time) if key.last_use_time is not None else "never",
        )
    stdout().print(table)


@keys_app.command("revoke")
def keys_revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(metavar="ID", help="The key's id (from `brightrun keys list`).")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke an API key: calls with it fail from then on."""
    with globals_of(ctx).client() as client:
        key = client.api_keys.revoke(key_id)
    if as_json:
        print_json(key)
        return
    stdout().print(Text.assemble("revoked API key ", (key.id, "bold"), f" ({key.name}, {key.role.label})"))


def caller_details(caller: Caller, target: str) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", justify="right")
    grid.add_column()
    key = caller.api_key
    grid.add_row("server", target)
    grid.add_row("project", Text(caller.project, style="bold"))
    grid.add_row("role", caller.role.label)
    grid.add_row("key", f"{key.id} ({key.name})")
    grid.add_row("created", f"{fmt_time(key.create_time)} by {key.created_by or '-'}")
    grid.add_row("expires", _expires(key))
    return grid


@app.command("whoami")
def whoami_cmd(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Show who the API key is: its project, role and key."""
    with globals_of(ctx).client() as client:
        caller = client.whoami()
        target = client.target
    if as_json:
        print_json(caller)
    else:
        stdout().print(caller_details(caller, target))
