"""The job flow under load, in one run, on a private redis-server:

1. chats: SendMessage until the completed event, closed loop at a fixed concurrency, with the
   reference Query service answering at once (step delay 0, 2 deltas: 5 notices per job), on
   the orchestrator backed by Redis BESIDE a bare grpc.aio relay doing the same hops without
   Redis or auth (client -> relay SendMessage -> SubmitQuery on the same reference service ->
   its notices back over its ReportUpdates stream into the relay -> the client). Client,
   servers and reference service share one event loop in this process, for both paths, so the
   ratio orchestrator/relay is the orchestrator's own cost. Both paths stay up and run in
   ``--rounds`` alternating rounds (default 4, ``--chats`` split between them): a shared
   machine's speed drifts within minutes, and a pair of runs one right after the other drifts
   alike. The ratio is the median of the rounds' ratios (target >= 0.5); each path's row is
   its median round.
2. fan-out: the orchestrator runs as a child process (``--serve-child``); this process opens
   1,000 StreamSession streams over 100 sessions (10 followers each, over several channels),
   each session has one job in flight (accepted through a stub Query service here), and
   several PublishUpdates streams publish delta notices for those jobs. Each delta carries its
   perf_counter send time (publisher and followers share this process). Peak: N notices as
   fast as possible, delivered events/s across the 1,000 streams (target >= 20,000). Then
   notices paced at half that rate for a few seconds, the publishers taking turns: p99
   notice-to-client latency (target <= 5 ms; the client process settles its heap first, as
   the server does).
3. idle: a fresh orchestrator child, 10,000 StreamSession streams (1,000 sessions x 10, over
   20 channels, each stream confirmed open by reading the session's accepted event). Memory per
   stream is the child's RSS (/proc/<pid>/status VmRSS) after opening them minus before,
   / 10,000 (target <= 16 KB, below the ~24.5 KB a bare grpc.aio server holds per open
   stream); CPU is the child's utime+stime (/proc/<pid>/stat) over 5 s of idling, as a
   percentage of one core.

Bounded in count and time. ``python -m bench.flow_bench [--chats N] ...``. ``--cluster`` runs
the chats and fan-out parts again on a private 3-master Redis Cluster (every node on this
machine) after the single Redis, and prints both rows with the ratio cluster/single.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from redis.asyncio import Redis

from bench import machine
from bench.machine import Limits
from bench.options import doc_parser
from bench.processes import (
    Child,
    bench_settings,
    on_private_cluster,
    on_private_redis,
    serve_until_sigterm,
    start_serving,
)
from bench.tables import (
    Rate,
    median_run,
    percentile,
    print_cluster_rows,
    print_table,
    quotient,
)
from orchestrator.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    common_pb2,
    session_pb2,
    session_pb2_grpc,
    task_update_pb2,
    task_update_pb2_grpc,
)
from query.v1 import query_pb2, query_pb2_grpc
from reference.app import ReferenceServices
from reference.config import ReferenceConfig
from registry.redis_url import parse_redis_url
from server.gc_tuning import settle_heap
from tests.support.redis_process import free_port
from tests.support.servers import running_server, service, tenant

TENANT = "bench"
TARGET_CHAT_RATIO = 0.5
TARGET_FANOUT_EPS = 20_000.0
TARGET_FANOUT_P99_MS = 5.0
TARGET_IDLE_KB = 16.0
CLIENT_GC_YOUNG_THRESHOLD = 50_000
EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
NOTICE = task_update_pb2
FINAL_NOTICES = (NOTICE.NOTICE_EVENT_COMPLETED, NOTICE.NOTICE_EVENT_FAILED)
# Separate connections per channel (channels with equal arguments would share one).
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


# -- 1. chats: orchestrator vs bare relay ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatResult(Rate):
    """One path's closed loop: ``chats`` completed in ``seconds``, latency percentiles in ms."""

    COUNTED = "chats"

    name: str
    chats: int
    seconds: float
    p50_ms: float
    p99_ms: float
    # CPU of this whole process (client, server, reference service) per chat, and of the
    # redis-server per chat (orchestrator path only): steadier than chats/s on a shared machine.
    cpu_ms: float = 0.0
    redis_cpu_ms: float = 0.0


async def redis_cpu_s(redis_url: str) -> float:
    """The redis-server's CPU so far (user + system), in seconds; for a cluster URL, the sum
    over its seed nodes (the benchmarks' private clusters name every master)."""
    target = parse_redis_url(redis_url)
    urls = [f"redis://{host}:{port}" for host, port in target.seeds] or [redis_url]
    total = 0.0
    for url in urls:
        client = Redis.from_url(url)
        try:
            info = await client.info("cpu")
        finally:
            await client.aclose()
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


async def drive_chats(
    name: str,
    channel: grpc.aio.Channel,
    session_ids: list[str],
    chats: int,
    concurrency: int,
    *,
    metadata: tuple[tuple[str, str], ...] | None = None,
    content: str = "What is RAG?",
    events: Counter[str] | None = None,
) -> ChatResult:
    """Closed loop: ``concurrency`` workers, each sending on its own sessions, one chat at a
    time, until ``chats`` chats have completed. Calls carry ``metadata`` (a client of TENANT
    unless given); ``events`` (when given) counts the events received by kind."""
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    metadata = tenant(TENANT) if metadata is None else metadata
    latencies: list[float] = []
    issued = 0

    async def worker(index: int) -> None:
        nonlocal issued
        mine = session_ids[index::concurrency] or session_ids
        turn = 0
        while issued < chats:
            issued += 1
            session_id = mine[turn % len(mine)]
            turn += 1
            started = time.perf_counter()
            call = stub.SendMessage(
                chat_pb2.SendMessageRequest(session_id=session_id, content=content),
                metadata=metadata,
                timeout=30,
            )
            last: str | None = ""
            async for reply in call:
                last = reply.event.WhichOneof("kind")
                if events is not None:
                    events[last or ""] += 1
            if last != "completed":
                raise RuntimeError(f"{name}: chat ended with {last!r}")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    cpu_started = time.process_time()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    return ChatResult(
        name,
        len(latencies),
        seconds,
        percentile(latencies, 0.5) * 1000,
        percentile(latencies, 0.99) * 1000,
        cpu_ms=quotient(cpu * 1000, len(latencies)),
    )


