"""Acknowledged notices: each notice of a stream answered as soon as it is applied, in stream
order (TaskUpdateService/ReportUpdates).

``answer_in_order`` reads notices ahead while earlier ones are being applied. The notices that
are waiting when the stream's applier is free are applied together (NoticeProcessor.process_each:
one store round trip for all of them, those of one job in their order), each with its own
verdict; the notices that arrive meanwhile wait for that batch and form the next one. A lone
notice is applied at once (nothing waits to fill a batch), and a busy stream's notices cost one
round trip per batch instead of one each. Answers leave in the order the notices arrived: an
answer is given once its notice and every earlier one were applied. At most ``max_pending``
notices are read ahead of the answers; past that, reading waits (the transport's flow control
then holds the sender back).

When the consumer stops (the caller went away), reading stops; notices already read are
applied to the end in the background (an applied notice is never half done), their answers
dropped: the sender resends what it was not answered, and a resent notice is a harmless
duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from domain.identity import Caller
from domain.jobs import NoticeOutcome
from domain.notices import NoticeInput, NoticeProcessor

log = logging.getLogger(__name__)

# Notices read ahead of the answers on one stream.
MAX_PENDING_NOTICES = 128
# Notices applied together at most (one store round trip).
MAX_BATCH_NOTICES = 64

# Appliers of streams that ended while their notices were applied: kept referenced until done.
_orphans: set[asyncio.Task[None]] = set()

_Waiting = tuple[NoticeInput, "asyncio.Future[NoticeOutcome]"]


def _retrieved(future: asyncio.Future[NoticeOutcome]) -> None:
    """Mark a failed notice's error as seen: the answer side raises it, or the stream ended
    and the applier logged it."""
    if not future.cancelled():
        future.exception()


async def answer_in_order(
    processor: NoticeProcessor,
    notices: AsyncIterator[NoticeInput],
    caller: Caller | None,
    *,
    max_pending: int = MAX_PENDING_NOTICES,
    max_batch: int = MAX_BATCH_NOTICES,
) -> AsyncIterator[tuple[NoticeInput, NoticeOutcome]]:
    """Each notice of ``notices`` with its outcome, in arrival order, as soon as it and every
    earlier one were applied (see the module docstring). An error applying a notice (the store
    unreachable) ends the iteration with that error, after the answers before it."""
    loop = asyncio.get_running_loop()
    room = asyncio.Semaphore(max_pending)
    answers: asyncio.Queue[_Waiting | None] = asyncio.Queue()
    waiting: list[_Waiting] = []  # read, not yet applied
    arrived = asyncio.Event()
    reading = True
    abandoned = False  # the consumer stopped: answers are dropped

    async def read() -> None:
        nonlocal reading
        try:
            async for raw in notices:
                await room.acquire()
                future: asyncio.Future[NoticeOutcome] = loop.create_future()
                future.add_done_callback(_retrieved)
                waiting.append((raw, future))
                arrived.set()
                answers.put_nowait((raw, future))
        finally:
            reading = False
            arrived.set()
            answers.put_nowait(None)

    async def apply() -> None:
        batch: list[_Waiting] = []
        try:
            while True:
                await arrived.wait()
                arrived.clear()
                while waiting:
                    batch = waiting[:max_batch]
                    del waiting[:max_batch]
                    await _apply(batch)
                if not reading:
                    return
        finally:  # cancelled (the process stops): nobody waits on for an answer
            for _, future in (*batch, *waiting):
                future.cancel()

    async def _apply(batch: list[_Waiting]) -> None:
        try:
            outcomes = await processor.process_each([raw for raw, _ in batch], caller)
        except Exception as exc:  # the store unreachable: every notice of the batch failed
            outcomes = [exc] * len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception) and abandoned:
                log.warning("a notice of an ended stream failed to apply: %s", outcome)
            if future.done():  # cancelled with its answer's wait: the caller went away
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    reader = asyncio.create_task(read())
    applier = asyncio.create_task(apply())
    try:
        while True:
            item = await answers.get()
            if item is None:
                await reader  # surfaces a broken request stream
                return
            raw, future = item
            outcome = await future
            room.release()
            yield raw, outcome
    finally:
        abandoned = True
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        if not applier.done():  # applies what was read, then ends
            _orphans.add(applier)
            applier.add_done_callback(_orphans.discard)
