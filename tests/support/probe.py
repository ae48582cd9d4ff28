"""A tiny test service, ``orchestrator.v1.TestProbe`` (so it needs the client role), served
behind the real interceptor chain (through OrchestratorServer's ``extra_handlers``): a server
stream that stays open until released, and a unary echo. Both record what the edge layer bound
for them, and the CallContext a handler hands the domain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from domain.dispatch import CallContext
from domain.identity import Caller
from handlers.call_context import call_context
from handlers.request_context import current_request_id, current_traceparent, peek_caller

WATCH = "/orchestrator.v1.TestProbe/Watch"
ECHO = "/orchestrator.v1.TestProbe/Echo"
# grpc.aio.EOF, which the type stubs do not declare.
EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009
log = logging.getLogger("tests.probe")


@dataclass
class Seen:
    """What a handler saw of the edge layer's context."""

    request_id: str
    traceparent: str | None
    caller: Caller | None
    call: CallContext | None  # None when the call carries no caller


@dataclass
class Probe:
    """Streams wait for ``release``; every handler appends what it saw to ``seen``."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    seen: list[Seen] = field(default_factory=list)

    def _record(self, context: Any) -> None:
        caller = peek_caller()
        call = call_context(context) if caller is not None else None
        self.seen.append(Seen(current_request_id(), current_traceparent(), caller, call))
        log.info("probe called")

    async def watch(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        self._record(context)
        yield b"open"
        await self.release.wait()

    async def echo(self, request: bytes, context: Any) -> bytes:
        self._record(context)
        return request

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            "orchestrator.v1.TestProbe",
            {
                "Watch": grpc.unary_stream_rpc_method_handler(self.watch),
                "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            },
        )


def watch_method(channel: grpc.aio.Channel) -> Any:
    """The Watch stream as a raw-bytes multicallable."""
    return channel.unary_stream(WATCH, request_serializer=None, response_deserializer=None)


def echo_method(channel: grpc.aio.Channel) -> Any:
    """The Echo call as a raw-bytes multicallable."""
    return channel.unary_unary(ECHO, request_serializer=None, response_deserializer=None)
