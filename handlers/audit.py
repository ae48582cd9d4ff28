"""The audit log of the admin API: one line per admin RPC, whatever its outcome.

Each line is logged on the ``orchestrator.audit`` logger at INFO, its message
``admin audit: key_id=... tenant=... method=... target=[...] outcome=... time=...``, and with
ORCH_LOG_FORMAT=json the same as members: ``audit_key_id`` and ``audit_tenant`` (who: the
admin key and its tenant),
``audit_method`` (what: the RPC's name), ``audit_target`` (the ids it acted on or read, as
``name=value`` pairs, e.g. ``tenant_id=acme job_id=...``), ``audit_outcome`` (the gRPC status
name: OK, NOT_FOUND, INVALID_ARGUMENT, ...) and ``audit_time`` (when: UTC, ISO 8601, the
call's start); the request id is on every line as usual. Secrets never appear: a created
key's secret is in the response only. Calls the edge refused (no key, a client or service
key) never reach a handler: their refusal is counted in the RPC metrics and, for bad keys,
logged by the authentication failure log.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime

import grpc

from handlers.call_context import Ctx
from handlers.errors import Req, Resp, Self, UnaryMethod, unary_errors
from handlers.request_context import peek_caller

AUDIT_LOGGER = "orchestrator.audit"
log = logging.getLogger(AUDIT_LOGGER)

# Longest value of a target field written to the line (ids are far shorter; a bad one is cut).
_MAX_TARGET_VALUE = 128


_SAFE = re.compile(r"^[A-Za-z0-9._:/+=@-]*$")


def _targets(request: object, fields: tuple[str, ...]) -> str:
    """``name=value`` of each non-empty target field; a value that is not plain id characters
    (a bad input) is cut and JSON-quoted, so it can never forge a field or a line."""
    parts = []
    for name in fields:
        value = getattr(request, name, "")
        if isinstance(value, str) and value:
            shown = (
                value
                if _SAFE.match(value) and len(value) <= _MAX_TARGET_VALUE
                else (json.dumps(value[:_MAX_TARGET_VALUE]))
            )
            parts.append(f"{name}={shown}")
    return " ".join(parts)


def admin_rpc(
    *target_fields: str,
) -> Callable[[UnaryMethod[Self, Req, Resp]], UnaryMethod[Self, Req, Resp]]:
    """Decorate an admin RPC: domain errors end the call with their status
    (handlers.errors.unary_errors), and every call logs one audit line naming the request's
    ``target_fields`` and, written outside the error mapping, the status the call ended with."""

    def decorate(method: UnaryMethod[Self, Req, Resp]) -> UnaryMethod[Self, Req, Resp]:
        name = method.__name__
        mapped = unary_errors(method)

        @functools.wraps(method)
        async def wrapper(self: Self, request: Req, context: Ctx) -> Resp:
            started = datetime.now(UTC)
            outcome = "UNKNOWN"
            try:
                response = await mapped(self, request, context)
                outcome = "OK"
                return response
            except BaseException:
                code = context.code()
                outcome = code.name if isinstance(code, grpc.StatusCode) else "CANCELLED"
                raise
            finally:
                caller = peek_caller()
                fields = {
                    "audit_key_id": caller.key_id if caller is not None else "",
                    "audit_tenant": caller.tenant_id if caller is not None else "",
                    "audit_method": name,
                    "audit_target": _targets(request, target_fields),
                    "audit_outcome": outcome,
                    "audit_time": started.isoformat(timespec="milliseconds"),
                }
                log.info(
                    "admin audit: key_id=%s tenant=%s method=%s target=[%s] outcome=%s time=%s",
                    *fields.values(),
                    extra=fields,
                )

        return wrapper

    return decorate
