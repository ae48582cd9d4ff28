"""Job notices to the orchestrator over ONE long-lived ReportUpdates stream per process.

``publish()`` only enqueues. A background task keeps a bidirectional ReportUpdates call open,
fed by an async generator reading the queue; the orchestrator answers every notice with its
verdict as soon as it is applied, in order, so the reporter knows which notices are done. When
the call fails (orchestrator not up yet, restarted) exactly the notices written but not yet
answered go back to the front of the queue, in their order, with the one being written, and the
call is reopened: an answered notice is never sent again, and one that was applied but whose
answer was lost comes back as a harmless ``duplicate``. At most ``max_unanswered`` notices are
written ahead of their answers (then writing waits for answers). A rejected notice is logged
with its reason (``wrong_service``, ``job_finished``, ...) and not retried: sending it again
would get the same answer.

The target may name several orchestrator replicas, comma-separated (``host1:50051,host2:50051``),
or a ``dns:///`` name resolving to all of them (its channel load-balances round_robin). The
stream goes to the first address; when a call fails, the next one is opened at once, on the
next address (or, for a dns name, on another ready replica), and the unanswered notices are
resent there in their order. Backoff starts only once every address failed in a row, so one
replica being down never holds back notices of jobs started through the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from orchestrator.v1 import task_update_pb2, task_update_pb2_grpc

log = logging.getLogger(__name__)

Notice = task_update_pb2.PublishUpdatesRequest
ReportRequest = task_update_pb2.ReportUpdatesRequest
Answer = task_update_pb2.ReportUpdatesResponse

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
    """State of one ReportUpdates call: closed once the call has ended."""

    def __init__(self) -> None:
        self.closed = False
        self.written = 0
        self.answered = 0
        # Written (or being written), not yet answered, in order.
        self.unanswered: deque[Notice] = deque()

    def ended(self) -> bool:
        return self.closed


@dataclass(slots=True)
class AnswerCounts:
    """The orchestrator's answers over the reporter's life: how many, and of which verdict
    (rejections by reason, e.g. ``wrong_service``)."""

    answered: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def add(self, answer: Answer) -> None:
        self.answered += 1
        if answer.verdict == task_update_pb2.NOTICE_VERDICT_ACCEPTED:
            self.accepted += 1
        elif answer.verdict == task_update_pb2.NOTICE_VERDICT_DUPLICATE:
            self.duplicate += 1
        else:
            reason = _reason_name(answer.reason)
            self.rejected[reason] = self.rejected.get(reason, 0) + 1


def _reason_name(reason: task_update_pb2.RejectReason.ValueType) -> str:
    return task_update_pb2.RejectReason.Name(reason).removeprefix("REJECT_REASON_").lower()


class Reporter:
    """Publishes notices in order over one stream; ``start()``, ``publish()``, ``stop()``."""

    def __init__(
        self,
        target: str,
        metadata: Sequence[tuple[str, str]],
        *,
        reconnect_base_s: float = 0.1,
        reconnect_cap_s: float = 2.0,
        max_unanswered: int = 1024,
        rejections_kept: int = 100,
    ) -> None:
        self.target = target
        self.targets = split_targets(target)
        self._metadata = tuple(metadata)
        self._reconnect_base_s = reconnect_base_s
        self._reconnect_cap_s = reconnect_cap_s
        self._max_unanswered = max_unanswered
        self._queue: asyncio.Queue[Notice] = asyncio.Queue()
        self._retry: deque[Notice] = deque()  # notices to send again before the queue
        self._wakeup = asyncio.Event()
        self._unanswered = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._stopping = False
        self._stop_requested = asyncio.Event()  # wakes a reconnect backoff at once
        self._task: asyncio.Task[None] | None = None
        self._channels: list[grpc.aio.Channel] = []
        self._current = 0  # index of the target the next stream opens on
        self.connects = 0  # streams opened, for tests and logs
        self.counts = AnswerCounts()
        # The latest rejected notices with their answers (for tests and operators).
        self.rejections: deque[tuple[Notice, Answer]] = deque(maxlen=rejections_kept)

    @property
    def unanswered(self) -> int:
        """Notices published but not yet answered by the orchestrator."""
        return self._unanswered

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
        self._unanswered += 1
        self._drained.clear()
        self._wakeup.set()

    async def wait_drained(self, timeout_s: float | None = None) -> None:
        """Wait until the orchestrator answered every published notice (TimeoutError if
        not)."""
        async with asyncio.timeout(timeout_s):
            await self._drained.wait()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Send what is queued, wait for its answers and close the stream; give up (dropping
        unanswered notices, with a warning) after ``timeout_s``."""
        if self._task is None:
            return
        self._stopping = True
        self._stop_requested.set()
        self._wakeup.set()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._task)
        except TimeoutError:
            log.warning("reporter stopped with %d notice(s) unanswered", self._unanswered)
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

    async def _requests(self, stream: _Stream) -> AsyncIterator[ReportRequest]:
        """The request side of one call. Ends on stop once everything is written (half-close:
        the orchestrator ends the call once it answered all), or silently once the call is
        over."""
        while not stream.closed:
            notice = None
            if len(stream.unanswered) < self._max_unanswered:
                notice = self._take()
            if notice is None:
                if self._stopping and not self._retry and self._queue.empty():
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Counted as unanswered before it is written: gRPC resumes this generator only
            # after the write, and the answer may be read before that.
            stream.unanswered.append(notice)
            yield ReportRequest(notice=notice)
            if stream.ended():
                return  # the call ended meanwhile; _requeue already took the notice back
            stream.written += 1

    def _answered(self, stream: _Stream, answer: Answer) -> None:
        """The orchestrator answered the oldest unanswered notice of the stream."""
        if not stream.unanswered:  # never happens with a conforming orchestrator
            log.warning("an answer to notice %d arrived for no written notice", answer.index)
            return
        notice = stream.unanswered.popleft()
        stream.answered += 1
        self.counts.add(answer)
        if answer.verdict == task_update_pb2.NOTICE_VERDICT_REJECTED:
            self.rejections.append((notice, answer))
            log.warning(
                "notice rejected: %s (job %s, sequence %d): %s",
                _reason_name(answer.reason),
                notice.job_id,
                notice.sequence,
                answer.detail,
            )
        self._unanswered -= 1
        if self._unanswered == 0:
            self._drained.set()
        self._wakeup.set()  # room to write again

    def _requeue(self, stream: _Stream) -> None:
        """After a call ended: put the notices written (or being written) but not answered
        back in front of the queue, in order."""
        stream.closed = True
        self._wakeup.set()  # let the ended call's generator see it is closed
        self._retry.extendleft(reversed(stream.unanswered))
        stream.unanswered.clear()

    async def _run(self) -> None:
        stubs = [task_update_pb2_grpc.TaskUpdateServiceStub(c) for c in self._channels]
        failures = 0
        # Calls that failed since the last healthy stream: back off only once every target
        # had its chance (a dns name twice: round_robin moves on to another ready replica).
        failed_in_a_row = 0
        chances = sum(2 if t.startswith(_BALANCED_SCHEMES) else 1 for t in self.targets)
        while True:
            if self._stopping and self._unanswered == 0:
                return
            target = self.targets[self._current]
            stream = _Stream()
            self.connects += 1
            call = stubs[self._current].ReportUpdates(
                self._requests(stream), metadata=self._metadata
            )
            try:
                async for answer in call:
                    self._answered(stream, answer)
            except grpc.aio.AioRpcError as exc:
                self._requeue(stream)
                failed_in_a_row = 1 if stream.answered else failed_in_a_row + 1
                # Fail over at once (the next target, or another replica behind a dns name);
                # the unanswered notices go first, in their order.
                self._current = (self._current + 1) % len(self.targets)
                log.warning(
                    "ReportUpdates to %s failed (%s: %s); %d notice(s) unanswered, reconnecting%s",
                    target,
                    exc.code().name,
                    exc.details(),
                    self._unanswered,
                    f" to {self.targets[self._current]}" if len(self.targets) > 1 else "",
                )
            except asyncio.CancelledError:
                call.cancel()
                raise
            else:
                failed_in_a_row = 0
                self._requeue(stream)  # anything the orchestrator did not answer goes again
                log.info(
                    "ReportUpdates closed: wrote %d, answered %d (lifetime: accepted %d, "
                    "duplicate %d, rejected %s)",
                    stream.written,
                    stream.answered,
                    self.counts.accepted,
                    self.counts.duplicate,
                    self.counts.rejected or "none",
                )
                if self._stopping and self._unanswered == 0:
                    return
            if 0 < failed_in_a_row < chances:
                continue  # another target has not failed yet: try it without waiting
            if self._stopping and failed_in_a_row:
                # Stopping and no target takes the stream now: do not wait for one to come back.
                log.warning(
                    "stopping with %d notice(s) unanswered: no orchestrator took the stream",
                    self._unanswered,
                )
                return
            # A stream that got answers was healthy: reconnect soon. Otherwise back off more.
            failures = 1 if stream.answered else min(failures + 1, 30)
            await self._backoff(failures)

    async def _backoff(self, failures: int) -> None:
        ceiling = min(self._reconnect_cap_s, self._reconnect_base_s * 2.0 ** (failures - 1))
        pause = ceiling / 2 + random.uniform(0, ceiling / 2)
        # A stop ends the pause: the loop then tries once more before it gives up.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_requested.wait(), pause)
