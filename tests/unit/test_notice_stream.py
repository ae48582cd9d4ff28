"""domain.notice_stream.answer_in_order: answers in arrival order as soon as each notice and the
ones before it are applied; different jobs concurrently, one job in order; bounded read-ahead."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from domain.identity import Caller
from domain.jobs import NoticeOutcome, Verdict
from domain.notice_stream import answer_in_order
from domain.notices import NoticeInput, NoticeProcessor


def raw(job_id: str, sequence: int) -> NoticeInput:
    return NoticeInput(None, None, job_id, "t", sequence)


class GatedProcessor:
    """Applies a notice once its gate (by (job, sequence)) opens; records start and end order."""

    def __init__(self) -> None:
        self.gates: dict[tuple[str, int | None], asyncio.Event] = {}
        self.started: list[tuple[str, int | None]] = []
        self.applied: list[tuple[str, int | None]] = []
        self._changed = asyncio.Condition()

    async def _note(self, into: list[tuple[str, int | None]], key: tuple[str, int | None]) -> None:
        async with self._changed:
            into.append(key)
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(5), self._changed:
            await self._changed.wait_for(predicate)

    def gate(self, job_id: str, sequence: int) -> asyncio.Event:
        return self.gates.setdefault((job_id, sequence), asyncio.Event())

    async def process(self, notice: NoticeInput, caller: Caller | None) -> NoticeOutcome:
        key = (notice.job_id, notice.sequence)
        await self._note(self.started, key)
        await self.gate(notice.job_id, notice.sequence or 0).wait()
        await self._note(self.applied, key)
        return NoticeOutcome(Verdict.ACCEPTED, detail=f"{notice.job_id}/{notice.sequence}")


async def feed(queue: asyncio.Queue[NoticeInput | None]) -> AsyncIterator[NoticeInput]:
    while (item := await queue.get()) is not None:
        yield item


def answers(processor: GatedProcessor, queue: asyncio.Queue[NoticeInput | None], **kw: Any) -> Any:
    return answer_in_order(cast(NoticeProcessor, processor), feed(queue), None, **kw)


async def test_a_notice_is_answered_while_the_stream_is_still_open() -> None:
    processor = GatedProcessor()
    queue: asyncio.Queue[NoticeInput | None] = asyncio.Queue()
    stream = answers(processor, queue)
    processor.gate("a", 1).set()
    await queue.put(raw("a", 1))
    async with asyncio.timeout(5):
        notice, outcome = await anext(stream)
    assert (notice.job_id, outcome.detail) == ("a", "a/1")
    await queue.put(None)
    assert [item async for item in stream] == []


async def test_answers_keep_the_arrival_order_when_a_later_job_is_applied_first() -> None:
    processor = GatedProcessor()
    queue: asyncio.Queue[NoticeInput | None] = asyncio.Queue()
    for notice in (raw("a", 1), raw("b", 1), None):
        await queue.put(notice)
    processor.gate("b", 1).set()  # b is applied while a still waits
    collected = asyncio.create_task(_collect(answers(processor, queue)))
    await processor.wait_for(lambda: processor.applied == [("b", 1)])
    assert not collected.done()  # b's answer waits for a's
    processor.gate("a", 1).set()
    async with asyncio.timeout(5):
        assert await collected == ["a/1", "b/1"]


async def test_notices_of_one_job_are_applied_one_after_the_other() -> None:
    processor = GatedProcessor()
    queue: asyncio.Queue[NoticeInput | None] = asyncio.Queue()
    for notice in (raw("a", 1), raw("a", 2), raw("b", 1), None):
        await queue.put(notice)
    processor.gate("b", 1).set()
    processor.gate("a", 2).set()
    collected = asyncio.create_task(_collect(answers(processor, queue)))
    await processor.wait_for(lambda: ("b", 1) in processor.applied)
    assert ("a", 2) not in processor.started  # waits for a/1 although its gate is open
    processor.gate("a", 1).set()
    async with asyncio.timeout(5):
        assert await collected == ["a/1", "a/2", "b/1"]
    assert processor.applied.index(("a", 1)) < processor.applied.index(("a", 2))


async def test_reading_ahead_stops_at_the_bound() -> None:
    processor = GatedProcessor()
    queue: asyncio.Queue[NoticeInput | None] = asyncio.Queue()
    for n in range(10):
        await queue.put(raw(f"j{n}", 1))
    await queue.put(None)
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
