"""The downstream call context of the current RPC: who calls, its request id, trace context and
how much of its deadline is left, as the plain values the domain receives."""

from __future__ import annotations

from typing import Any

import grpc

from domain.dispatch import CallContext
from handlers.request_context import authenticated_context

Ctx = grpc.aio.ServicerContext[Any, Any]
"""The servicer context every handler method receives."""


def call_context(context: Ctx) -> CallContext:
    scope, caller = authenticated_context()
    return CallContext(
        tenant_id=caller.tenant_id,
        request_id=scope.request_id,
        timeout_s=context.time_remaining(),
        traceparent=scope.traceparent,
    )