def relay_event(session_id: str, job_id: str, notice: Any) -> chat_pb2.ChatEvent:
    """The chat event a bare relay makes of a notice (progress, delta, tool call, workflow
    step, completed, failed)."""
    event = chat_pb2.ChatEvent(session_id=session_id, job_id=job_id, sequence=notice.sequence + 1)
    if notice.event == NOTICE.NOTICE_EVENT_PROGRESS:
        event.progress.fraction = notice.progress
        event.progress.message = notice.status_message
    elif notice.event == NOTICE.NOTICE_EVENT_DELTA:
        event.delta.text = notice.delta
    elif notice.event == NOTICE.NOTICE_EVENT_TOOL_CALL:
        event.tool_call.CopyFrom(notice.tool_call)
    elif notice.event == NOTICE.NOTICE_EVENT_STEP:
        event.workflow_step.CopyFrom(notice.step)
    elif notice.event == NOTICE.NOTICE_EVENT_COMPLETED:
        event.completed.result.CopyFrom(notice.result)
        event.completed.usage.CopyFrom(notice.usage)
    else:
        event.failed.error.CopyFrom(notice.error)
    return event


class NoticeQueues(task_update_pb2_grpc.TaskUpdateServiceServicer):
    """A bare relay's PublishUpdates and ReportUpdates: each notice into the queue of its job,
    if one waits."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Queue[task_update_pb2.PublishUpdatesRequest]] = {}

    @contextlib.contextmanager
    def waiting(
        self, job_id: str
    ) -> Iterator[asyncio.Queue[task_update_pb2.PublishUpdatesRequest]]:
        """The queue of ``job_id``'s notices while the block runs."""
        queue: asyncio.Queue[task_update_pb2.PublishUpdatesRequest] = asyncio.Queue()
        self._waiting[job_id] = queue
        try:
            yield queue
        finally:
            del self._waiting[job_id]

    async def PublishUpdates(
        self, request_iterator: AsyncIterator[task_update_pb2.PublishUpdatesRequest], context: Any
    ) -> task_update_pb2.PublishUpdatesResponse:
        received = accepted = 0
        async for notice in request_iterator:
            received += 1
            queue = self._waiting.get(notice.job_id)
            if queue is not None:
                accepted += 1
                queue.put_nowait(notice)
        return task_update_pb2.PublishUpdatesResponse(received=received, accepted=accepted)

    async def ReportUpdates(
        self, request_iterator: AsyncIterator[task_update_pb2.ReportUpdatesRequest], context: Any
    ) -> AsyncIterator[task_update_pb2.ReportUpdatesResponse]:
        """The acknowledged form (the reference reporter's): each notice answered at once."""
        index = 0
        async for request in request_iterator:
            notice = request.notice
            queue = self._waiting.get(notice.job_id)
            if queue is not None:
                queue.put_nowait(notice)
            yield task_update_pb2.ReportUpdatesResponse(
                index=index,
                job_id=notice.job_id,
                sequence=notice.sequence,
                verdict=task_update_pb2.NOTICE_VERDICT_ACCEPTED
                if queue is not None
                else task_update_pb2.NOTICE_VERDICT_REJECTED,
                reason=task_update_pb2.REJECT_REASON_UNSPECIFIED
                if queue is not None
                else task_update_pb2.REJECT_REASON_UNKNOWN_JOB,
            )
            index += 1


class BareRelay(chat_pb2_grpc.ChatServiceServicer, NoticeQueues):
    """SendMessage and PublishUpdates with nothing in between but a dict of queues: no Redis,
    no auth, no sessions, no interceptors."""

    def __init__(self, query_address: str) -> None:
        super().__init__()
        self._query_address = query_address
        self._channel: grpc.aio.Channel | None = None

    def _query(self) -> Any:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self._query_address)
        return query_pb2_grpc.QueryServiceStub(self._channel)

    async def SendMessage(
        self, request: chat_pb2.SendMessageRequest, context: Any
    ) -> AsyncIterator[chat_pb2.SendMessageResponse]:
        job_id = uuid.uuid4().hex
        with self.waiting(job_id) as queue:
            yield chat_pb2.SendMessageResponse(
                event=chat_pb2.ChatEvent(
                    session_id=request.session_id,
                    job_id=job_id,
                    sequence=1,
                    accepted=chat_pb2.JobAccepted(content=request.content),
                )
            )
            await self._query().SubmitQuery(
                query_pb2.SubmitQueryRequest(
                    tenant_id=TENANT,
                    session_id=request.session_id,
                    prompt=request.content,
                    job_id=job_id,
                ),
                timeout=5,
            )
            while True:
                notice = await queue.get()
                yield chat_pb2.SendMessageResponse(
                    event=relay_event(request.session_id, job_id, notice)
                )
                if notice.event in FINAL_NOTICES:
                    return

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)


