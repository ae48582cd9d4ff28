"""Calls to one store step made in the same event loop iteration, sent as one call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Request = TypeVar("Request")
Reply = TypeVar("Reply")


class Coalesced(Generic[Request, Reply]):
    """Calls to one store step made in the same event loop iteration (items leased together,
    finals read from the same pub/sub chunk), sent as one call: ``send`` takes the requests and
    answers them in order. A caller that goes away does not take its request back (it is sent
    with the others, like a call already on the wire); an error fails every request of the
    call."""

    def __init__(self, send: Callable[[list[Request]], Awaitable[Sequence[Reply]]]) -> None:
        self._send = send
        self._pending: list[tuple[Request, asyncio.Future[Reply]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def __call__(self, request: Request) -> Reply:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Reply] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((request, reply))
        return await reply

    def _flush(self) -> None:
        calls, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._call(calls))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _call(self, calls: list[tuple[Request, asyncio.Future[Reply]]]) -> None:
        try:
            replies = await self._send([request for request, _ in calls])
            if len(replies) != len(calls):  # never left waiting on a short answer
                raise RuntimeError(f"{len(replies)} answers to {len(calls)} requests")
        except Exception as exc:
            for _, reply in calls:
                if not reply.done():
                    reply.set_exception(exc)
            return
        except asyncio.CancelledError:
            for _, reply in calls:
                reply.cancel()
            raise
        for (_, reply), value in zip(calls, replies, strict=True):
            if not reply.done():
                reply.set_result(value)
