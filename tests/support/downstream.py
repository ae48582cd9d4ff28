"""A recording stand-in for the downstream services, for tests of the job flow that drive the
notices themselves (the real services are exercised in tests/e2e with reference/)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from domain.dispatch import CallContext, DownstreamError, WorkRequest
from domain.models import Service


@dataclass
class RecordingDispatcher:
    """Accepts every submit (or fails them all with ``fail_with``) and remembers calls."""

    fail_with: DownstreamError | None = None
    submitted: list[tuple[WorkRequest, CallContext]] = field(default_factory=list)
    cancelled: list[tuple[Service, str]] = field(default_factory=list)
    _arrivals: asyncio.Queue[WorkRequest] = field(default_factory=asyncio.Queue)

    async def submit(self, work: WorkRequest, ctx: CallContext) -> str:
        if self.fail_with is not None:
            raise self.fail_with
        self.submitted.append((work, ctx))
        self._arrivals.put_nowait(work)
        return work.job_id

    async def cancel(self, service: Service, job_id: str, ctx: CallContext) -> bool:
        self.cancelled.append((service, job_id))
        return True

    async def aclose(self) -> None:
        return None

    async def wait_submit(self) -> WorkRequest:
        """The next work handed to the 'service', however long it takes."""
        return await self._arrivals.get()

    async def next_submit(self, timeout_s: float = 5.0) -> WorkRequest:
        """The next work handed to the 'service' (waits for it)."""
        return await asyncio.wait_for(self._arrivals.get(), timeout_s)