def reference_config(listen: str, orchestrator: str, deltas: int) -> ReferenceConfig:
    return ReferenceConfig(
        listen_address=listen,
        orchestrator_address=orchestrator,
        step_delay_s=0.0,
        deltas=deltas,
        publish_metadata=service(),
        log_level="WARNING",
    )


@dataclass
class ChatPath:
    """One chat path, set up and warmed up, ready for closed loops (``drive``): the paths stay
    up side by side so that their runs can alternate."""

    name: str
    channel: grpc.aio.Channel
    session_ids: list[str]
    concurrency: int
    redis_url: str | None = None  # the backend's redis-server, whose CPU counts too

    async def drive(self, chats: int) -> ChatResult:
        redis_url = self.redis_url
        redis_before = await redis_cpu_s(redis_url) if redis_url else 0.0
        result = await drive_chats(
            self.name, self.channel, self.session_ids, chats, self.concurrency
        )
        if not redis_url:
            return result
        redis_ms = quotient((await redis_cpu_s(redis_url) - redis_before) * 1000, result.chats)
        return dataclasses.replace(result, redis_cpu_ms=redis_ms)


@contextlib.asynccontextmanager
async def orchestrator_path(
    redis_url: str,
    concurrency: int,
    sessions: int,
    deltas: int,
    *,
    name: str = "orchestrator (Redis)",
) -> AsyncIterator[ChatPath]:
    """The orchestrator on ``redis_url`` beside its reference service, sessions on it, warm."""
    orchestrator_port, reference_port = free_port(), free_port()
    settings = bench_settings(
        redis_url,
        listen_address=f"127.0.0.1:{orchestrator_port}",
        query_service_address=f"127.0.0.1:{reference_port}",
    )
    reference = ReferenceServices(
        reference_config(f"127.0.0.1:{reference_port}", f"127.0.0.1:{orchestrator_port}", deltas)
    )
    async with running_server(settings) as running:
        await reference.start()
        try:
            session_ids = await create_sessions(running.channel, sessions)
            # Warm up (channels, scripts, the reporter's stream) before any measured run.
            await drive_chats("warm-up", running.channel, session_ids, concurrency, concurrency)
            yield ChatPath(name, running.channel, session_ids, concurrency, redis_url)
        finally:
            await reference.stop()


@contextlib.asynccontextmanager
async def relay_path(concurrency: int, sessions: int, deltas: int) -> AsyncIterator[ChatPath]:
    """The bare grpc.aio relay beside its reference service, warm."""
    relay_port, reference_port = free_port(), free_port()
    relay = BareRelay(f"127.0.0.1:{reference_port}")  # type: ignore[abstract]
    server = grpc.aio.server()
    chat_pb2_grpc.add_ChatServiceServicer_to_server(relay, server)
    task_update_pb2_grpc.add_TaskUpdateServiceServicer_to_server(relay, server)
    server.add_insecure_port(f"127.0.0.1:{relay_port}")
    reference = ReferenceServices(
        reference_config(f"127.0.0.1:{reference_port}", f"127.0.0.1:{relay_port}", deltas)
    )
    await server.start()
    await reference.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}")
    try:
        session_ids = [f"s{n}" for n in range(sessions)]
        await drive_chats("warm-up", channel, session_ids, concurrency, concurrency)
        yield ChatPath("bare grpc.aio relay", channel, session_ids, concurrency)
    finally:
        await channel.close(None)
        await reference.stop()
        await server.stop(0.5)
        await relay.aclose()


async def chats_on_orchestrator(
    redis_url: str,
    chats: int,
    concurrency: int,
    sessions: int,
    deltas: int,
    *,
    name: str = "orchestrator (Redis)",
) -> ChatResult:
    """One closed loop of ``chats`` on a fresh orchestrator."""
    async with orchestrator_path(redis_url, concurrency, sessions, deltas, name=name) as path:
        return await path.drive(chats)


async def chats_on_relay(chats: int, concurrency: int, sessions: int, deltas: int) -> ChatResult:
    """One closed loop of ``chats`` on a fresh bare relay."""
    async with relay_path(concurrency, sessions, deltas) as path:
        return await path.drive(chats)


