"""Chats of the demo agents end to end, the orchestrator against a bare grpc.aio relay making
the same hops, in one run.

Two shapes, each a closed loop of SendMessage until the final event at a fixed concurrency:

- ``tool_agent``: sessions on ``tool-bot`` of tenant ``demo``, a message that makes the agent
  call the calculator and the clock. The plan: load the agent (Agent Management, cached) ->
  ListHistory (Conversation) -> ResolveTools (Tool Registry) -> StartRun (Agent Execution,
  which reports tool calls, deltas and the completion over ReportUpdates) -> AppendTurns
  (Conversation) -> the final ``completed`` event.
- ``llm``: sessions on ``support-bot``: GetAgent -> ListHistory -> SubmitQuery (Query) ->
  AppendTurns -> ``completed``. Its figure must not fall because of the plan machinery.

The servers under test run as child processes of their own, each beside its own embedded
reference services in the same event loop (as ``make run`` embeds them), with step delay 0:

- the orchestrator on a private redis-server (agent check on, test keys), whatever the checked
  out code makes of a chat: where it has ORCH_PLANS, twice (two children on the one Redis):
  with plans and without (one Query call per chat, whatever the agent), so the llm figure with
  the plan machinery is measured beside the one without; before plans only the latter;
- the bare relay (:class:`PlanRelay`): SessionService.CreateSession into a dict, SendMessage
  making the plan's hops one after the other with plain generated stubs (GetAgent on every
  chat: no cache, no Redis, no auth, no interceptors), the notices back over its own
  ReportUpdates into a queue per job, relayed to the client as chat events, then AppendTurns
  and the final event. Agent Execution's LLM call (the internal API's StreamComplete) is
  relayed the same way: SubmitQuery, Query's notices back as deltas and the final message.

This process only drives the clients. Rounds alternate the order of the servers (relay first,
then orchestrator first, ...), so drift and noise from other processes land on both alike;
each figure is the median over the rounds, the ratio the median of the per-round paired
ratios. Server CPU per chat is the child's utime+stime over the measured chats (its
reference services included, alike for both); the orchestrator's redis-server CPU (INFO cpu)
is shown beside it.

``python -m bench.plan_bench [--chats N] [--rounds N] ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import statistics
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import redis.asyncio as redis_asyncio

from agent_execution.v1 import agent_execution_pb2, agent_execution_pb2_grpc
from agents.v1 import agents_pb2, agents_pb2_grpc
from bench import machine
from bench.flow_bench import (
    FINAL_NOTICES,
    NOTICE,
    TARGET_CHAT_RATIO,
    ChatResult,
    NoticeQueues,
    create_sessions,
    drive_chats,
    reference_config,
    relay_event,
)
from bench.machine import Limits
from bench.options import chat_load_parser
from bench.processes import (
    Child,
    bench_settings,
    loopback_server,
    on_private_redis,
    start_serving,
    until_sigterm,
)
from bench.tables import print_table, quotient
from conversation.v1 import conversation_pb2, conversation_pb2_grpc
from orchestrator.internal.v1 import platform_pb2, platform_pb2_grpc
from orchestrator.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    task_update_pb2_grpc,
)
from query.v1 import query_pb2, query_pb2_grpc
from reference.app import ReferenceServices
from server.config import Settings
from tests.support.redis_process import free_port
from tests.support.servers import running_server, tenant
from tools.v1 import tools_pb2, tools_pb2_grpc

TENANT = "demo"
DOWNSTREAM_TIMEOUT_S = 5.0
RELAY = "bare grpc.aio relay"
ORCHESTRATOR = "orchestrator (Redis)"
# The setting that runs chats as plans (ORCH_PLANS), where the code has it.
PLANS_SETTING = "plans"


@dataclass(frozen=True, slots=True)
class Shape:
    """A kind of chat: the demo agent its sessions talk to and the message sent."""

    name: str
    agent_id: str
    content: str


SHAPES = (
    Shape("tool_agent", "tool-bot", "What is 6 * 7 + 1, and what time is it?"),
    Shape("llm", "support-bot", "What is RAG?"),
)


# -- the bare relay -------------------------------------------------------------------------------


class PlanRelay(
    session_pb2_grpc.SessionServiceServicer,
    chat_pb2_grpc.ChatServiceServicer,
    platform_pb2_grpc.PlatformServiceServicer,
    NoticeQueues,
):
    """The plan's hops with nothing in between but dicts: sessions (id -> agent id) and a
    queue of notices per job in flight."""

    def __init__(self, platform_address: str) -> None:
        super().__init__()
        self._platform_address = platform_address
        self._channel: grpc.aio.Channel | None = None
        self._sessions: dict[str, str] = {}

    def _stubs(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self._platform_address)
        return self._channel

    async def CreateSession(
        self, request: session_pb2.CreateSessionRequest, context: Any
    ) -> session_pb2.CreateSessionResponse:
        session_id = uuid.uuid4().hex
        self._sessions[session_id] = request.agent_id
        return session_pb2.CreateSessionResponse(
            session=session_pb2.Session(session_id=session_id, agent_id=request.agent_id)
        )

    async def SendMessage(
        self, request: chat_pb2.SendMessageRequest, context: Any
    ) -> AsyncIterator[chat_pb2.SendMessageResponse]:
        session_id = request.session_id
        agent_id = self._sessions.get(session_id)
        if agent_id is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "session_id: no such session")
            return
        job_id = uuid.uuid4().hex
        with self.waiting(job_id) as queue:
            yield chat_pb2.SendMessageResponse(
                event=chat_pb2.ChatEvent(
                    session_id=session_id,
                    job_id=job_id,
                    sequence=1,
                    accepted=chat_pb2.JobAccepted(content=request.content),
                )
            )
            await self._start(session_id, agent_id, job_id, request.content)
            while True:
                notice = await queue.get()
                if notice.event == NOTICE.NOTICE_EVENT_COMPLETED:
                    await self._append(session_id, job_id, request.content, notice.result.text)
                yield chat_pb2.SendMessageResponse(event=relay_event(session_id, job_id, notice))
                if notice.event in FINAL_NOTICES:
                    return

    async def _start(self, session_id: str, agent_id: str, job_id: str, content: str) -> None:
        """GetAgent -> ListHistory -> (ResolveTools -> StartRun) or SubmitQuery."""
        channel = self._stubs()
        reply = await agents_pb2_grpc.AgentManagementServiceStub(channel).GetAgent(
            agents_pb2.GetAgentRequest(tenant_id=TENANT, agent_id=agent_id),
            timeout=DOWNSTREAM_TIMEOUT_S,
        )
        agent = reply.agent
        history = await conversation_pb2_grpc.ConversationServiceStub(channel).ListHistory(
            conversation_pb2.ListHistoryRequest(
                tenant_id=TENANT,
                session_id=session_id,
                last_turns=agent.limits.max_history_turns,
                token_budget=agent.limits.max_history_tokens,
            ),
            timeout=DOWNSTREAM_TIMEOUT_S,
        )
        if agent.kind == agents_pb2.AGENT_KIND_TOOL_AGENT:
            tools = await tools_pb2_grpc.ToolRegistryServiceStub(channel).ResolveTools(
                tools_pb2.ResolveToolsRequest(tenant_id=TENANT, names=agent.tool_names),
                timeout=DOWNSTREAM_TIMEOUT_S,
            )
            await agent_execution_pb2_grpc.AgentExecutionServiceStub(channel).StartRun(
                agent_execution_pb2.StartRunRequest(
                    tenant_id=TENANT,
                    session_id=session_id,
                    agent_id=agent_id,
                    job_id=job_id,
                    model=agent.model,
                    system_prompt=agent.system_prompt,
                    input=content,
                    history=history.turns,
                    tools=tools.tools,
                    max_tool_calls=agent.limits.max_tool_calls,
                    agent_version=agent.version,
                ),
                timeout=DOWNSTREAM_TIMEOUT_S,
            )
        elif agent.kind == agents_pb2.AGENT_KIND_LLM:
            await query_pb2_grpc.QueryServiceStub(channel).SubmitQuery(
                query_pb2.SubmitQueryRequest(
                    tenant_id=TENANT,
                    session_id=session_id,
                    prompt=content,
                    job_id=job_id,
                    model=agent.model,
                    system_prompt=agent.system_prompt,
                    history=history.turns,
                ),
                timeout=DOWNSTREAM_TIMEOUT_S,
            )
        else:
            raise RuntimeError(f"the relay runs llm and tool_agent agents, not {agent.kind}")

    async def StreamComplete(
        self, request: platform_pb2.StreamCompleteRequest, context: Any
    ) -> AsyncIterator[platform_pb2.StreamCompleteResponse]:
        """The internal API's completion: SubmitQuery, then Query's notices as deltas and the
        final message (no accounting: the relay keeps none)."""
        job_id = uuid.uuid4().hex
        with self.waiting(job_id) as queue:
            await query_pb2_grpc.QueryServiceStub(self._stubs()).SubmitQuery(
                query_pb2.SubmitQueryRequest(
                    tenant_id=request.tenant_id,
                    prompt=request.prompt,
                    job_id=job_id,
                    model=request.model,
                ),
                timeout=DOWNSTREAM_TIMEOUT_S,
            )
            while True:
                notice = await queue.get()
                if notice.event == NOTICE.NOTICE_EVENT_DELTA:
                    yield platform_pb2.StreamCompleteResponse(delta=notice.delta)
                elif notice.event == NOTICE.NOTICE_EVENT_COMPLETED:
                    final = platform_pb2.CompleteResponse(
                        call_id=request.call_id,
                        call_job_id=job_id,
                        text=notice.result.text,
                        model=notice.result.model,
                        usage=notice.usage,
                    )
                    yield platform_pb2.StreamCompleteResponse(final=final)
                    return
                elif notice.event in FINAL_NOTICES:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "the query failed")

    async def _append(self, session_id: str, job_id: str, content: str, answer: str) -> None:
        await conversation_pb2_grpc.ConversationServiceStub(self._stubs()).AppendTurns(
            conversation_pb2.AppendTurnsRequest(
                tenant_id=TENANT,
                session_id=session_id,
                job_id=job_id,
                turns=[
                    conversation_pb2.Turn(role=conversation_pb2.ROLE_USER, content=content),
                    conversation_pb2.Turn(role=conversation_pb2.ROLE_ASSISTANT, content=answer),
                ],
            ),
            timeout=DOWNSTREAM_TIMEOUT_S,
        )

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)


# -- the servers under test, each in a child process ----------------------------------------------


@contextlib.asynccontextmanager
async def embedded_reference(listen_port: int, orchestrator_port: int) -> AsyncIterator[None]:
    """The reference platform services on ``listen_port``, reporting to ``orchestrator_port``,
    answering at once (2 deltas)."""
    reference = ReferenceServices(
        reference_config(f"127.0.0.1:{listen_port}", f"127.0.0.1:{orchestrator_port}", deltas=2)
    )
    await reference.start()
    try:
        yield
    finally:
        await reference.stop()


async def serve_orchestrator(redis_url: str, plans: bool) -> None:
    """``--serve-orchestrator``: the orchestrator on Redis with the reference services embedded
    in its event loop (the Query address is where all five platform services answer); chats
    run as plans with ``plans``."""
    if plans and not has_plans_setting():
        raise SystemExit("--plans: this code has no ORCH_PLANS setting")
    reference_port = free_port()
    settings = bench_settings(
        redis_url,
        agent_check=True,
        query_service_address=f"127.0.0.1:{reference_port}",
        # Explicit both ways: the test settings under bench_settings turn plans off.
        **({PLANS_SETTING: plans} if has_plans_setting() else {}),
    )
    async with (
        running_server(settings) as running,
        embedded_reference(reference_port, running.server.port),
    ):
        await until_sigterm(running.server.port)


async def serve_relay() -> None:
    """``--serve-relay``: the bare relay with the reference services embedded likewise."""
    reference_port = free_port()
    relay = PlanRelay(f"127.0.0.1:{reference_port}")  # type: ignore[abstract]

    def register(server: grpc.aio.Server) -> None:
        session_pb2_grpc.add_SessionServiceServicer_to_server(relay, server)
        chat_pb2_grpc.add_ChatServiceServicer_to_server(relay, server)
        task_update_pb2_grpc.add_TaskUpdateServiceServicer_to_server(relay, server)
        platform_pb2_grpc.add_PlatformServiceServicer_to_server(relay, server)

    try:
        async with (
            loopback_server(register, grace_s=0.5) as port,
            embedded_reference(reference_port, port),
        ):
            await until_sigterm(port)
    finally:
        await relay.aclose()


@contextlib.contextmanager
def child(args: list[str], name: str) -> Iterator[tuple[Child, str]]:
    """``python -m bench.plan_bench <args>``: the child and its address."""
    process, port = start_serving(["bench.plan_bench", *args], name)
    with process:
        yield process, f"127.0.0.1:{port}"


# -- driving the chats ----------------------------------------------------------------------------


@dataclass
class Side:
    """One server under test: its child, a channel to it, sessions per shape and the runs
    measured on it per shape."""

    name: str
    process: Child
    channel: grpc.aio.Channel
    redis_url: str | None = None  # the backend's redis-server, whose CPU counts too
    sessions: dict[str, list[str]] = field(default_factory=dict)
    runs: dict[str, list[ChatResult]] = field(default_factory=dict)
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)
    redis_cpu_ms: dict[str, list[float]] = field(default_factory=dict)
    events: dict[str, Counter[str]] = field(default_factory=dict)

    async def prepare(self, sessions: int, concurrency: int) -> None:
        """Sessions for every shape, and one warm-up chat per worker (channels, scripts, the
        agent cache, the reporters' streams)."""
        for shape in SHAPES:
            self.sessions[shape.name] = await create_sessions(
                self.channel, sessions, agent_id=shape.agent_id, metadata=tenant(TENANT)
            )
            await self.drive(shape, concurrency, concurrency, measured=False)

    async def drive(self, shape: Shape, chats: int, concurrency: int, *, measured: bool) -> None:
        events: Counter[str] = Counter()
        redis_before = await self.redis_cpu_seconds()
        cpu_before = self.process.cpu_seconds()
        result = await drive_chats(
            self.name,
            self.channel,
            self.sessions[shape.name],
            chats,
            concurrency,
            metadata=tenant(TENANT),
            content=shape.content,
            events=events,
        )
        cpu = self.process.cpu_seconds() - cpu_before
        redis_cpu = await self.redis_cpu_seconds() - redis_before
        if measured:
            chats = max(1, result.chats)
            self.runs.setdefault(shape.name, []).append(result)
            self.cpu_ms.setdefault(shape.name, []).append(1000 * cpu / chats)
            self.redis_cpu_ms.setdefault(shape.name, []).append(1000 * redis_cpu / chats)
            self.events.setdefault(shape.name, Counter()).update(events)

    async def redis_cpu_seconds(self) -> float:
        """The redis-server's user + system CPU so far (INFO cpu); 0 without Redis."""
        if self.redis_url is None:
            return 0.0
        client = redis_asyncio.Redis.from_url(self.redis_url)
        try:
            info = await client.info("cpu")
        finally:
            await client.aclose()
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@dataclass(frozen=True, slots=True)
class ShapeFigures:
    """One shape on one side: medians over the rounds."""

    shape: str
    side: str
    rounds: int
    chats: int  # measured chats, all rounds
    per_second: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_chat: float
    redis_cpu_ms_per_chat: float
    events_per_chat: float
    tool_calls_per_chat: float


def figures(side: Side, shape: str) -> ShapeFigures:
    runs = side.runs[shape]
    chats = sum(run.chats for run in runs)
    events = side.events[shape]
    return ShapeFigures(
        shape,
        side.name,
        len(runs),
        chats,
        statistics.median(run.per_second for run in runs),
        statistics.median(run.p50_ms for run in runs),
        statistics.median(run.p99_ms for run in runs),
        statistics.median(side.cpu_ms[shape]),
        statistics.median(side.redis_cpu_ms[shape]),
        quotient(sum(events.values()), chats),
        quotient(events["tool_call"], chats),
    )


@dataclass(frozen=True, slots=True)
class Row:
    """A shape on one side; for an orchestrator, the median of its per-round ratios to the
    relay's figure of the same round."""

    figures: ShapeFigures
    ratio: float | None = None


@dataclass(frozen=True, slots=True)
class PlanResults:
    rows: list[Row]
    limits: Limits

    def verdicts(self) -> dict[str, bool]:
        return {
            f"{row.figures.shape}, {row.figures.side}": row.ratio >= TARGET_CHAT_RATIO
            for row in self.rows
            if row.ratio is not None
        }


def has_plans_setting() -> bool:
    """Whether this code can run chats as plans (ORCH_PLANS, issue 13)."""
    return PLANS_SETTING in {f.name for f in dataclasses.fields(Settings)}


def orchestrator_variants() -> list[tuple[str, bool]]:
    """(name, plans on) of each orchestrator measured: with and without plans where the code
    has them (the llm figure must not fall because of the plan machinery), else as it is."""
    if has_plans_setting():
        return [(f"{ORCHESTRATOR}, plans", True), (f"{ORCHESTRATOR}, no plans", False)]
    return [(ORCHESTRATOR, False)]


async def measure(redis_url: str, args: argparse.Namespace) -> PlanResults:
    with contextlib.ExitStack() as stack:
        relay_process, relay_address = stack.enter_context(child(["--serve-relay"], "relay"))
        relay = Side(RELAY, relay_process, grpc.aio.insecure_channel(relay_address))
        sides = [relay]
        for name, plans in orchestrator_variants():
            process, address = stack.enter_context(
                child(["--serve-orchestrator", redis_url, *(["--plans"] if plans else [])], name)
            )
            sides.append(Side(name, process, grpc.aio.insecure_channel(address), redis_url))
        try:
            for side in sides:
                await side.prepare(args.sessions, args.concurrency)
            for round_number in range(args.rounds):
                order = sides if round_number % 2 == 0 else sides[::-1]
                for shape in SHAPES:
                    for side in order:
                        await side.drive(shape, args.chats, args.concurrency, measured=True)
        finally:
            for side in sides:
                await side.channel.close(None)
    rows = []
    for shape in SHAPES:
        rows.append(Row(figures(relay, shape.name)))
        for side in sides[1:]:
            ratios = [
                quotient(o.per_second, r.per_second)
                for o, r in zip(side.runs[shape.name], relay.runs[shape.name], strict=True)
            ]
            rows.append(Row(figures(side, shape.name), statistics.median(ratios)))
    return PlanResults(rows, await machine.measure(concurrency=args.concurrency))


# -- the table ------------------------------------------------------------------------------------


def print_results(results: PlanResults) -> None:
    first = results.rows[0].figures
    print(
        f"plans: SendMessage -> final event, tenant {TENANT}, reference services embedded in "
        f"each server's process (step delay 0); medians of {first.rounds} alternating rounds"
    )
    header = (
        "shape",
        "path",
        "chats",
        "chats/s",
        "p50 ms",
        "p99 ms",
        "server CPU ms/chat",
        "+ Redis",
        "events/chat",
        "tool calls/chat",
        "ratio to relay",
        "of bare unary",
    )
    table: list[tuple[str, ...]] = [header]
    for row in results.rows:
        f = row.figures
        table.append(
            (
                f.shape,
                f.side,
                str(f.chats),
                f"{f.per_second:,.0f}",
                f"{f.p50_ms:.1f}",
                f"{f.p99_ms:.1f}",
                f"{f.cpu_ms_per_chat:.2f}",
                "" if row.ratio is None else f"{f.redis_cpu_ms_per_chat:.2f}",
                f"{f.events_per_chat:.1f}",
                f"{f.tool_calls_per_chat:.1f}",
                "" if row.ratio is None else f"{row.ratio:.2f}",
                results.limits.unary_fraction(f.per_second),
            )
        )
    table.append(
        ("", "bare grpc.aio unary echo", "", f"{results.limits.unary_per_s:,.0f}", *[""] * 6, "1")
    )
    print_table(table)
    results.limits.print_line()
    missed = [name for name, ok in results.verdicts().items() if not ok]
    print(
        f"ratio = median of the per-round orchestrator/relay chats/s; target >= "
        f"{TARGET_CHAT_RATIO}: "
        + ("met" if not missed else "BELOW TARGET for " + "; ".join(missed))
    )
    if not has_plans_setting():
        print("(this code runs no plans: the orchestrator makes one Query call per chat)")


def parser() -> argparse.ArgumentParser:
    p = chat_load_parser(None, __doc__, chats_per="shape and round")
    p.set_defaults(rounds=3, chats=600, concurrency=16)
    p.add_argument("--sessions", type=int, default=160, help="sessions per shape and server")
    p.add_argument("--serve-orchestrator", metavar="REDIS_URL")
    p.add_argument("--plans", action="store_true", help="with --serve-orchestrator: ORCH_PLANS")
    p.add_argument("--serve-relay", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.serve_orchestrator or args.serve_relay:
        logging.basicConfig(level=logging.WARNING)
        for quiet in ("server.app", "server.data_loss"):
            logging.getLogger(quiet).setLevel(logging.ERROR)
        if args.serve_relay:
            machine.run(serve_relay())
        else:
            machine.run(serve_orchestrator(args.serve_orchestrator, args.plans))
        return 0
    logging.basicConfig(level=logging.WARNING)
    results = machine.run(on_private_redis(lambda url: measure(url, args)))
    print_results(results)
    return 0 if all(results.verdicts().values()) else 1


if __name__ == "__main__":
    sys.exit(main())
