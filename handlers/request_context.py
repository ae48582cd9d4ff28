"""The per-call request context: the transport metadata of the current RPC (its request id, its
W3C trace context and its method) and, once the edge has authenticated it, its Caller.

The edge (server.edge) reads ``x-request-id`` and ``traceparent`` from the call's metadata,
validates them here and binds one RequestContext per call, before anything else of ours runs;
it sets the context's caller after authentication (an attribute, not a second binding). Log
lines (server.logging_setup), error trailers (handlers.errors) and handlers read it from here;
handlers pass the domain plain values (the tenant, and domain.dispatch.CallContext built by
handlers.call_context), so domain code never reads a context variable. Each RPC runs in its own
asyncio task (its own context copy), so a binding never leaks into another call.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from random import getrandbits

from domain.errors import Unauthenticated
from domain.identity import Caller

REQUEST_ID_HEADER = "x-request-id"
TRACEPARENT_HEADER = "traceparent"
MAX_REQUEST_ID_LENGTH = 128

# Printable ASCII without spaces or quotes: safe in headers, log lines and JSON.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
# W3C Trace Context: version-traceid-parentid-flags, lowercase hex. Version ff is invalid; a
# future version may append fields after the flags.
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


class RequestContext:
    """One RPC's context: request id, traceparent (None when absent or invalid), full method
    name (``/pkg.Service/Method``) and the authenticated caller (None until authenticated, and
    for public methods)."""

    __slots__ = ("caller", "method", "request_id", "traceparent")

    def __init__(
        self, request_id: str, traceparent: str | None, method: str, caller: Caller | None
    ) -> None:
        self.request_id = request_id
        self.traceparent = traceparent
        self.method = method
        self.caller = caller


_current: ContextVar[RequestContext | None] = ContextVar(
    "orchestrator_request_context", default=None
)


def new_request_id() -> str:
    """32 random hex digits, as ``uuid4().hex`` gave. A request id only correlates log lines
    and replies (callers may choose their own), so it needs to be unique, not unguessable: the
    process's Mersenne Twister (reseeded in forked children) does, without a system call."""
    return getrandbits(128).to_bytes(16, "big").hex()


def valid_request_id(value: str) -> bool:
    """Whether a caller-supplied request id can be used as is (1-128 safe characters)."""
    return bool(value) and _REQUEST_ID.match(value) is not None


def parse_traceparent(value: str | None) -> str | None:
    """The traceparent header when it is well formed, else None (an invalid one is dropped,
    as the W3C spec asks, rather than failing the call). A later version's header is read as
    version 00 (as the spec asks) and returned as one: always 55 characters, so it can be
    stored with a job as it is."""
    if not value:
        return None
    value = value.strip()
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, parent_id, _flags, rest = match.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    if version == "00" and rest:
        return None
    return value if version == "00" else f"00-{trace_id}-{parent_id}-{_flags}"


def bind_request_context(
    request_id: str, traceparent: str | None, method: str = "", caller: Caller | None = None
) -> RequestContext:
    """Bind the current RPC's context and return it (the edge sets its caller later). Called
    once per call, in the call's own task, so no reset is needed (and resetting from an async
    generator could run in another context)."""
    context = RequestContext(request_id, traceparent, method, caller)
    _current.set(context)
    return context


def request_context() -> RequestContext | None:
    """The current RPC's context, or None outside of an RPC."""
    return _current.get()


def current_request_id() -> str:
    """The current RPC's request id; empty outside of an RPC."""
    context = _current.get()
    return context.request_id if context is not None else ""


def current_traceparent() -> str | None:
    """The incoming W3C traceparent of the current RPC, to send on downstream calls."""
    context = _current.get()
    return context.traceparent if context is not None else None


def peek_caller() -> Caller | None:
    """The caller of the current RPC, or None outside of one or before authentication."""
    context = _current.get()
    return context.caller if context is not None else None


def authenticated_context() -> tuple[RequestContext, Caller]:
    """The current RPC's context and its caller; Unauthenticated when no caller was
    established."""
    context = _current.get()
    caller = context.caller if context is not None else None
    if context is None or caller is None:
        raise Unauthenticated("the call carries no caller identity")
    return context, caller


def current_caller() -> Caller:
    """The caller of the current RPC; Unauthenticated when none was established."""
    return authenticated_context()[1]
