"""Coalesced: calls made in the same loop iteration go out as one; errors and callers that go
away are handled per call."""

from __future__ import annotations

import asyncio

import pytest

from domain.coalesced import Coalesced
from domain.errors import Unavailable


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.fail = fail
        self.release = asyncio.Event()
        self.release.set()
        self.sent = asyncio.Event()

    async def send(self, requests: list[int]) -> list[int]:
        self.calls.append(list(requests))
        self.sent.set()
        await self.release.wait()
        if self.fail:
            raise Unavailable("redis is away")
        return [n * 10 for n in requests]


async def test_calls_of_one_iteration_are_sent_together_and_answered_in_order() -> None:
    recorder = Recorder()
    coalesced = Coalesced(recorder.send)
    assert await asyncio.gather(*(coalesced(n) for n in range(5))) == [0, 10, 20, 30, 40]
    assert recorder.calls == [[0, 1, 2, 3, 4]]
    assert await coalesced(7) == 70
    assert recorder.calls[-1] == [7]


async def test_an_error_fails_every_call_it_carried() -> None:
    coalesced = Coalesced(Recorder(fail=True).send)
    replies = await asyncio.gather(coalesced(1), coalesced(2), return_exceptions=True)
    assert all(isinstance(reply, Unavailable) for reply in replies)


async def test_a_caller_going_away_leaves_the_others_answered() -> None:
    recorder = Recorder()
    recorder.release.clear()
    coalesced = Coalesced(recorder.send)
    gone = asyncio.create_task(coalesced(1))
    stays = asyncio.create_task(coalesced(2))
    await recorder.sent.wait()
    gone.cancel()
    recorder.release.set()
    assert await stays == 20
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert recorder.calls == [[1, 2]]  # sent all the same, like a call already on the wire


async def test_a_short_answer_fails_every_call_instead_of_leaving_one_waiting() -> None:
    async def short(requests: list[int]) -> list[int]:
        return requests[:1]

    coalesced = Coalesced(short)
    replies = await asyncio.gather(coalesced(1), coalesced(2), return_exceptions=True)
    assert all(isinstance(reply, RuntimeError) for reply in replies)
