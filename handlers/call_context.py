"""The downstream call context of the current RPC: who calls, its request id, trace context and
how much of its deadline is left."""

from __future__ import annotations

from typing import Any

import grpc

from domain.dispatch import CallContext
from domain.identity import current_caller


def call_context(context: grpc.aio.ServicerContext[Any, Any]) -> CallContext:
    caller = current_caller()
    return CallContext(
        tenant_id=caller.tenant_id,
        request_id=caller.request_id,
        timeout_s=context.time_remaining(),
        traceparent=caller.traceparent,
    )
