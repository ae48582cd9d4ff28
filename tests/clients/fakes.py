"""Scripted behaviour of fake downstream servicers (real grpc.aio servers on loopback)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc


@dataclass
class Script:
    """What a fake service does: fail the first ``unavailable`` calls, then ``abort`` (if set,
    with ``abort_details``) or answer after ``delay_s``. Every call is recorded."""

    unavailable: int = 0
    abort: grpc.StatusCode | None = None
    abort_details: str = "prompt is empty"
    delay_s: float = 0.0
    calls: list[tuple[str, object, dict[str, str]]] = field(default_factory=list)

    async def play(self, method: str, request: object, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        metadata = {key: str(value) for key, value in context.invocation_metadata() or ()}
        self.calls.append((method, request, metadata))
        if self.unavailable > 0:
            self.unavailable -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if self.abort is not None:
            await context.abort(self.abort, self.abort_details)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
