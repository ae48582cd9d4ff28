"""Who is calling: the identity the edge layer establishes for each RPC.

The server's interceptor binds a Caller for the duration of a call; handlers read it with
current_caller() and pass the tenant explicitly to the domain services.
"""

from __future__ import annotations

import enum
from contextvars import ContextVar, Token
from dataclasses import dataclass

from domain.errors import Unauthenticated


class Role(enum.StrEnum):
    """What a caller may do: clients use Chat/Session/Batch, services publish task updates,
    admins use the internal APIs."""

    CLIENT = "client"
    SERVICE = "service"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller of the current RPC."""

    tenant_id: str
    role: Role
    request_id: str = ""
    # The API key the caller authenticated with (its public id, never the secret); empty until
    # key authentication is configured.
    key_id: str = ""
    # W3C trace context of the incoming call, passed on to downstream calls.
    traceparent: str | None = None


_current: ContextVar[Caller | None] = ContextVar("orchestrator_caller", default=None)


def current_caller() -> Caller:
    """The caller bound to this RPC; Unauthenticated when none was established."""
    caller = _current.get()
    if caller is None:
        raise Unauthenticated("the call carries no caller identity")
    return caller


def peek_caller() -> Caller | None:
    """The caller bound to this RPC, or None outside of one (for logging)."""
    return _current.get()


def bind_caller(caller: Caller) -> Token[Caller | None]:
    """Bind the caller for this RPC (the edge builds it with the call's request context)."""
    return _current.set(caller)


def unbind_caller(token: Token[Caller | None]) -> None:
    _current.reset(token)
