"""Following a session in the background until it reaches a sequence the test names later."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from aorkestra import events


class Collector:
    """Reads ``stream`` into ``events`` in a task; ``on_event`` sees each event first."""

    def __init__(
        self,
        stream: AsyncIterator[events.Event],
        on_event: Callable[[events.Event], None] | None = None,
    ) -> None:
        self.events: list[events.Event] = []
        self._stream = stream
        self._on_event = on_event
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for event in self._stream:
            if self._on_event is not None:
                self._on_event(event)
            self.events.append(event)
            self._arrived.set()

    async def until(self, sequence: int, timeout_s: float) -> list[events.Event]:
        """Waits until an event at ``sequence`` or later was read (or the stream failed),
        then stops reading; returns what was read."""

        async def reached() -> None:
            while not (self.events and self.events[-1].sequence >= sequence):
                if self._task.done():
                    self._task.result()  # the stream's error, if any
                    raise AssertionError(f"the stream ended before sequence {sequence}")
                self._arrived.clear()
                waiter = asyncio.create_task(self._arrived.wait())
                await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()

        try:
            await asyncio.wait_for(reached(), timeout_s)
        finally:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return self.events
