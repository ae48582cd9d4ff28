"""Who is calling: the identity the edge layer establishes for each RPC.

The server's interceptor binds a Caller for the duration of a call; handlers read it with
current_caller() and pass the tenant explicitly to the domain services.
"""

from __future__ import annotations

import dataclasses
import enum
from contextvars import ContextVar, Token
from dataclasses import dataclass

from domain.errors import Unauthenticated
from domain.request_context import current_request_id, current_traceparent


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
    """Bind the caller for this RPC. The request context (domain.request_context) is the source
    of truth for the request id and traceparent: when one is bound, it replaces whatever the
    identity layer derived from the headers, so logs, replies and the Caller agree."""
    request_id = current_request_id()
    if request_id and (
        request_id != caller.request_id or current_traceparent() != caller.traceparent
    ):
        caller = dataclasses.replace(
            caller, request_id=request_id, traceparent=current_traceparent()
        )
    return _current.set(caller)


def unbind_caller(token: Token[Caller | None]) -> None:
    _current.reset(token)
