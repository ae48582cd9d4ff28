"""Waiting for the operator's stop request, shared by every long-running command."""

from __future__ import annotations

import asyncio
import signal


async def wait_for_stop_signal() -> None:
    """Return once SIGTERM or SIGINT arrives (the handlers stay installed, so a second signal
    during shutdown is absorbed too)."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await stop_requested.wait()
