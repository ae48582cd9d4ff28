"""The work queue machinery of one process: the ``batch`` queue with its manager, expiry sweeper
and worker, and the ``chat`` queue of queued chat messages with its worker. The server embeds
it; ``orchestrator worker`` runs only the workers against Redis."""

from __future__ import annotations

import asyncio
import logging

from domain.batch_runner import BatchRunner
from domain.batches import BatchExpirer, BatchManager, BatchPolicy
from domain.chat import ChatOrchestrator
from domain.dispatch import Dispatcher
from domain.embedding_cache import EmbeddingCachePolicy, EmbeddingResultCache
from domain.handoff import HandoffRecovery
from domain.jobs import JobLimits
from domain.ports.queue import WorkQueue
from domain.queued_chat import QueuedChatRunner
from domain.sessions import SessionManager, SessionPolicy
from domain.usage import TokenBudget
from domain.worker import DeadLetterHook, Handler, QueueWorker
from registry.backends import Registry, open_registry
from registry.queues import OpenedQueue, open_work_queue
from server.backend_config import registry_config
from server.config import Settings
from server.signals import wait_for_stop_signal

log = logging.getLogger(__name__)

BATCH_QUEUE = "batch"
CHAT_QUEUE = "chat"


def open_queue(settings: Settings, name: str) -> OpenedQueue:
    """One named work queue on the configured backend."""
    return open_work_queue(
        settings.redis_url,
        key_prefix=settings.redis_key_prefix,
        queue=name,
        socket_timeout_s=settings.redis_socket_timeout,
        connect_timeout_s=settings.redis_connect_timeout,
        max_connections=settings.redis_max_connections,
    )


def session_manager(registry: Registry, settings: Settings) -> SessionManager:
    return SessionManager(
        registry.sessions,
        SessionPolicy(
            default_ttl_ms=int(settings.session_default_ttl * 1000),
            max_ttl_ms=int(settings.session_max_ttl * 1000),
        ),
    )


def embedding_cache(registry: Registry, settings: Settings) -> EmbeddingResultCache:
    return EmbeddingResultCache(
        registry.embedding_cache,
        EmbeddingCachePolicy(
            ttl_ms=int(settings.embedding_cache_ttl * 1000),
            model_version=settings.embedding_model_version,
        ),
    )


def chat_orchestrator(
    settings: Settings,
    registry: Registry,
    sessions: SessionManager,
    dispatcher: Dispatcher,
    limits: JobLimits,
    cache: EmbeddingResultCache,
    chat_queue: WorkQueue,
) -> ChatOrchestrator:
    """The chat job flow as every process that starts work runs it (servers and
    ``orchestrator worker``): token budgets, the embedding cache and the chat queue."""
    return ChatOrchestrator(
        sessions,
        registry.jobs,
        registry.events,
        dispatcher,
        limits,
        budget=TokenBudget(registry.usage, settings.budget_rules()),
        embedding_cache=cache,
        queue=chat_queue,
    )


def batch_policy(settings: Settings) -> BatchPolicy:
    return BatchPolicy(
        max_items=settings.batch_max_items,
        default_window_ms=int(settings.batch_completion_window * 1000),
        max_window_ms=int(settings.batch_max_completion_window * 1000),
    )


class BatchStack:
    """Batch queue, manager, expirer and (once started) workers of both queues over one
    registry. ``chat_queue`` is the queue ``chat`` enqueues queued messages on; the stack
    closes it."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        sessions: SessionManager,
        chat: ChatOrchestrator,
        chat_queue: OpenedQueue,
    ) -> None:
        self.settings = settings
        self.opened: OpenedQueue = open_queue(settings, BATCH_QUEUE)
        self.chat_queue = chat_queue
        self.chat_runner = QueuedChatRunner(chat)
        self.chat_worker: QueueWorker | None = None
        self._chat_worker_task: asyncio.Task[None] | None = None
        self.manager = BatchManager(
            registry.batches,
            self.opened.queue,
            sessions,
            chat,
            batch_policy(settings),
            session_max_ttl_ms=int(settings.session_max_ttl * 1000),
        )
        self.runner = BatchRunner(registry.batches, self.manager, chat)
        self.expirer = BatchExpirer(
            registry.batches, self.manager, interval_s=settings.batch_expiry_interval
        )
        self.worker: QueueWorker | None = None
        self._worker_task: asyncio.Task[None] | None = None

    def start_worker(self, concurrency: int | None = None) -> QueueWorker:
        """Start leasing and running batch items in this process."""
        if self.worker is None:
            self.worker, self._worker_task = self._run_worker(
                "batch",
                self.opened.queue,
                self.runner.handle,
                self.runner.dead_lettered,
                concurrency or self.settings.batch_worker_concurrency,
            )
        return self.worker

    def start_chat_worker(self, concurrency: int | None = None) -> QueueWorker:
        """Start running queued chat messages in this process."""
        if self.chat_worker is None:
            self.chat_worker, self._chat_worker_task = self._run_worker(
                "chat",
                self.chat_queue.queue,
                self.chat_runner.handle,
                self.chat_runner.dead_lettered,
                concurrency or self.settings.chat_worker_concurrency,
            )
        return self.chat_worker

    def _run_worker(
        self,
        name: str,
        queue: WorkQueue,
        handler: Handler,
        on_dead_letter: DeadLetterHook,
        concurrency: int,
    ) -> tuple[QueueWorker, asyncio.Task[None]]:
        worker = QueueWorker(
            queue,
            handler,
            concurrency=concurrency,
            on_dead_letter=on_dead_letter,
            lease_s=self.settings.batch_worker_lease,
            poll_s=self.settings.batch_worker_poll,
            grace_s=self.settings.shutdown_grace,
        )
        task = asyncio.create_task(worker.run(), name=f"{name}-worker")
        log.info("%s worker %s started (concurrency %d)", name, worker.consumer, concurrency)
        return worker, task

    async def stop_worker(self) -> None:
        """Stop leasing; running items get the shutdown grace, then go back to the queue."""
        for worker in (self.worker, self.chat_worker):
            if worker is not None:
                worker.stop()
        tasks = [t for t in (self._worker_task, self._chat_worker_task) if t is not None]
        self._worker_task = self._chat_worker_task = None
        await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        await self.stop_worker()
        await self.expirer.stop()
        await self.opened.aclose()
        await self.chat_queue.aclose()


async def run_workers(settings: Settings, dispatcher: Dispatcher, limits: JobLimits) -> None:
    """``orchestrator worker``: run batch items and queued chat messages against REDIS_URL
    until SIGTERM/SIGINT."""
    if not settings.redis_url:
        raise ValueError("orchestrator worker needs REDIS_URL (workers share the queue)")
    registry = open_registry(registry_config(settings))
    sessions = session_manager(registry, settings)
    chat_queue = open_queue(settings, CHAT_QUEUE)
    cache = embedding_cache(registry, settings)
    chat = chat_orchestrator(
        settings, registry, sessions, dispatcher, limits, cache, chat_queue.queue
    )
    stack = BatchStack(settings, registry, sessions, chat, chat_queue)
    # Workers hand jobs over too, so they also redo interrupted hand-offs (of any process).
    handoffs = HandoffRecovery(chat, interval_s=settings.reaper_interval)
    handoffs.start()
    stack.start_worker()
    stack.start_chat_worker()
    try:
        await wait_for_stop_signal()
    finally:
        log.info("worker stopping")
        await handoffs.stop()
        await stack.aclose()
        await chat.drain(settings.shutdown_grace)
        await dispatcher.aclose()
        await registry.aclose()
