"""The operator RPCs of orchestrator.admin.v1.AdminService (ListTasks, GetStats, dead letters,
sessions, batches, RevokeTenantKeys): protobuf <-> domain.operator, on top of the key, task
and usage RPCs of handlers.admin. Every method is an audited admin RPC (handlers.audit)."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from domain.admin import AdminQueries
from domain.agent_directory import CachedAgentDirectory
from domain.api_keys import ApiKeyManager
from domain.errors import InvalidArgument
from domain.jobs import JobState
from domain.operator import OperatorQueries, QueuedDeadLetter, TaskFilter
from domain.ports.queue import QueuePriority
from handlers.admin import AdminServicer, task_state_to_pb, task_to_pb
from handlers.audit import admin_rpc
from handlers.batch_converters import batch_to_pb
from handlers.call_context import Ctx
from handlers.converters import enum_to_pb, session_to_pb, timestamp_from_ms
from handlers.event_converters import event_to_pb, service_from_pb
from orchestrator.admin.v1 import admin_pb2
from orchestrator.v1 import common_pb2

_PRIORITY_TO_PB = enum_to_pb(QueuePriority, common_pb2.Priority, "PRIORITY_")
# An operator's RUNNING covers FINISHING (the plan's last calls run), as Task.state shows it.
_STATES_FROM_PB: dict[int, tuple[JobState, ...]] = {
    admin_pb2.TASK_STATE_PENDING: (JobState.PENDING,),
    admin_pb2.TASK_STATE_RUNNING: (JobState.RUNNING, JobState.FINISHING),
    admin_pb2.TASK_STATE_COMPLETED: (JobState.COMPLETED,),
    admin_pb2.TASK_STATE_FAILED: (JobState.FAILED,),
    admin_pb2.TASK_STATE_TIMED_OUT: (JobState.TIMED_OUT,),
    admin_pb2.TASK_STATE_CANCELLED: (JobState.CANCELLED,),
    admin_pb2.TASK_STATE_QUEUED: (JobState.QUEUED,),
}


def _ms(stamp: timestamp_pb2.Timestamp) -> int:
    return stamp.seconds * 1000 + stamp.nanos // 1_000_000


def task_filter_from_pb(request: admin_pb2.ListTasksRequest) -> TaskFilter:
    if len(request.states) > len(_STATES_FROM_PB):
        raise InvalidArgument.field("states", f"lists at most {len(_STATES_FROM_PB)} states")
    if len(set(request.states)) != len(request.states):
        raise InvalidArgument.field("states", "lists a state twice")
    states: set[JobState] = set()
    for number in request.states:
        found = _STATES_FROM_PB.get(number)
        if found is None:
            raise InvalidArgument.field("states", f"has an unknown or unset task state {number}")
        states.update(found)
    service = service_from_pb(request.service)
    if request.service != common_pb2.SERVICE_UNSPECIFIED and service is None:
        raise InvalidArgument.field("service", f"unknown service {request.service}")
    return TaskFilter(
        states=frozenset(states),
        service=service,
        agent_id=request.agent_id,
        session_id=request.session_id,
        created_from_ms=_ms(request.create_time_from)
        if request.HasField("create_time_from")
        else None,
        created_to_ms=_ms(request.create_time_to) if request.HasField("create_time_to") else None,
    )


def dead_letter_to_pb(found: QueuedDeadLetter, *, payload: bool) -> admin_pb2.DeadLetter:
    letter = found.letter
    return admin_pb2.DeadLetter(
        queue=found.queue,
        item_id=letter.item_id,
        tenant_id=letter.tenant_id,
        kind=letter.kind,
        batch_id=letter.batch_id or "",
        priority=_PRIORITY_TO_PB[letter.priority],
        deliveries=letter.deliveries,
        error=letter.error,
        dead_time=timestamp_from_ms(letter.dead_at_ms),
        payload=letter.payload if payload else b"",
    )


class OperatorAdminServicer(AdminServicer):
    """The whole AdminService: handlers.admin's RPCs and the operator ones."""

    def __init__(
        self,
        keys: ApiKeyManager,
        queries: AdminQueries,
        agents: CachedAgentDirectory,
        operator: OperatorQueries,
    ) -> None:
        super().__init__(keys, queries, agents)
        self._operator = operator

    @admin_rpc("tenant_id", "agent_id", "session_id")
    async def ListTasks(
        self, request: admin_pb2.ListTasksRequest, context: Ctx
    ) -> admin_pb2.ListTasksResponse:
        page = await self._operator.list_tasks(
            request.tenant_id, task_filter_from_pb(request), request.page_size, request.page_token
        )
        return admin_pb2.ListTasksResponse(
            tasks=[task_to_pb(job) for job in page.items], next_page_token=page.next_cursor or ""
        )

    @admin_rpc("tenant_id")
    async def GetStats(
        self, request: admin_pb2.GetStatsRequest, context: Ctx
    ) -> admin_pb2.GetStatsResponse:
        stats = await self._operator.stats(request.tenant_id)
        by_state: dict[int, int] = {}
        for state, count in stats.tasks.items():
            number = task_state_to_pb(state)
            by_state[number] = by_state.get(number, 0) + count
        return admin_pb2.GetStatsResponse(
            tenant_id=stats.tenant_id or "",
            tasks=[
                admin_pb2.TaskStateCount(state=number, count=count)  # type: ignore[arg-type]
                for number, count in sorted(by_state.items())
            ],
            queues=[
                admin_pb2.QueueDepth(
                    queue=entry.queue,
                    priority=_PRIORITY_TO_PB[entry.depth.priority],
                    ready=entry.depth.ready,
                    leased=entry.depth.leased,
                    delayed=entry.depth.delayed,
                    dead=entry.depth.dead,
                )
                for entry in stats.queues
            ],
            dead_letters=stats.dead_letters,
            tokens_today=stats.tokens_today,
        )

    @admin_rpc("queue", "tenant_id")
    async def ListDeadLetters(
        self, request: admin_pb2.ListDeadLettersRequest, context: Ctx
    ) -> admin_pb2.ListDeadLettersResponse:
        page = await self._operator.list_dead_letters(
            request.queue, request.tenant_id, request.page_size, request.page_token
        )
        return admin_pb2.ListDeadLettersResponse(
            dead_letters=[dead_letter_to_pb(found, payload=False) for found in page.items],
            next_page_token=page.next_cursor or "",
        )

    @admin_rpc("queue", "item_id")
    async def GetDeadLetter(
        self, request: admin_pb2.GetDeadLetterRequest, context: Ctx
    ) -> admin_pb2.GetDeadLetterResponse:
        found = await self._operator.get_dead_letter(request.queue, request.item_id)
        return admin_pb2.GetDeadLetterResponse(dead_letter=dead_letter_to_pb(found, payload=True))

    @admin_rpc("queue", "item_id")
    async def RedriveDeadLetter(
        self, request: admin_pb2.RedriveDeadLetterRequest, context: Ctx
    ) -> admin_pb2.RedriveDeadLetterResponse:
        found = await self._operator.redrive(request.queue, request.item_id)
        return admin_pb2.RedriveDeadLetterResponse(
            dead_letter=dead_letter_to_pb(found, payload=False)
        )

    @admin_rpc("tenant_id", "session_id")
    async def GetSession(
        self, request: admin_pb2.GetSessionRequest, context: Ctx
    ) -> admin_pb2.GetSessionResponse:
        session = await self._operator.get_session(request.tenant_id, request.session_id)
        return admin_pb2.GetSessionResponse(session=session_to_pb(session))

    @admin_rpc("tenant_id", "session_id")
    async def ListSessionEvents(
        self, request: admin_pb2.ListSessionEventsRequest, context: Ctx
    ) -> admin_pb2.ListSessionEventsResponse:
        page, token = await self._operator.list_session_events(
            request.tenant_id, request.session_id, request.page_size, request.page_token
        )
        return admin_pb2.ListSessionEventsResponse(
            events=[event_to_pb(event) for event in page.events],
            next_page_token=token or "",
            last_sequence=page.last_sequence,
        )

    @admin_rpc("tenant_id", "batch_id")
    async def GetBatch(
        self, request: admin_pb2.GetBatchRequest, context: Ctx
    ) -> admin_pb2.GetBatchResponse:
        batch = await self._operator.get_batch(request.tenant_id, request.batch_id)
        return admin_pb2.GetBatchResponse(batch=batch_to_pb(batch))

    @admin_rpc("tenant_id")
    async def RevokeTenantKeys(
        self, request: admin_pb2.RevokeTenantKeysRequest, context: Ctx
    ) -> admin_pb2.RevokeTenantKeysResponse:
        revoked = await self._operator.revoke_tenant_keys(request.tenant_id)
        return admin_pb2.RevokeTenantKeysResponse(revoked_key_ids=revoked)
