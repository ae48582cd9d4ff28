"""OutageWait: a stream waits out a backend outage, up to its bound, unless it is going away."""

from __future__ import annotations

import asyncio

import pytest

from domain.errors import Unavailable
from domain.outages import OutageWait


async def test_a_cancelled_stream_whose_cancellation_came_back_as_an_outage_ends_at_once() -> None:
    outage = OutageWait("stream of session s-1")
    reading = asyncio.Event()

    async def stream() -> None:
        try:
            reading.set()
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass  # as redis-py may: the cancellation comes back as a lost connection
        await outage.wait(Unavailable("redis unavailable: lost"), limit_s=60, retry_s=60)

    task = asyncio.create_task(stream())
    await reading.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


async def test_an_outage_is_waited_out_then_raised_once_it_lasted_longer_than_the_bound() -> None:
    outage = OutageWait("stream of session s-1")
    down = Unavailable("redis unavailable: connection refused")
    await outage.wait(down, limit_s=0.02, retry_s=0.03)  # the first: logged, waited
    with pytest.raises(Unavailable):
        await outage.wait(down, limit_s=0.02, retry_s=0.03)
    outage.over()
    await outage.wait(down, limit_s=0.02, retry_s=0.0)  # a new outage is waited out again
