"""The domain services of a process over its backend: sessions, the chat job flow with token
budgets, the embedding cache and the chat queue, notices, batches, and the domain's background
loops. ``orchestrator serve`` (server.app) and ``orchestrator worker`` (server.workers) both
build them here, so a setting (a budget, the cache, the job limits) is applied in one place and
the two processes cannot drift; each process starts the loops it runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from domain.agent_directory import CachedAgentDirectory
from domain.batch_repair import BatchRepair
from domain.batch_runner import BatchRunner
from domain.batches import BatchExpirer, BatchManager, BatchPolicy
from domain.chat import ChatOrchestrator
from domain.dispatch import Dispatcher
from domain.embedding_cache import EmbeddingCachePolicy, EmbeddingResultCache
from domain.handoff import HandoffRecovery
from domain.internal_calls import InternalCalls, TenantRate
from domain.jobs import JobLimits
from domain.notices import NoticeProcessor
from domain.plan_runner import PlanPorts
from domain.ports.platform import AgentDirectory, ConversationStore, ToolCatalog
from domain.ports.queue import WorkQueue
from domain.ports.tracing import NO_TRACING, Tracing
from domain.queued_chat import QueuedChatRunner
from domain.reaper import JobReaper
from domain.sessions import SessionManager, SessionPolicy
from domain.usage import TokenBudget
from registry.backend import Backend
from server import metrics as metrics_module
from server.config import Settings

if TYPE_CHECKING:
    from clients.downstream import DownstreamConfig
    from clients.platform import PlatformClients

# The work queues: batch items, and chat messages that wait for their turn.
BATCH_QUEUE = "batch"
CHAT_QUEUE = "chat"


def job_limits(settings: Settings) -> JobLimits:
    return JobLimits(
        deadline_ms=int(settings.job_deadline * 1000),
        heartbeat_ms=int(settings.job_heartbeat * 1000),
        retention_ms=int(settings.job_retention * 1000),
        queue_timeout_ms=int(settings.job_queue_timeout * 1000),
        handoff_grace_ms=int(settings.handoff_grace * 1000),
        handoff_attempts=settings.handoff_attempts,
        max_internal_calls=settings.internal_max_calls,
        caps=settings.service_caps(),
    )


def downstream_config(settings: Settings) -> DownstreamConfig:
    """Where the platform's services are and how calls to them are retried. An address left
    unset is the Query Service's (where the embedded reference serves every service)."""
    from clients.downstream import DownstreamConfig
    from clients.retry import RetryPolicy

    return DownstreamConfig(
        query_address=settings.query_service_address,
        embedding_address=settings.embedding_service_address,
        retry=RetryPolicy(
            attempt_timeout_s=settings.downstream_timeout,
            max_attempts=settings.downstream_attempts,
        ),
        agent_execution_address=settings.agent_execution_address or "",
        workflow_engine_address=settings.workflow_engine_address or "",
        conversation_address=settings.conversation_address or "",
        agent_management_address=settings.agent_management_address or "",
        tool_registry_address=settings.tool_registry_address or "",
    )


def default_dispatcher(settings: Settings, tracing: Tracing = NO_TRACING) -> Dispatcher:
    """gRPC clients of the configured services that run jobs (a client span per call)."""
    from clients.downstream import GrpcDispatcher

    return GrpcDispatcher(downstream_config(settings), tracing)


def default_platform(settings: Settings, tracing: Tracing = NO_TRACING) -> PlatformClients:
    """gRPC clients of the configured synchronous platform services (Agent Management,
    Conversation, Tool Registry); channels open on first use."""
    from clients.platform import PlatformClients

    return PlatformClients.connect(downstream_config(settings), tracing)


class PlatformPorts(Protocol):
    """The synchronous platform services the chat flow's plans call (clients.platform's
    PlatformClients, or a test's own)."""

    @property
    def agents(self) -> AgentDirectory: ...

    @property
    def conversation(self) -> ConversationStore: ...

    @property
    def tools(self) -> ToolCatalog: ...


def session_policy(settings: Settings) -> SessionPolicy:
    return SessionPolicy(
        default_ttl_ms=int(settings.session_default_ttl * 1000),
        max_ttl_ms=int(settings.session_max_ttl * 1000),
    )


def embedding_cache_policy(settings: Settings) -> EmbeddingCachePolicy:
    return EmbeddingCachePolicy(
        ttl_ms=int(settings.embedding_cache_ttl * 1000),
        model_version=settings.embedding_model_version,
    )


def batch_policy(settings: Settings) -> BatchPolicy:
    return BatchPolicy(
        max_items=settings.batch_max_items,
        default_window_ms=int(settings.batch_completion_window * 1000),
        max_window_ms=int(settings.batch_max_completion_window * 1000),
    )


