"""The periodic loop every background pass runs in (domain.periodic.PeriodicTask): passes at the
interval, one at a time; a failing pass neither ends the loop nor floods the log; stopping ends
a wait at once, lets a pass in progress finish, and cancels one that outlives the bound."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

from domain.errors import Unavailable
from domain.periodic import PeriodicTask

BOUND_S = 5.0  # no test waits this long unless the behaviour under test is broken


class Passes:
    """A pass that reports each run (its loop time) and does what ``script`` says, in turn:
    ``None`` succeeds, an exception is raised; once the script is used up, passes succeed."""

    def __init__(self, *script: Exception | None) -> None:
        self.script = list(script)
        self.started: asyncio.Queue[float] = asyncio.Queue()
        self.running = 0
        self.overlapped = False

    async def __call__(self) -> None:
        self.running += 1
        self.overlapped |= self.running > 1
        self.started.put_nowait(asyncio.get_running_loop().time())
        try:
            await asyncio.sleep(0)
            outcome = self.script.pop(0) if self.script else None
            if outcome is not None:
                raise outcome
        finally:
            self.running -= 1

    async def next(self) -> float:
        return await asyncio.wait_for(self.started.get(), BOUND_S)


async def test_passes_run_one_at_a_time_at_the_interval() -> None:
    passes = Passes()
    loop = PeriodicTask("test-loop", passes, 0.02)
    loop.start()
    try:
        times = [await passes.next() for _ in range(4)]
    finally:
        await loop.stop()
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap >= 0.015 for gap in gaps), gaps
    assert not passes.overlapped


async def test_the_first_pass_can_wait_for_the_interval() -> None:
    passes = Passes()
    loop = PeriodicTask("test-loop", passes, 0.05, wait_first=True)
    started = asyncio.get_running_loop().time()
    loop.start()
    try:
        first = await passes.next()
    finally:
        await loop.stop()
    assert first - started >= 0.04


async def test_failing_passes_keep_the_loop_and_log_once_per_failure_streak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    boom = RuntimeError("boom")
    passes = Passes(boom, boom, boom, None, boom, KeyError("k"), KeyError("k"))
    loop = PeriodicTask("test-loop", passes, 0.001)
    with caplog.at_level(logging.DEBUG, logger="domain.periodic"):
        loop.start()
        try:
            for _ in range(9):  # the seven scripted passes and two more: the loop goes on
                await passes.next()
        finally:
            await loop.stop()
    errors = [r.exc_info[1] for r in caplog.records if r.levelno >= logging.WARNING and r.exc_info]
    assert [type(e) for e in errors] == [RuntimeError, RuntimeError, KeyError]
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 3
    assert [r.message for r in caplog.records if r.levelno == logging.INFO] == [
        "test-loop passes again",
        "test-loop passes again",
    ]


async def test_an_unavailable_backend_is_logged_at_debug_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    passes = Passes(Unavailable("down"), Unavailable("down"))
    loop = PeriodicTask("test-loop", passes, 0.001)
    with caplog.at_level(logging.DEBUG, logger="domain.periodic"):
        assert not await loop.run_once()
        assert not await loop.run_once()
        assert await loop.run_once()
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.DEBUG]


async def test_stop_ends_a_wait_at_once() -> None:
    passes = Passes()
    loop = PeriodicTask("test-loop", passes, 3600)
    loop.start()
    await passes.next()
    await asyncio.wait_for(loop.stop(), 1.0)
    assert not loop.running
    assert passes.started.empty()


async def test_stop_lets_the_pass_in_progress_finish() -> None:
    release = asyncio.Event()
    outcome: list[str] = []
    stopping: list[asyncio.Task[None]] = []

    async def slow_pass() -> None:
        await release.wait()
        outcome.append("stop still waiting" if not stopping[0].done() else "stop returned early")

    loop = PeriodicTask("test-loop", slow_pass, 3600)
    loop.start()
    await asyncio.sleep(0)  # the pass starts and waits for release
    stopping.append(asyncio.create_task(loop.stop(timeout_s=BOUND_S)))
    await asyncio.sleep(0)
    release.set()
    await asyncio.wait_for(stopping[0], BOUND_S)
    assert outcome == ["stop still waiting"]


async def test_stop_cancels_a_pass_that_outlives_the_bound() -> None:
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck_pass() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    loop = PeriodicTask("test-loop", stuck_pass, 3600)
    loop.start()
    await asyncio.wait_for(entered.wait(), BOUND_S)
    await asyncio.wait_for(loop.stop(timeout_s=0.01), BOUND_S)
    assert cancelled.is_set()
    assert not loop.running
