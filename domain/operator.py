"""Operator reads and repairs for the admin API (admin role only): a tenant's tasks with filters,
counts per tenant and global, the work queues' dead letters (list, inspect, redrive), any
session, its events and any batch of a tenant, and revoking every key of a tenant.

Listing tasks reads the job store's per-tenant index (newest first) and filters the jobs it
names; one call looks at no more than ``TASK_SCAN_BUDGET`` index entries, so a page may come
back short (even empty) with a page token when few tasks match: the caller keeps paging.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from domain.batch_models import Batch
from domain.batches import BatchManager, require_batch_id
from domain.errors import InvalidArgument, NotFound
from domain.ids import is_resource_id, open_page_token, require_tenant_id, seal_page_token
from domain.jobs import UNFINISHED_STATES, EventPage, Job, JobState
from domain.models import Page, Service, Session
from domain.ports.api_keys import ApiKeyStore
from domain.ports.events import EventLog
from domain.ports.jobs import JobStore
from domain.ports.queue import PRIORITY_ORDER, DeadLetter, PriorityDepth, WorkQueue
from domain.ports.usage import UsageStore
from domain.sessions import SessionManager, require_session_id

# ListTasks: default and largest page, index entries read per store call, and the most index
# entries one call looks at before it returns a (possibly short) page with a token.
TASK_PAGE_DEFAULT = 50
TASK_PAGE_MAX = 500
TASK_SCAN_CHUNK = 100
TASK_SCAN_BUDGET = 2_000
MAX_STATE_FILTERS = 8
MAX_AGENT_ID_LENGTH = 128
# ListDeadLetters: default and largest page, and the most dead letters one call looks at when
# it filters by tenant.
DEAD_PAGE_DEFAULT = 50
DEAD_PAGE_MAX = 500
DEAD_SCAN_BUDGET = 2_000
# ListSessionEvents: default and largest page.
EVENT_PAGE_DEFAULT = 100
EVENT_PAGE_MAX = 1_000
# RevokeTenantKeys reads the tenant's keys this many at a time.
KEY_PAGE = 500
MAX_ITEM_ID_LENGTH = 128
_MAX_INDEX_DIGITS = 7


def bounded_page(page_size: int, default: int, maximum: int) -> int:
    if page_size < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return min(page_size or default, maximum)


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """Which tasks ListTasks returns; every unset filter matches all."""

    states: frozenset[JobState] = frozenset()
    service: Service | None = None
    agent_id: str = ""
    session_id: str = ""
    created_from_ms: int | None = None
    created_to_ms: int | None = None

    def validate(self) -> None:
        if len(self.states) > MAX_STATE_FILTERS:
            raise InvalidArgument.field("states", f"lists at most {MAX_STATE_FILTERS} states")
        if len(self.agent_id) > MAX_AGENT_ID_LENGTH:
            raise InvalidArgument.field(
                "agent_id", f"must be at most {MAX_AGENT_ID_LENGTH} characters"
            )
        if self.session_id:
            require_session_id(self.session_id)
        if (
            self.created_from_ms is not None
            and self.created_to_ms is not None
            and self.created_from_ms >= self.created_to_ms
        ):
            raise InvalidArgument.field("create_time_to", "must be after create_time_from")

    def matches(self, job: Job) -> bool:
        return (
            (not self.states or job.state in self.states)
            and (self.service is None or job.service is self.service)
            and (not self.agent_id or job.agent_id == self.agent_id)
            and (not self.session_id or job.session_id == self.session_id)
        )

    def fingerprint(self) -> str:
        """What a page token is bound to: the same filters must come with it."""
        return "|".join(
            [
                ",".join(sorted(state.value for state in self.states)),
                self.service.value if self.service else "",
                self.agent_id,
                self.session_id,
                str(self.created_from_ms),
                str(self.created_to_ms),
            ]
        )


@dataclass(frozen=True, slots=True)
class QueueDepth:
    queue: str
    depth: PriorityDepth


@dataclass(frozen=True, slots=True)
class Stats:
    """GetStats: for one tenant, or for all (tenant_id None)."""

    tenant_id: str | None
    tasks: Mapping[JobState, int]
    queues: list[QueueDepth] = field(default_factory=list)
    dead_letters: int = 0
    tokens_today: int = 0


@dataclass(frozen=True, slots=True)
class QueuedDeadLetter:
    queue: str
    letter: DeadLetter


_DAY_MS = 86_400_000


class OperatorQueries:
    """Cross-tenant reads and repairs for the admin service."""

    def __init__(
        self,
        *,
        jobs: JobStore,
        usage: UsageStore,
        queues: Mapping[str, WorkQueue],
        sessions: SessionManager,
        events: EventLog,
        batches: BatchManager,
        keys: ApiKeyStore,
    ) -> None:
        self._jobs = jobs
        self._usage = usage
        self._queues = dict(queues)
        self._sessions = sessions
        self._events = events
        self._batches = batches
        self._keys = keys

    # Tasks ----------------------------------------------------------------------------------

    async def list_tasks(
        self, tenant_id: str, task_filter: TaskFilter, page_size: int, page_token: str
    ) -> Page[Job]:
        require_tenant_id(tenant_id)
        task_filter.validate()
        limit = bounded_page(page_size, TASK_PAGE_DEFAULT, TASK_PAGE_MAX)
        cursor: tuple[int, str] | None = None
        if page_token:
            owner, fingerprint, created, job_id = open_page_token(page_token, "t", "f", "c", "j")
            if owner != tenant_id or fingerprint != task_filter.fingerprint():
                raise InvalidArgument.field(
                    "page_token", "belongs to another tenant or other filters"
                )
            if not isinstance(created, int) or not isinstance(job_id, str):
                raise InvalidArgument.field("page_token", "is not a valid page token")
            cursor = (created, job_id)
        found: list[Job] = []
        scanned = 0
        exhausted = False
        while len(found) < limit and scanned < TASK_SCAN_BUDGET:
            entries = await self._jobs.list_tenant_jobs(
                tenant_id,
                before=cursor,
                created_from_ms=task_filter.created_from_ms,
                created_to_ms=task_filter.created_to_ms,
                limit=min(TASK_SCAN_CHUNK, TASK_SCAN_BUDGET - scanned),
            )
            if not entries:
                exhausted = True
                break
            records = await self._jobs.get_jobs(tenant_id, [job_id for _, job_id in entries])
            for entry, job in zip(entries, records, strict=True):
                scanned += 1
                cursor = entry
                if job is not None and task_filter.matches(job):
                    found.append(job)
                    if len(found) == limit:
                        break
        token = None
        if not exhausted and cursor is not None:
            token = seal_page_token(
                {"t": tenant_id, "f": task_filter.fingerprint(), "c": cursor[0], "j": cursor[1]}
            )
        return Page(found, token)

    # Stats ----------------------------------------------------------------------------------

    async def stats(self, tenant_id: str) -> Stats:
        """Counts for ``tenant_id``, or for every tenant when it is empty."""
        scope = require_tenant_id(tenant_id) if tenant_id else None
        if scope is None:
            tasks = await self._jobs.count_unfinished()
        else:
            tasks = await self._jobs.count_unfinished_of(scope)
        queues: list[QueueDepth] = []
        for name, queue in sorted(self._queues.items()):
            queues += [QueueDepth(name, depth) for depth in await queue.depth(scope)]
        dead = sum(entry.depth.dead for entry in queues)
        if scope is not None:
            tokens = await self._usage.tokens_today(scope)
        else:
            now_ms = int(time.time() * 1000)
            # A job completing today started today or yesterday (deadlines are far shorter).
            since = (now_ms // _DAY_MS - 1) * _DAY_MS
            tokens = 0
            for tenant in sorted(await self._jobs.tenants_started_since(since)):
                tokens += await self._usage.tokens_today(tenant)
        counts = {state: tasks.get(state, 0) for state in UNFINISHED_STATES}
        return Stats(scope, counts, queues, dead, tokens)

    # Dead letters ---------------------------------------------------------------------------

    def _queue(self, name: str) -> WorkQueue:
        if not name:
            raise InvalidArgument.field(
                "queue", f"is required: one of {', '.join(sorted(self._queues))}"
            )
        queue = self._queues.get(name)
        if queue is None:
            raise InvalidArgument.field(
                "queue", f"must be one of {', '.join(sorted(self._queues))}"
            )
        return queue

    @staticmethod
    def _item_id(item_id: str) -> str:
        """A work item id: a job id (queued messages) or ``<batch id>/<index>`` (batch items)."""
        if not item_id:
            raise InvalidArgument.field("item_id", "is required")
        head, slash, index = item_id.partition("/")
        if (
            len(item_id) > MAX_ITEM_ID_LENGTH
            or not is_resource_id(head)
            or (slash and not (index.isdigit() and len(index) <= _MAX_INDEX_DIGITS))
        ):
            raise InvalidArgument.field(
                "item_id", "is not a valid item id (a job id, or <batch id>/<index>)"
            )
        return item_id

    async def list_dead_letters(
        self, queue_name: str, tenant_id: str, page_size: int, page_token: str
    ) -> Page[QueuedDeadLetter]:
        queue = self._queue(queue_name)
        scope = require_tenant_id(tenant_id) if tenant_id else ""
        limit = bounded_page(page_size, DEAD_PAGE_DEFAULT, DEAD_PAGE_MAX)
        after: str | None = None
        if page_token:
            owner, name, position = open_page_token(page_token, "t", "q", "p")
            if owner != scope or name != queue_name or not isinstance(position, str):
                raise InvalidArgument.field("page_token", "belongs to another queue or tenant")
            after = position
        found: list[QueuedDeadLetter] = []
        scanned = 0
        more = True
        while more and len(found) < limit and scanned < DEAD_SCAN_BUDGET:
            # Without a tenant filter every letter read is returned: read just the page.
            want = limit - len(found) if not scope else DEAD_SCAN_BUDGET - scanned
            letters = await queue.list_dead(limit=min(want, DEAD_PAGE_MAX), after=after)
            more = len(letters) == min(want, DEAD_PAGE_MAX)
            for i, letter in enumerate(letters):
                scanned += 1
                after = letter.position
                if not scope or letter.tenant_id == scope:
                    found.append(QueuedDeadLetter(queue_name, letter))
                    if len(found) == limit:
                        more = more or i < len(letters) - 1
                        break
        token = None
        if more and after is not None:
            token = seal_page_token({"t": scope, "q": queue_name, "p": after})
        return Page(found, token)

    async def get_dead_letter(self, queue_name: str, item_id: str) -> QueuedDeadLetter:
        queue = self._queue(queue_name)
        letter = await queue.get_dead(self._item_id(item_id))
        if letter is None:
            raise NotFound(f"no dead letter {item_id} in the {queue_name} queue")
        return QueuedDeadLetter(queue_name, letter)

    async def redrive(self, queue_name: str, item_id: str) -> QueuedDeadLetter:
        """Put a dead letter back in its queue (deliveries reset); NotFound when it is not
        (or no longer) dead-lettered, for instance when another operator redrove it first."""
        queue = self._queue(queue_name)
        letter = await queue.get_dead(self._item_id(item_id))
        if letter is None or not await queue.redrive(item_id):
            raise NotFound(f"no dead letter {item_id} in the {queue_name} queue")
        return QueuedDeadLetter(queue_name, letter)

    # Sessions and batches -------------------------------------------------------------------

    async def get_session(self, tenant_id: str, session_id: str) -> Session:
        """The session as stored; reading it does not slide its expiry (as a client's read
        does). NotFound for missing ids and ids of another tenant."""
        require_tenant_id(tenant_id)
        session = await self._sessions.peek(tenant_id, require_session_id(session_id))
        if session is None:
            raise NotFound(f"session {session_id} not found for tenant {tenant_id}")
        return session

    async def list_session_events(
        self, tenant_id: str, session_id: str, page_size: int, page_token: str
    ) -> tuple[EventPage, str | None]:
        """The session's retained events after the token's sequence, oldest first, and the
        next page's token (None when no newer event is stored yet)."""
        require_tenant_id(tenant_id)
        require_session_id(session_id)
        limit = bounded_page(page_size, EVENT_PAGE_DEFAULT, EVENT_PAGE_MAX)
        after = 0
        if page_token:
            owner, session, sequence = open_page_token(page_token, "t", "s", "q")
            if owner != tenant_id or session != session_id or not isinstance(sequence, int):
                raise InvalidArgument.field("page_token", "belongs to another session")
            after = sequence
        # NotFound for a session that does not exist (or belongs to another tenant).
        await self.get_session(tenant_id, session_id)
        page = await self._events.read_after(tenant_id, session_id, after, limit=limit)
        token = None
        if page.events and page.events[-1].sequence < page.last_sequence:
            token = seal_page_token(
                {"t": tenant_id, "s": session_id, "q": page.events[-1].sequence}
            )
        return page, token

    async def get_batch(self, tenant_id: str, batch_id: str) -> Batch:
        require_tenant_id(tenant_id)
        return await self._batches.get(tenant_id, require_batch_id(batch_id))

    # Keys -----------------------------------------------------------------------------------

    async def revoke_tenant_keys(self, tenant_id: str) -> list[str]:
        """Revoke every live key of the tenant; the ids this call revoked, in id order."""
        require_tenant_id(tenant_id)
        live: list[str] = []
        after: str | None = None
        while True:
            page = await self._keys.list_keys(tenant_id, limit=KEY_PAGE, after=after)
            live += [key.key_id for key in page.items if not key.revoked]
            if page.next_cursor is None:
                break
            after = page.next_cursor
        revoked: list[str] = []
        for key_id in live:
            record = await self._keys.revoke_key(key_id)
            if record is not None and record.revoked:
                revoked.append(key_id)
        return revoked


__all__ = [
    "PRIORITY_ORDER",
    "OperatorQueries",
    "QueueDepth",
    "QueuedDeadLetter",
    "Stats",
    "TaskFilter",
]
