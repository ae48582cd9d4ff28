"""An open stream riding out a backend outage (Redis restarting) instead of ending: the
README (Operations) promises that open streams resume after a restart."""

from __future__ import annotations

import asyncio
import logging
import time

from domain.errors import Unavailable

log = logging.getLogger(__name__)


class OutageWait:
    """One stream's wait through backend outages. After a read raised Unavailable,
    ``await wait(exc, ...)`` logs the outage once, raises ``exc`` again once the outage lasted
    longer than ``limit_s``, else sleeps ``retry_s`` before the caller reads again; ``over()``
    after a read that succeeded."""

    __slots__ = ("_down_since", "_what")

    def __init__(self, what: str) -> None:
        self._what = what  # names the stream in the log line
        self._down_since: float | None = None

    async def wait(self, exc: Unavailable, *, limit_s: float, retry_s: float) -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # The stream was cancelled (its client went away) and the client library turned the
            # cancellation into a lost connection (redis-py may): nothing to wait out.
            raise asyncio.CancelledError from exc
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            log.info("%s waits for the backend: %s", self._what, exc)
        elif now - self._down_since > limit_s:
            raise exc
        await asyncio.sleep(retry_s)

    def over(self) -> None:
        self._down_since = None