@dataclass(frozen=True, slots=True)
class ChatRounds:
    """Alternating rounds of both paths, both up throughout: ``relay[i]`` and
    ``orchestrator[i]`` ran one right after the other, so a machine whose speed drifts (a
    shared one does, by 2x within minutes) moves both alike. The verdict is the median of the
    rounds' ratios; each path's row is its median round."""

    relay: list[ChatResult]
    orchestrator: list[ChatResult]

    def ratios(self) -> list[float]:
        return [chat_ratio(o, r) for o, r in zip(self.orchestrator, self.relay, strict=True)]

    def cpu_ratios(self) -> list[float]:
        return [cpu_ratio(o, r) for o, r in zip(self.orchestrator, self.relay, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios())

    @property
    def cpu_ratio(self) -> float:
        return statistics.median(self.cpu_ratios())


async def chat_rounds(
    redis_url: str, *, chats: int, rounds: int, concurrency: int, sessions: int, deltas: int
) -> ChatRounds:
    """``rounds`` alternating rounds (relay first, then orchestrator first, ...) of
    ``chats // rounds`` chats per path."""
    per_round = max(1, chats // rounds)
    relay_runs: list[ChatResult] = []
    orchestrator_runs: list[ChatResult] = []
    async with (
        relay_path(concurrency, sessions, deltas) as relay,
        orchestrator_path(redis_url, concurrency, sessions, deltas) as orchestrator,
    ):
        for number in range(rounds):
            first, second = (relay, orchestrator) if number % 2 == 0 else (orchestrator, relay)
            for path in (first, second):
                result = await path.drive(per_round)
                (relay_runs if path is relay else orchestrator_runs).append(result)
    return ChatRounds(relay_runs, orchestrator_runs)


async def create_sessions(
    channel: grpc.aio.Channel,
    count: int,
    *,
    agent_id: str = "bench-agent",
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> list[str]:
    """``count`` sessions on ``agent_id`` (for a client of TENANT unless ``metadata``)."""
    stub = session_pb2_grpc.SessionServiceStub(channel)
    metadata = tenant(TENANT) if metadata is None else metadata
    ids: list[str] = []
    for start in range(0, count, 100):
        replies = await asyncio.gather(
            *(
                stub.CreateSession(
                    session_pb2.CreateSessionRequest(agent_id=agent_id),
                    metadata=metadata,
                    timeout=30,
                )
                for _ in range(min(100, count - start))
            )
        )
        ids += [reply.session.session_id for reply in replies]
    return ids


# -- the orchestrator as a child process ----------------------------------------------------------


class StubQuery(query_pb2_grpc.QueryServiceServicer):
    """Accepts every submit and does nothing: the bench publishes the notices itself."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    async def SubmitQuery(
        self, request: query_pb2.SubmitQueryRequest, context: Any
    ) -> query_pb2.SubmitQueryResponse:
        self.submitted.append(request.job_id)
        return query_pb2.SubmitQueryResponse(job_id=request.job_id)


@contextlib.asynccontextmanager
async def stub_query_server() -> AsyncIterator[tuple[str, StubQuery]]:
    stub = StubQuery()  # type: ignore[abstract]
    server = grpc.aio.server()
    query_pb2_grpc.add_QueryServiceServicer_to_server(stub, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", stub
    finally:
        await server.stop(0.2)


async def serve_child(redis_url: str, query_address: str) -> None:
    """The ``--serve-child`` entry point: an orchestrator accepting the test keys; prints
    ``PORT <n>`` once serving and stops on SIGTERM."""
    logging.basicConfig(level=logging.WARNING)
    await serve_until_sigterm(bench_settings(redis_url, query_service_address=query_address))


@contextlib.contextmanager
def server_child(redis_url: str, query_address: str) -> Iterator[tuple[Child, str]]:
    """``python -m bench.flow_bench --serve-child``: the orchestrator in its own process, so
    its memory and CPU are its own; the child and its address."""
    args = ["bench.flow_bench", "--serve-child", redis_url, query_address]
    child, port = start_serving(args, "orchestrator")
    with child:
        yield child, f"127.0.0.1:{port}"


def open_channels(address: str, count: int) -> list[grpc.aio.Channel]:
    return [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(count)]


async def start_jobs(
    channel: grpc.aio.Channel, session_ids: list[str], stub: StubQuery, batch: int = 50
) -> list[str]:
    """One job in flight per session (accepted, handed to the stub service, running); the
    SendMessage calls are then dropped, the jobs stay running. In batches: the server's Redis
    pool (64 connections) refuses rather than queues beyond its size."""
    job_ids: list[str] = []
    for start in range(0, len(session_ids), batch):
        job_ids += await _start_jobs(channel, session_ids[start : start + batch], stub)
    return job_ids


async def _start_jobs(
    channel: grpc.aio.Channel, session_ids: list[str], stub: StubQuery
) -> list[str]:
    chat = chat_pb2_grpc.ChatServiceStub(channel)
    metadata = tenant(TENANT)
    expected = len(stub.submitted) + len(session_ids)
    calls = [
        chat.SendMessage(
            chat_pb2.SendMessageRequest(session_id=sid, content="follow me"),
            metadata=metadata,
            timeout=60,
        )
        for sid in session_ids
    ]
    firsts: list[Any] = await asyncio.gather(*(call.read() for call in calls))
    job_ids = [str(first.event.job_id) for first in firsts]
    deadline = time.monotonic() + 30
    while len(stub.submitted) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError("jobs were not handed to the stub service")
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # let each handler mark its job running
    for call in calls:
        call.cancel()
    return job_ids


class Followers:
    """StreamSession streams; counts delta events and records their latency."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] | None = None) -> None:
        # A client of TENANT unless given.
        self.metadata = tenant(TENANT) if metadata is None else metadata
        self.opened = 0
        self.all_open = asyncio.Event()
        self.expected_open = 0
        self.delivered = 0
        self.target = 0
        self.reached = asyncio.Event()
        self.latencies: list[float] | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.calls: list[Any] = []
        self.errors: list[grpc.aio.AioRpcError] = []

    def check(self) -> None:
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} streams failed, first: {self.errors[0]}")

    async def open(
        self,
        channels: list[grpc.aio.Channel],
        session_ids: list[str],
        per_session: int,
        batch: int = 200,
        timeout_s: float = 60.0,
    ) -> None:
        """Open ``per_session`` streams on each session, spread over ``channels``, in waves of
        ``batch`` (each confirmed open by its first event before the next wave: the server's
        Redis pool refuses rather than queues beyond its size)."""
        metadata = self.metadata
        request = chat_pb2.StreamSessionRequest
        wanted = [sid for sid in session_ids for _ in range(per_session)]
        for start in range(0, len(wanted), batch):
            for session_id in wanted[start : start + batch]:
                stub = chat_pb2_grpc.ChatServiceStub(channels[len(self.calls) % len(channels)])
                call = stub.StreamSession(request(session_id=session_id), metadata=metadata)
                self.calls.append(call)
                self.tasks.append(asyncio.create_task(self._read(call)))
            self.expected_open = len(self.calls)
            self.all_open.clear()
            if self.opened < self.expected_open:
                await asyncio.wait_for(self.all_open.wait(), timeout_s)
            self.check()

    async def wait_reached(self, timeout_s: float) -> None:
        await asyncio.wait_for(self.reached.wait(), timeout_s)
        self.check()

    async def _read(self, call: Any) -> None:
        try:
            await self._read_events(call)
        except asyncio.CancelledError:
            pass
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.errors.append(exc)
                self.all_open.set()  # wake open() to report it
                self.reached.set()

    async def _read_events(self, call: Any) -> None:
        async for reply in call:
            event = reply.event
            if event.HasField("accepted"):
                self.opened += 1
                if self.opened >= self.expected_open:
                    self.all_open.set()
                continue
            if not event.HasField("delta"):
                continue
            now = time.perf_counter_ns()
            if self.latencies is not None:
                self.latencies.append((now - int(event.delta.text)) / 1e6)
            self.delivered += 1
            if self.delivered >= self.target:
                self.reached.set()

    def expect(self, more: int) -> None:
        self.target = self.delivered + more
        self.reached.clear()

    async def close(self) -> None:
        for call in self.calls:
            call.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class FanoutResult(Rate):
    """Events delivered to the followers: the peak phase's rate, the paced phase's latency."""

    COUNTED = "delivered"

    streams: int
    sessions: int
    notices: int
    delivered: int
    seconds: float
    paced_rate: float  # delivered events/s asked for in the paced phase
    paced_delivered: int
    p50_ms: float
    p99_ms: float
    cpu_s: float = 0.0  # the server's CPU time (user + system) over the peak phase
    client_cpu_s: float = 0.0  # this process' (publishers and followers) over the peak phase

    @property
    def cpu_us_per_event(self) -> float:
        """Server CPU per delivered event in the peak phase: steadier than the rate on a
        shared machine (other processes take wall time, not this process' CPU time)."""
        return 1e6 * self.cpu_s / self.delivered if self.delivered else 0.0

    @property
    def client_cpu_us_per_event(self) -> float:
        """The measuring process' CPU per delivered event in the peak phase: with the server's,
        what one delivered event costs the machine's cores (they share them)."""
        return 1e6 * self.client_cpu_s / self.delivered if self.delivered else 0.0


async def publish(
    channel: grpc.aio.Channel,
    jobs: list[str],
    count: int,
    sequences: dict[str, int],
    interval_s: float = 0.0,
    *,
    offset_s: float = 0.0,
    metadata: tuple[tuple[str, str], ...] | None = None,
    service_pb: int = common_pb2.SERVICE_QUERY,
) -> task_update_pb2.PublishUpdatesResponse:
    """``count`` delta notices round-robin over ``jobs`` on one PublishUpdates stream, each
    stamped with its send time; paced at one per ``interval_s`` when that is set, the first
    ``offset_s`` after the stream's start. As ``service_pb`` with ``metadata`` (the test
    service key unless given)."""
    stub = task_update_pb2_grpc.TaskUpdateServiceStub(channel)

    async def notices() -> AsyncIterator[task_update_pb2.PublishUpdatesRequest]:
        started = time.perf_counter()
        for n in range(count):
            if interval_s:
                due = started + offset_s + n * interval_s
                delay = due - time.perf_counter()
                if delay > 0.001:
                    await asyncio.sleep(delay)
            job_id = jobs[n % len(jobs)]
            sequences[job_id] += 1
            yield task_update_pb2.PublishUpdatesRequest(
                event=NOTICE.NOTICE_EVENT_DELTA,
                service=service_pb,  # type: ignore[arg-type]
                job_id=job_id,
                tenant_id=TENANT,
                sequence=sequences[job_id],
                delta=str(time.perf_counter_ns()),
            )

    reply: task_update_pb2.PublishUpdatesResponse = await stub.PublishUpdates(
        notices(), metadata=service() if metadata is None else metadata, timeout=120
    )
    return reply


async def publish_all(
    channels: list[grpc.aio.Channel],
    jobs: list[str],
    notices: int,
    publishers: int,
    sequences: dict[str, int],
    interval_s: float = 0.0,
    **publish_args: Any,
) -> None:
    """``publishers`` streams, each for its own share of the jobs (so per-job order holds);
    ``publish_args`` go to :func:`publish`. No more streams than jobs: a stream without a job
    of its own would have nothing to publish for. Paced, the streams take turns (stream ``p``
    starts ``p * interval_s`` late): one notice every ``interval_s`` in all, not one from
    every stream at once every ``publishers * interval_s``."""
    publishers = max(1, min(publishers, len(jobs)))
    shares = [jobs[p::publishers] for p in range(publishers)]
    counts = [
        notices // publishers + (1 if p < notices % publishers else 0) for p in range(publishers)
    ]
    replies = await asyncio.gather(
        *(
            publish(
                channels[p % len(channels)],
                shares[p],
                counts[p],
                sequences,
                interval_s * publishers,
                offset_s=interval_s * p,
                **publish_args,
            )
            for p in range(publishers)
            if counts[p]
        )
    )
    accepted = sum(reply.accepted for reply in replies)
    if accepted != notices:
        raise RuntimeError(f"only {accepted} of {notices} notices accepted: {replies}")


@dataclass(frozen=True, slots=True)
class BusySessions:
    """An orchestrator child, sessions on it with one job running in each, channels to it
    and (not yet opened) followers."""

    child: Child
    channels: list[grpc.aio.Channel]
    session_ids: list[str]
    jobs: list[str]
    followers: Followers


@contextlib.asynccontextmanager
async def busy_sessions(
    redis_url: str, sessions: int, channels_count: int
) -> AsyncIterator[BusySessions]:
    """The jobs are handed to a stub Query service: the bench publishes their notices itself."""
    async with stub_query_server() as (query_address, stub):
        with server_child(redis_url, query_address) as (child, address):
            channels = open_channels(address, channels_count)
            followers = Followers()
            try:
                session_ids = await create_sessions(channels[0], sessions)
                jobs = await start_jobs(channels[0], session_ids, stub)
                yield BusySessions(child, channels, session_ids, jobs, followers)
            finally:
                await followers.close()
                for channel in channels:
                    await channel.close(None)


async def fanout(
    redis_url: str,
    *,
    sessions: int,
    per_session: int,
    notices: int,
    publishers: int,
    paced_s: float,
    channels_count: int = 10,
) -> FanoutResult:
    async with busy_sessions(redis_url, sessions, channels_count) as busy:
        channels, jobs, followers = busy.channels, busy.jobs, busy.followers
        sequences = dict.fromkeys(jobs, 0)
        await followers.open(channels, busy.session_ids, per_session)
        streams = sessions * per_session
        # Warm up, then the peak: as fast as the publishers go.
        followers.expect(len(jobs) * per_session)
        await publish_all(channels, jobs, len(jobs), publishers, sequences)
        await followers.wait_reached(30)
        # The measuring process settles its heap as the server does (server.gc_tuning): a
        # full collection here, over the 1,000 calls' objects, would count as delivery time.
        settle_heap(CLIENT_GC_YOUNG_THRESHOLD)
        followers.expect(notices * per_session)
        cpu_before = busy.child.cpu_seconds()
        client_cpu_before = time.process_time()
        started = time.perf_counter()
        await publish_all(channels, jobs, notices, publishers, sequences)
        await followers.wait_reached(120)
        seconds = time.perf_counter() - started
        cpu = busy.child.cpu_seconds() - cpu_before
        client_cpu = time.process_time() - client_cpu_before
        peak = notices * per_session / seconds
        # Paced at half the peak, with latencies.
        rate = peak / 2
        paced_notices = max(len(jobs), int(rate / per_session * paced_s))
        followers.latencies = []
        followers.expect(paced_notices * per_session)
        await publish_all(
            channels, jobs, paced_notices, publishers, sequences, interval_s=per_session / rate
        )
        await followers.wait_reached(60)
        latencies = followers.latencies
        return FanoutResult(
            streams,
            sessions,
            notices,
            notices * per_session,
            seconds,
            rate,
            len(latencies),
            percentile(latencies, 0.5),
            percentile(latencies, 0.99),
            cpu,
            client_cpu,
        )


# -- 3. idle streams ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdleResult:
    streams: int
    sessions: int
    rss_before: int
    rss_after: int
    idle_s: float
    cpu_s: float

    @property
    def kb_per_stream(self) -> float:
        return (self.rss_after - self.rss_before) / self.streams / 1024

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu_s / self.idle_s


async def idle_streams(
    redis_url: str, *, sessions: int, per_session: int, idle_s: float, channels_count: int = 20
) -> IdleResult:
    async with busy_sessions(redis_url, sessions, channels_count) as busy:
        child = busy.child
        await asyncio.sleep(1.0)
        rss_before = child.status_bytes("VmRSS")
        await busy.followers.open(busy.channels, busy.session_ids, per_session)
        await asyncio.sleep(1.0)
        rss_after = child.status_bytes("VmRSS")
        cpu_before = child.cpu_seconds()
        started = time.perf_counter()
        await asyncio.sleep(idle_s)
        idle = time.perf_counter() - started
        cpu = child.cpu_seconds() - cpu_before
        return IdleResult(sessions * per_session, sessions, rss_before, rss_after, idle, cpu)


# -- the table ------------------------------------------------------------------------------------


@dataclass
class Results:
    chats: ChatRounds
    fanout: FanoutResult
    idle: IdleResult
    limits: Limits

    def verdicts(self) -> dict[str, bool]:
        return {
            "chat ratio": self.chats.ratio >= TARGET_CHAT_RATIO,
            "fan-out rate": self.fanout.per_second >= TARGET_FANOUT_EPS,
            "fan-out p99": self.fanout.p99_ms <= TARGET_FANOUT_P99_MS,
            "idle memory": self.idle.kb_per_stream <= TARGET_IDLE_KB,
        }


def chat_ratio(orchestrator: ChatResult, relay: ChatResult) -> float:
    return quotient(orchestrator.per_second, relay.per_second)


def cpu_ratio(orchestrator: ChatResult, relay: ChatResult) -> float:
    """CPU per chat, relay / (orchestrator + its Redis)."""
    return quotient(relay.cpu_ms, orchestrator.cpu_ms + orchestrator.redis_cpu_ms)


def print_chats(
    rounds: ChatRounds,
    limits: Limits,
    on_cluster: ChatResult | None = None,
) -> None:
    """The chats table (each path's median round); with ``on_cluster``, its row too and the
    cluster/single ratios."""
    relay, orchestrator = median_run(rounds.relay), median_run(rounds.orchestrator)
    ratio = rounds.ratio
    print(
        "1. chats: SendMessage -> completed (reference service, step delay 0); "
        f"median rounds of {len(rounds.relay)} alternating"
    )
    print_table(
        [
            (
                "path",
                "chats",
                "seconds",
                "chats/s",
                "p50 ms",
                "p99 ms",
                "CPU ms/chat",
                "Redis CPU",
                "of bare unary",
            ),
            *(
                (
                    c.name,
                    str(c.chats),
                    f"{c.seconds:.2f}",
                    f"{c.per_second:,.0f}",
                    f"{c.p50_ms:.1f}",
                    f"{c.p99_ms:.1f}",
                    f"{c.cpu_ms:.2f}",
                    f"{c.redis_cpu_ms:.2f}" if c.redis_cpu_ms else "",
                    limits.unary_fraction(c.per_second),
                )
                for c in (relay, orchestrator, *([on_cluster] if on_cluster else []))
            ),
            ("bare grpc.aio unary echo", "", "", f"{limits.unary_per_s:,.0f}", "", "", "", "", "1"),
        ]
    )
    print("relay rounds (chats/s): " + ", ".join(f"{r.per_second:,.0f}" for r in rounds.relay))
    print(
        "orchestrator rounds (chats/s): "
        + ", ".join(f"{o.per_second:,.0f}" for o in rounds.orchestrator)
    )
    verdict = "ok" if ratio >= TARGET_CHAT_RATIO else "BELOW TARGET"
    print(
        f"ratio orchestrator/relay = {ratio:.2f} (median of the rounds: "
        f"{', '.join(f'{x:.2f}' for x in rounds.ratios())}; target >= {TARGET_CHAT_RATIO}) "
        f"{verdict}"
    )
    print(
        f"CPU per chat relay/(orchestrator + its Redis) = {rounds.cpu_ratio:.2f} (median of the "
        f"rounds: {', '.join(f'{x:.2f}' for x in rounds.cpu_ratios())})"
    )
    if on_cluster is not None:
        print_cluster_chats(orchestrator, on_cluster)


def print_cluster_chats(single: ChatResult, cluster: ChatResult) -> None:
    print("chats, orchestrator on a single Redis vs a 3-master Redis Cluster (same machine):")
    print_cluster_rows(
        [
            ("chats/s", single.per_second, cluster.per_second, ",.0f"),
            ("p50 ms", single.p50_ms, cluster.p50_ms, ".1f"),
            ("p99 ms", single.p99_ms, cluster.p99_ms, ".1f"),
            ("CPU ms/chat (this process)", single.cpu_ms, cluster.cpu_ms, ".2f"),
            ("Redis CPU ms/chat (all nodes)", single.redis_cpu_ms, cluster.redis_cpu_ms, ".2f"),
        ]
    )


def fanout_line(f: FanoutResult) -> str:
    return (
        f"{f.per_second:,.0f} delivered events/s (target >= {TARGET_FANOUT_EPS:,.0f})"
        f"; at {f.paced_rate:,.0f} events/s p50 {f.p50_ms:.2f} ms, p99 {f.p99_ms:.2f} ms"
        f" (target <= {TARGET_FANOUT_P99_MS:.0f} ms); CPU per delivered event: server"
        f" {f.cpu_us_per_event:.1f} us, client {f.client_cpu_us_per_event:.1f} us"
    )


def print_cluster_fanout(single: FanoutResult, cluster: FanoutResult) -> None:
    print("fan-out, orchestrator on a single Redis vs a 3-master Redis Cluster (same machine):")
    print_cluster_rows(
        [
            ("peak delivered events/s", single.per_second, cluster.per_second, ",.0f"),
            ("paced p50 ms", single.p50_ms, cluster.p50_ms, ".2f"),
            ("paced p99 ms", single.p99_ms, cluster.p99_ms, ".2f"),
            (
                "server CPU us/event (peak)",
                single.cpu_us_per_event,
                cluster.cpu_us_per_event,
                ".1f",
            ),
        ]
    )


def print_results(r: Results) -> None:
    ok = r.verdicts()

    def mark(name: str) -> str:
        return "ok" if ok[name] else "BELOW TARGET"

    print_chats(r.chats, r.limits)
    f = r.fanout
    print(
        f"2. fan-out: {f.streams:,} StreamSession streams over {f.sessions} sessions, "
        f"orchestrator in a child process"
    )
    print_table(
        [
            ("measure", "value", "target", "verdict", "of bare streaming"),
            (
                f"peak delivered events/s ({f.notices:,} notices -> {f.delivered:,} events)",
                f"{f.per_second:,.0f}",
                f">= {TARGET_FANOUT_EPS:,.0f}",
                mark("fan-out rate"),
                r.limits.stream_fraction(f.per_second),
            ),
            (
                f"bare grpc.aio server-streaming msgs/s ({r.limits.streams} streams)",
                f"{r.limits.stream_messages_per_s:,.0f}",
                "",
                "",
                "1",
            ),
            ("server CPU per delivered event (peak)", f"{f.cpu_us_per_event:.1f} us", "", ""),
            (
                "client CPU per delivered event (peak, this process)",
                f"{f.client_cpu_us_per_event:.1f} us",
                "",
                "",
            ),
            (
                f"notice->client p50 at {f.paced_rate:,.0f} events/s "
                f"({f.paced_delivered:,} events)",
                f"{f.p50_ms:.2f} ms",
                "",
                "",
            ),
            (
                f"notice->client p99 at {f.paced_rate:,.0f} events/s",
                f"{f.p99_ms:.2f} ms",
                f"<= {TARGET_FANOUT_P99_MS:.0f} ms",
                mark("fan-out p99"),
            ),
        ]
    )
    i = r.idle
    print(f"3. idle: {i.streams:,} StreamSession streams over {i.sessions:,} sessions (child RSS)")
    print_table(
        [
            ("measure", "value", "target", "verdict"),
            (
                "RSS before -> after",
                f"{i.rss_before / 2**20:.1f} -> {i.rss_after / 2**20:.1f} MiB",
                "",
                "",
            ),
            (
                "memory per stream",
                f"{i.kb_per_stream:.1f} KB",
                f"<= {TARGET_IDLE_KB:.0f} KB",
                mark("idle memory"),
            ),
            (
                f"server CPU while idle ({i.idle_s:.1f} s)",
                f"{i.cpu_percent:.1f} % of a core",
                "",
                "",
            ),
        ]
    )
    r.limits.print_line()


async def chats(redis_url: str, args: argparse.Namespace) -> tuple[ChatRounds, Limits]:
    """The chats part: (the rounds of both paths, the machine's bare figures in this run)."""
    limits = await machine.measure()
    rounds = await chat_rounds(
        redis_url,
        chats=args.chats,
        rounds=args.rounds,
        concurrency=args.concurrency,
        sessions=args.sessions,
        deltas=args.deltas,
    )
    return rounds, limits


async def measure(redis_url: str, args: argparse.Namespace) -> Results:
    rounds, limits = await chats(redis_url, args)
    fan = await fanout_part(redis_url, args)
    idle = await idle_part(redis_url, args)
    return Results(rounds, fan, idle, limits)


def parser() -> argparse.ArgumentParser:
    p = doc_parser(__doc__)
    p.add_argument("--chats", type=int, default=2000, help="chats per path, over all rounds")
    p.add_argument(
        "--rounds", type=int, default=4, help="alternating chat rounds (the ratio is their median)"
    )
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--sessions", type=int, default=320)
    p.add_argument("--deltas", type=int, default=2)
    p.add_argument("--fanout-sessions", type=int, default=100)
    p.add_argument("--followers", type=int, default=10, help="streams per fan-out session")
    p.add_argument("--notices", type=int, default=3000)
    p.add_argument("--publishers", type=int, default=8, help="PublishUpdates streams")
    p.add_argument("--paced-seconds", type=float, default=3.0)
    p.add_argument("--idle-sessions", type=int, default=1000)
    p.add_argument("--idle-followers", type=int, default=10, help="streams per idle session")
    p.add_argument("--idle-seconds", type=float, default=5.0)
    p.add_argument(
        "--only", choices=["chats", "fanout", "idle"], help="run only this part (its figures alone)"
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="also run chats and fan-out on a private 3-master Redis Cluster; print both",
    )
    p.add_argument("--serve-child", nargs=2, metavar=("REDIS_URL", "QUERY_ADDRESS"))
    return p


def run_part(args: argparse.Namespace) -> int:
    """``--only fanout`` or ``--only idle``: that part's figures alone."""
    if args.only == "fanout":
        f = machine.run(on_private_redis(lambda url: fanout_part(url, args)))
        print(f"fan-out: {fanout_line(f)}")
        if args.cluster:
            on_cluster = machine.run(on_private_cluster(lambda url: fanout_part(url, args)))
            print(f"fan-out on the cluster: {fanout_line(on_cluster)}")
            print_cluster_fanout(f, on_cluster)
        return 0 if f.per_second >= TARGET_FANOUT_EPS and f.p99_ms <= TARGET_FANOUT_P99_MS else 1
    i = machine.run(on_private_redis(lambda url: idle_part(url, args)))
    print(
        f"idle: {i.kb_per_stream:.1f} KB per stream (target <= {TARGET_IDLE_KB:.0f} KB), "
        f"CPU {i.cpu_percent:.1f} % of a core over {i.idle_s:.1f} s"
    )
    return 0 if i.kb_per_stream <= TARGET_IDLE_KB else 1


def cluster_chats(args: argparse.Namespace) -> ChatResult:
    """The orchestrator's chats on a private cluster (``--cluster``), the same shape."""
    return machine.run(  # type: ignore[no-any-return]
        on_private_cluster(
            lambda url: chats_on_orchestrator(
                url,
                args.chats,
                args.concurrency,
                args.sessions,
                args.deltas,
                name="orchestrator (Redis Cluster)",
            )
        )
    )


async def fanout_part(redis_url: str, args: argparse.Namespace) -> FanoutResult:
    return await fanout(
        redis_url,
        sessions=args.fanout_sessions,
        per_session=args.followers,
        notices=args.notices,
        publishers=args.publishers,
        paced_s=args.paced_seconds,
    )


async def idle_part(redis_url: str, args: argparse.Namespace) -> IdleResult:
    return await idle_streams(
        redis_url,
        sessions=args.idle_sessions,
        per_session=args.idle_followers,
        idle_s=args.idle_seconds,
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.serve_child:
        machine.run(serve_child(*args.serve_child))
        return 0
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("server.app").setLevel(logging.ERROR)
    if args.only == "chats":
        rounds, limits = machine.run(on_private_redis(lambda url: chats(url, args)))
        print_chats(rounds, limits, cluster_chats(args) if args.cluster else None)
        return 0 if rounds.ratio >= TARGET_CHAT_RATIO else 1
    if args.only in ("fanout", "idle"):
        return run_part(args)
    results = machine.run(on_private_redis(lambda url: measure(url, args)))
    print_results(results)
    if args.cluster:
        print_cluster_chats(median_run(results.chats.orchestrator), cluster_chats(args))
        on_cluster = machine.run(on_private_cluster(lambda url: fanout_part(url, args)))
        print_cluster_fanout(results.fanout, on_cluster)
    return 0 if all(results.verdicts().values()) else 1


if __name__ == "__main__":
    sys.exit(main())
