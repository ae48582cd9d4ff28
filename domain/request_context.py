"""Per-call request context: the request id and the incoming W3C trace context.

The edge (server.edge) binds both for every RPC before any other
interceptor of ours runs, so this module is the single source of truth for them: log lines,
the Caller built by the identity layer and downstream clients all read them from here. Each
RPC runs in its own asyncio task (its own context copy), so a binding never leaks into another
call.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from random import getrandbits

REQUEST_ID_HEADER = "x-request-id"
TRACEPARENT_HEADER = "traceparent"
MAX_REQUEST_ID_LENGTH = 128

# Printable ASCII without spaces or quotes: safe in headers, log lines and JSON.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
# W3C Trace Context: version-traceid-parentid-flags, lowercase hex. Version ff is invalid; a
# future version may append fields after the flags.
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")

# (request id, traceparent, method) of the current RPC, in one variable: one set per call.
_current: ContextVar[tuple[str, str | None, str]] = ContextVar(
    "orchestrator_request_context", default=("", None, "")
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
    as the W3C spec asks, rather than failing the call)."""
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
    return value


def bind_request_context(request_id: str, traceparent: str | None, method: str = "") -> None:
    """Bind the current RPC's context. Called once per call, in the call's own task, so no
    reset is needed (and resetting from an async generator could run in another context)."""
    _current.set((request_id, traceparent, method))


def current_request_id() -> str:
    """The current RPC's request id; empty outside of an RPC."""
    return _current.get()[0]


def current_traceparent() -> str | None:
    """The incoming W3C traceparent of the current RPC, to send on downstream calls."""
    return _current.get()[1]


def current_method() -> str:
    """The full gRPC method name of the current RPC (``/pkg.Service/Method``); empty outside."""
    return _current.get()[2]