def agent_directory(
    settings: Settings, backend: Backend, agents: AgentDirectory
) -> CachedAgentDirectory:
    """Agent Management (``agents``) behind the backend's shared agent cache."""
    return CachedAgentDirectory(
        agents,
        backend.agent_cache,
        ttl_ms=int(settings.agent_cache_ttl * 1000),
        metrics=metrics_module,
    )


@dataclass(slots=True)
class Services:
    """The domain services of one process (and the loops they need, not started)."""

    limits: JobLimits
    sessions: SessionManager
    embedding_cache: EmbeddingResultCache
    notices: NoticeProcessor
    chat_queue: WorkQueue
    chat: ChatOrchestrator
    chat_runner: QueuedChatRunner
    batch_queue: WorkQueue
    batches: BatchManager
    batch_runner: BatchRunner
    # Agents are read through the shared agent cache (domain.agent_directory), never straight
    # from Agent Management.
    agents_directory: CachedAgentDirectory
    # The internal API's calls (child jobs of the jobs platform services run).
    internal_calls: InternalCalls
    # Background loops: each process starts the ones it runs.
    reaper: JobReaper
    handoffs: HandoffRecovery
    expirer: BatchExpirer
    batch_repair: BatchRepair
    # Spans in jobs' traces: handlers working for a job call ``tracing.job_span``.
    tracing: Tracing = NO_TRACING


def build_services(
    settings: Settings,
    backend: Backend,
    dispatcher: Dispatcher,
    platform: PlatformPorts,
    *,
    tracing: Tracing = NO_TRACING,
) -> Services:
    """Every domain service over ``backend``; no I/O happens here. ``platform`` is
    default_platform(settings) unless a test gives its own. ``tracing``: spans in jobs'
    traces (server.tracing), kept as ``Services.tracing`` for handlers that work for a job."""
    limits = job_limits(settings)
    agents = agent_directory(settings, backend, platform.agents)
    sessions = SessionManager(
        backend.sessions,
        session_policy(settings),
        agents=agents if settings.agent_check else None,
        conversation=platform.conversation,
    )
    cache = EmbeddingResultCache(backend.embedding_cache, embedding_cache_policy(settings))
    chat_queue = backend.work_queue(CHAT_QUEUE)
    budget = TokenBudget(backend.usage, settings.budget_rules())
    chat = ChatOrchestrator(
        sessions,
        backend.jobs,
        backend.events,
        dispatcher,
        limits,
        budget=budget,
        embedding_cache=cache,
        queue=chat_queue,
        tracing=tracing,
        # Plans call the platform's services; without them a message is one call.
        platform=(
            PlanPorts(agents, platform.conversation, platform.tools) if settings.plans else None
        ),
    )
    batch_queue = backend.work_queue(BATCH_QUEUE)
    batches = BatchManager(
        backend.batches,
        batch_queue,
        sessions,
        chat,
        batch_policy(settings),
        session_max_ttl_ms=int(settings.session_max_ttl * 1000),
    )
    return Services(
        limits=limits,
        sessions=sessions,
        embedding_cache=cache,
        notices=NoticeProcessor(
            backend.jobs,
            limits,
            embedding_cache=cache,
            metrics=metrics_module,
            # Agent Management's agent_changed notices drop the agent in the shared cache.
            on_agent_changed=agents.on_agent_changed,
            # A completed notice that made a job FINISHING: this process appends its turns.
            on_finishing=chat.finalize_soon,
            # A notice applied here spares a hand-off of this process its confirmation.
            on_handed_over=chat.notice_applied,
            tracing=tracing,
        ),
        chat_queue=chat_queue,
        chat=chat,
        chat_runner=QueuedChatRunner(chat, tracing),
        batch_queue=batch_queue,
        batches=batches,
        batch_runner=BatchRunner(backend.batches, batches, chat, tracing),
        agents_directory=agents,
        internal_calls=InternalCalls(
            backend.sessions,
            backend.jobs,
            backend.events,
            chat,
            limits,
            budget=budget,
            embedding_cache=cache,
            # The job's tenant pays a request of its rate for each call (the edge charged the
            # calling service key's tenant already).
            rate=(
                TenantRate(backend.rate_limiter, settings.rate_limit_rules())
                if settings.rate_limit_enabled
                else None
            ),
            tracing=tracing,
        ),
        reaper=JobReaper(backend.jobs, limits, interval_s=settings.reaper_interval),
        # Hands over again the jobs whose hand-off was interrupted (in any process).
        handoffs=HandoffRecovery(chat, interval_s=settings.reaper_interval),
        expirer=BatchExpirer(backend.batches, batches, interval_s=settings.batch_expiry_interval),
        # After a failover: settles the batch items whose result the promoted replica lacks.
        batch_repair=BatchRepair(backend.batches, batch_queue, backend.jobs),
        tracing=tracing,
    )
