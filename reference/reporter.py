"""Job notices to the orchestrator over ONE long-lived PublishUpdates stream per process.

``publish()`` only enqueues. A background task keeps a client-streaming call open, fed by an
async generator reading the queue. When the call fails (orchestrator not up yet, restarted) the
notice that was being written goes back to the front and the call is reopened with backoff.
The last notices written (up to ``resend_window``, within ``resend_horizon_s``) on a stream
that then broke are sent again too: gRPC has no per-message acknowledgement and the transport
buffers thousands of small messages (HTTP/2 windows grown by BDP probing plus socket buffers:
over 1,000 progress notices were seen lost in flight on a loaded machine), so they may have been
lost in flight; the orchestrator treats a repeated (job, sequence) as a harmless duplicate. The
window bounds what can be recovered; only per-notice acknowledgements would remove the bound.

The target may name several orchestrator replicas, comma-separated (``host1:50051,host2:50051``),
or a ``dns:///`` name resolving to all of them (its channel load-balances round_robin). The
stream goes to the first address; when a call fails, the next one is opened at once, on the
next address (or, for a dns name, on another ready replica), and the notices that may have been
lost are resent there in their order. Backoff starts only once every address failed in a row, so
one replica being down never holds back notices of jobs started through the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence

import grpc

from orchestrator.v1 import task_update_pb2, task_update_pb2_grpc

log = logging.getLogger(__name__)

Notice = task_update_pb2.PublishUpdatesRequest

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # Notice a dead orchestrator on an idle stream (its server accepts pings every 10 s+).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


# A dns:/// name (or an ipv4:/ipv6: list) stands for every replica; round_robin picks a ready
# one for each call.
ROUND_ROBIN_OPTION = (
    "grpc.service_config",
    json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}),
)


# Targets that name several addresses themselves (ipv4:a:1,b:2 lists them with commas).
_BALANCED_SCHEMES = ("dns:", "ipv4:", "ipv6:")


def split_targets(target: str) -> list[str]:
    """The gRPC targets of a comma-separated list (ValueError when one is empty); an ``ipv4:``
    or ``ipv6:`` address list stays one target."""
    if target.startswith(("ipv4:", "ipv6:")):
        return [target]
    targets = [part.strip() for part in target.split(",")]
    if not all(targets):
        raise ValueError(f"empty address in {target!r}")
    return targets


def channel_options(target: str) -> list[tuple[str, int | str]]:
    """Channel options for one target: round_robin for names that resolve to many addresses."""
    options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
    if target.startswith(_BALANCED_SCHEMES):
        options.append(ROUND_ROBIN_OPTION)
    return options


class _Stream:
    """State of one PublishUpdates call: closed once the call has ended."""

    def __init__(self) -> None:
        self.closed = False
        self.in_flight: Notice | None = None
        self.written = 0
        self.recent: deque[tuple[float, Notice]] = deque()  # (monotonic time written, notice)

    def ended(self) -> bool:
        return self.closed


class Reporter:
    """Publishes notices in order over one stream; ``start()``, ``publish()``, ``stop()``."""

    def __init__(
        self,
        target: str,
        metadata: Sequence[tuple[str, str]],
        *,
        reconnect_base_s: float = 0.1,
        reconnect_cap_s: float = 2.0,
        resend_window: int = 16_384,
        resend_horizon_s: float = 60.0,
    ) -> None:
        self.target = target
        self.targets = split_targets(target)
        self._metadata = tuple(metadata)
        self._reconnect_base_s = reconnect_base_s
        self._reconnect_cap_s = reconnect_cap_s
        self._resend_window = resend_window
        self._resend_horizon_s = resend_horizon_s
        self._queue: asyncio.Queue[Notice] = asyncio.Queue()
        self._retry: deque[Notice] = deque()  # notices to send again before the queue
        self._wakeup = asyncio.Event()
        self._unwritten = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._stopping = False
        self._stop_requested = asyncio.Event()  # wakes a reconnect backoff at once
        self._task: asyncio.Task[None] | None = None
        self._channels: list[grpc.aio.Channel] = []
        self._current = 0  # index of the target the next stream opens on
        self.connects = 0  # streams opened, for tests and logs
        self.last_response: task_update_pb2.PublishUpdatesResponse | None = None

    @property
    def unwritten(self) -> int:
        """Notices published but not yet written to a stream."""
        return self._unwritten

    def start(self) -> None:
        if self._task is None:
            self._channels = [
                grpc.aio.insecure_channel(target, options=channel_options(target))
                for target in self.targets
            ]
            self._task = asyncio.get_running_loop().create_task(self._run(), name="reporter")

    def publish(self, notice: Notice) -> None:
        """Queue a notice; never blocks."""
        self._queue.put_nowait(notice)
        self._unwritten += 1
        self._drained.clear()
        self._wakeup.set()

    async def wait_drained(self, timeout_s: float | None = None) -> None:
        """Wait until every published notice was written to a stream (TimeoutError if not)."""
        async with asyncio.timeout(timeout_s):
            await self._drained.wait()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Send what is queued, close the stream and await the orchestrator's counts; give up
        (dropping unsent notices, with a warning) after ``timeout_s``."""
        if self._task is None:
            return
        self._stopping = True
        self._stop_requested.set()
        self._wakeup.set()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._task)
        except TimeoutError:
            log.warning("reporter stopped with %d notice(s) unsent", self._unwritten)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for channel in self._channels:
            await channel.close(grace=None)
        self._channels = []
        self._task = None

    def _take(self) -> Notice | None:
        if self._retry:
            return self._retry.popleft()
        with contextlib.suppress(asyncio.QueueEmpty):
            return self._queue.get_nowait()
        return None

    async def _requests(self, stream: _Stream) -> AsyncIterator[Notice]:
        """The request side of one call. Ends on stop once everything is written (half-close,
        so the orchestrator answers), or silently once the call is over."""
        while not stream.closed:
            notice = self._take()
            if notice is None:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            stream.in_flight = notice
            yield notice
            # gRPC asks for the next message only after this one was written.
            if stream.ended():
                return  # the call ended meanwhile; _requeue already took the notice back
            stream.in_flight = None
            stream.written += 1
            stream.recent.append((time.monotonic(), notice))
            if len(stream.recent) > self._resend_window:
                stream.recent.popleft()
            self._unwritten -= 1
            if self._unwritten == 0:
                self._drained.set()

    def _requeue(self, stream: _Stream, *, lost: int) -> None:
        """After a call ended: put the notice being written and the last ``lost`` written ones
        back in front of the queue, in order."""
        stream.closed = True
        self._wakeup.set()  # let the ended call's generator see it is closed
        again: list[Notice] = []
        if lost > 0:
            # Older notices were surely delivered (a dead connection is noticed well before).
            since = time.monotonic() - self._resend_horizon_s
            resend = [notice for at, notice in list(stream.recent)[-lost:] if at >= since]
            again.extend(resend)
            self._unwritten += len(resend)
        if stream.in_flight is not None:
            again.append(stream.in_flight)
            stream.in_flight = None
        if again:
            self._drained.clear()
        self._retry.extendleft(reversed(again))

    async def _run(self) -> None:
        stubs = [task_update_pb2_grpc.TaskUpdateServiceStub(c) for c in self._channels]
        failures = 0
        # Calls that failed since the last healthy stream: back off only once every target
        # had its chance (a dns name twice: round_robin moves on to another ready replica).
        failed_in_a_row = 0
        chances = sum(2 if t.startswith(_BALANCED_SCHEMES) else 1 for t in self.targets)
        while True:
            if self._stopping and self._unwritten == 0:
                return
            target = self.targets[self._current]
            stream = _Stream()
            self.connects += 1
            call = stubs[self._current].PublishUpdates(
                self._requests(stream), metadata=self._metadata
            )
            try:
                response = await call
            except grpc.aio.AioRpcError as exc:
                self._requeue(stream, lost=self._resend_window)
                failed_in_a_row = 1 if stream.written else failed_in_a_row + 1
                # Fail over at once (the next target, or another replica behind a dns name);
                # the resent notices go first, in their order.
                self._current = (self._current + 1) % len(self.targets)
                log.warning(
                    "PublishUpdates to %s failed (%s: %s); %d notice(s) waiting, reconnecting%s",
                    target,
                    exc.code().name,
                    exc.details(),
                    self._unwritten,
                    f" to {self.targets[self._current]}" if len(self.targets) > 1 else "",
                )
            except asyncio.CancelledError:
                call.cancel()
                raise
            else:
                failed_in_a_row = 0
                # Notices the orchestrator did not count were cut off when it ended the call.
                self._requeue(stream, lost=stream.written - response.received)
                self.last_response = response
                log.info(
                    "PublishUpdates closed: wrote %d; received %d, accepted %d, duplicate %d, "
                    "rejected unknown_job=%d wrong_tenant=%d wrong_service=%d job_finished=%d "
                    "malformed=%d",
                    stream.written,
                    response.received,
                    response.accepted,
                    response.duplicate,
                    response.rejected_unknown_job,
                    response.rejected_wrong_tenant,
                    response.rejected_wrong_service,
                    response.rejected_job_finished,
                    response.rejected_malformed,
                )
                if self._stopping and self._unwritten == 0:
                    return
            if 0 < failed_in_a_row < chances:
                continue  # another target has not failed yet: try it without waiting
            if self._stopping and failed_in_a_row:
                # Stopping and no target takes the stream now: do not wait for one to come back.
                log.warning(
                    "stopping with %d notice(s) unsent: no orchestrator took the stream",
                    self._unwritten,
                )
                return
            # A stream that carried notices was healthy: reconnect soon. Otherwise back off more.
            failures = 1 if stream.written else min(failures + 1, 30)
            await self._backoff(failures)

    async def _backoff(self, failures: int) -> None:
        ceiling = min(self._reconnect_cap_s, self._reconnect_base_s * 2.0 ** (failures - 1))
        pause = ceiling / 2 + random.uniform(0, ceiling / 2)
        # A stop ends the pause: the loop then tries once more before it gives up.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_requested.wait(), pause)
