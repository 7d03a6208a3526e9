"""Who is calling: the project a request acts in, the actor, and their role.

The API layer sets it once per RPC (from the caller's API key); services
read it to scope every query to the caller's project and to record who did
what. Background work (the scheduler) runs as the system caller.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"


DEFAULT_PROJECT = "default"


@dataclass(frozen=True, slots=True)
class Caller:
    project: str
    actor: str
    role: Role
    #: The scheduler and other server-internal work, not a user.
    system: bool = False
    #: The API key the call was made with.
    key_id: str = ""


SYSTEM = Caller(project=DEFAULT_PROJECT, actor="system", role=Role.ADMIN, system=True)
#: A caller without a key (health checks): no project, sees nothing.
ANONYMOUS = Caller(project="", actor="anonymous", role=Role.VIEWER)

_current: ContextVar[Caller] = ContextVar("brightrun_caller", default=SYSTEM)


def current() -> Caller:
    return _current.get()


def set_current(caller: Caller) -> None:
    _current.set(caller)
