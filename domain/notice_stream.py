"""Acknowledged notices: each notice of a stream answered as soon as it is applied, in stream
order (TaskUpdateService/ReportUpdates).

``answer_in_order`` reads notices ahead while earlier ones are being applied, so notices about
different jobs are applied concurrently and those about one job in their order (each waits for
the previous notice of its job). Answers leave in the order the notices arrived: an answer is
given once its notice and every earlier one were applied. At most ``max_pending`` notices are
read ahead of the answers; past that, reading waits (the transport's flow control then holds
the sender back).

When the consumer stops (the caller went away), reading stops; notices already being applied
are applied to the end in the background (an applied notice is never half done), their
answers dropped: the sender resends what it was not answered, and a resent notice is a
harmless duplicate.
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

# Notices whose stream ended while they were applied: kept referenced until done.
_orphans: set[asyncio.Task[NoticeOutcome]] = set()


def _forget(task: asyncio.Task[NoticeOutcome]) -> None:
    _orphans.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("a notice of an ended stream failed to apply: %s", task.exception())


async def answer_in_order(
    processor: NoticeProcessor,
    notices: AsyncIterator[NoticeInput],
    caller: Caller | None,
    *,
    max_pending: int = MAX_PENDING_NOTICES,
) -> AsyncIterator[tuple[NoticeInput, NoticeOutcome]]:
    """Each notice of ``notices`` with its outcome, in arrival order, as soon as it and every
    earlier one were applied (see the module docstring). An error applying a notice (the store
    unreachable) ends the iteration with that error, after the answers before it."""
    room = asyncio.Semaphore(max_pending)
    pending: asyncio.Queue[tuple[NoticeInput, asyncio.Task[NoticeOutcome]] | None]
    pending = asyncio.Queue()
    # The last notice started per job id: the next one of that job waits for it.
    last: dict[str, asyncio.Task[NoticeOutcome]] = {}
    applying: set[asyncio.Task[NoticeOutcome]] = set()

    async def apply(raw: NoticeInput, before: asyncio.Task[NoticeOutcome] | None) -> NoticeOutcome:
        if before is not None:
            await asyncio.wait((before,))
        try:
            return await processor.process(raw, caller)
        finally:
            if last.get(raw.job_id) is asyncio.current_task():
                del last[raw.job_id]

    async def read() -> None:
        try:
            async for raw in notices:
                await room.acquire()
                task = asyncio.create_task(apply(raw, last.get(raw.job_id)))
                last[raw.job_id] = task
                applying.add(task)
                task.add_done_callback(applying.discard)
                pending.put_nowait((raw, task))
        finally:
            pending.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while True:
            item = await pending.get()
            if item is None:
                await reader  # surfaces a broken request stream
                return
            raw, task = item
            outcome = await task
            room.release()
            yield raw, outcome
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        for task in applying:
            _orphans.add(task)
            task.add_done_callback(_forget)
