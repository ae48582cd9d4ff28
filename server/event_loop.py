"""The event loop the orchestrator's commands run on: uvloop by default (``ORCH_EVENT_LOOP``).

uvloop (libuv) runs grpc.aio's callbacks and the Redis client's sockets with less Python per
wake-up than asyncio's selector loop; the README's Benchmarks section has the A/B figures.
``ORCH_EVENT_LOOP=asyncio`` turns it off (for a platform without uvloop, or to compare).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

EVENT_LOOPS = ("uvloop", "asyncio")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory of new event loops of kind ``name`` (one of EVENT_LOOPS)."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if name == "asyncio":
        return asyncio.new_event_loop
    raise ValueError(f"event loop must be one of {', '.join(EVENT_LOOPS)}, got {name!r}")


def run(main: Coroutine[Any, Any, T], loop: str) -> T:
    """``asyncio.run(main)`` on a new event loop of kind ``loop``."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)
