"""domain.notice_stream.answer_in_order: answers in arrival order as soon as each notice and the
ones before it are applied; the notices waiting when the stream's applier is free are applied
together (one batch), those arriving meanwhile in the next; one job in order; a lone notice at
once; bounded read-ahead."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, cast

import pytest

from domain import notice_stream
from domain.identity import Caller
from domain.jobs import NoticeOutcome, Verdict
from domain.notice_stream import answer_in_order
from domain.notices import NoticeInput, NoticeProcessor

Key = tuple[str, int | None]


def raw(job_id: str, sequence: int) -> NoticeInput:
    return NoticeInput(None, None, job_id, "t", sequence)


class Broken(Exception):
    """A notice the store failed to apply."""


class GatedProcessor:
    """Applies a batch once the gate of each of its notices (by (job, sequence)) opened;
    records the batches, and start and end order. A notice whose job id is "bad" fails."""

    def __init__(self) -> None:
        self.gates: dict[Key, asyncio.Event] = {}
        self.batches: list[list[Key]] = []
        self.started: list[Key] = []
        self.applied: list[Key] = []
        self._changed = asyncio.Condition()

    async def _note(self, into: list[Key], keys: list[Key]) -> None:
        async with self._changed:
            into.extend(keys)
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(5), self._changed:
            await self._changed.wait_for(predicate)

    def gate(self, job_id: str, sequence: int) -> asyncio.Event:
        return self.gates.setdefault((job_id, sequence), asyncio.Event())

    async def process_each(
        self, notices: Sequence[NoticeInput], caller: Caller | None
    ) -> list[NoticeOutcome | Exception]:
        keys = [(n.job_id, n.sequence) for n in notices]
        self.batches.append(keys)
        await self._note(self.started, keys)
        for notice in notices:
            await self.gate(notice.job_id, notice.sequence or 0).wait()
        await self._note(self.applied, keys)
        return [
            Broken(n.job_id)
            if n.job_id == "bad"
            else NoticeOutcome(Verdict.ACCEPTED, detail=f"{n.job_id}/{n.sequence}")
            for n in notices
        ]


async def feed(queue: asyncio.Queue[NoticeInput | None]) -> AsyncIterator[NoticeInput]:
    while (item := await queue.get()) is not None:
        yield item


def answers(processor: GatedProcessor, queue: asyncio.Queue[NoticeInput | None], **kw: Any) -> Any:
    return answer_in_order(cast(NoticeProcessor, processor), feed(queue), None, **kw)


def queued(*notices: NoticeInput | None) -> asyncio.Queue[NoticeInput | None]:
    queue: asyncio.Queue[NoticeInput | None] = asyncio.Queue()
    for notice in notices:
        queue.put_nowait(notice)
    return queue


async def test_a_lone_notice_is_answered_while_the_stream_is_still_open() -> None:
    processor = GatedProcessor()
    queue = queued()
    stream = answers(processor, queue)
    processor.gate("a", 1).set()
    await queue.put(raw("a", 1))
    async with asyncio.timeout(5):
        notice, outcome = await anext(stream)
    assert (notice.job_id, outcome.detail) == ("a", "a/1")
    assert processor.batches == [[("a", 1)]]
    await queue.put(None)
    assert [item async for item in stream] == []


async def test_notices_waiting_together_are_applied_in_one_batch_in_their_order() -> None:
    processor = GatedProcessor()
    for key in (("a", 1), ("b", 1), ("a", 2)):
        processor.gate(*key).set()
    queue = queued(raw("a", 1), raw("b", 1), raw("a", 2), None)
    async with asyncio.timeout(5):
        assert await _collect(answers(processor, queue)) == ["a/1", "b/1", "a/2"]
    assert processor.batches == [[("a", 1), ("b", 1), ("a", 2)]]


async def test_notices_arriving_while_a_batch_is_applied_wait_and_form_the_next() -> None:
    processor = GatedProcessor()
    queue = queued(raw("a", 1))
    collected = asyncio.create_task(_collect(answers(processor, queue)))
    await processor.wait_for(lambda: processor.started == [("a", 1)])
    for notice in (raw("a", 2), raw("b", 1), None):
        await queue.put(notice)
    processor.gate("a", 2).set()
    processor.gate("b", 1).set()
    for _ in range(20):  # every chance to start them early (it must not)
        await asyncio.sleep(0)
    assert processor.started == [("a", 1)]  # a/2 waits for a/1 although its gate is open
    processor.gate("a", 1).set()
    async with asyncio.timeout(5):
        assert await collected == ["a/1", "a/2", "b/1"]
    assert processor.batches == [[("a", 1)], [("a", 2), ("b", 1)]]


async def test_a_batch_is_at_most_max_batch_notices() -> None:
    processor = GatedProcessor()
    for n in range(5):
        processor.gate(f"j{n}", 1).set()
    queue = queued(*(raw(f"j{n}", 1) for n in range(5)), None)
    async with asyncio.timeout(5):
        assert len(await _collect(answers(processor, queue, max_batch=2))) == 5
    assert [len(batch) for batch in processor.batches] == [2, 2, 1]


async def test_a_failed_notice_ends_the_answers_after_those_before_it() -> None:
    processor = GatedProcessor()
    for key in (("a", 1), ("bad", 1), ("b", 1)):
        processor.gate(*key).set()
    queue = queued(raw("a", 1), raw("bad", 1), raw("b", 1), None)
    got: list[str] = []

    async def consume() -> None:
        async for _, outcome in answers(processor, queue):
            got.append(outcome.detail)

    with pytest.raises(Broken):
        await asyncio.wait_for(consume(), 5)
    assert got == ["a/1"]
    assert ("b", 1) in processor.applied  # applied with the others all the same


async def test_notices_read_are_applied_after_the_consumer_left() -> None:
    processor = GatedProcessor()
    queue = queued(raw("a", 1), raw("b", 1))
    stream = answers(processor, queue)
    first = asyncio.create_task(anext(stream))
    await processor.wait_for(lambda: len(processor.started) == 2)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await stream.aclose()
    appliers = list(notice_stream._orphans)
    processor.gate("a", 1).set()
    processor.gate("b", 1).set()
    await processor.wait_for(lambda: len(processor.applied) == 2)
    async with asyncio.timeout(5):
        ended = await asyncio.gather(*appliers, return_exceptions=True)
    # The first notice's answer was cancelled with the consumer's wait: applying it ends quietly.
    assert appliers and ended == [None] * len(appliers)


async def test_reading_ahead_stops_at_the_bound() -> None:
    processor = GatedProcessor()
    queue = queued(*(raw(f"j{n}", 1) for n in range(10)), None)
    collected = asyncio.create_task(_collect(answers(processor, queue, max_pending=3)))
    await processor.wait_for(lambda: len(processor.started) == 3)
    for _ in range(20):  # give the reader every chance to read on (it must not)
        await asyncio.sleep(0)
    assert len(processor.started) == 3  # the fourth is not read before an answer leaves
    for n in range(10):
        processor.gate(f"j{n}", 1).set()
    async with asyncio.timeout(5):
        assert await collected == [f"j{n}/1" for n in range(10)]


async def _collect(stream: AsyncIterator[tuple[NoticeInput, NoticeOutcome]]) -> list[str]:
    return [outcome.detail async for _, outcome in stream]
