"""The batch machinery of one process: the work queue, the manager, the expiry sweeper and the
queue worker that runs items. The server embeds it; ``orchestrator worker`` runs only the
worker part against Redis."""

from __future__ import annotations

import asyncio
import logging
import signal

from domain.batch_runner import BatchRunner
from domain.batches import BatchExpirer, BatchManager, BatchPolicy
from domain.chat import ChatOrchestrator
from domain.dispatch import Dispatcher
from domain.jobs import JobLimits
from domain.sessions import SessionManager, SessionPolicy
from domain.worker import QueueWorker
from registry.backends import Registry, open_registry
from registry.queues import OpenedQueue, open_work_queue
from server.config import Settings

log = logging.getLogger(__name__)

BATCH_QUEUE = "batch"


def session_manager(registry: Registry, settings: Settings) -> SessionManager:
    return SessionManager(
        registry.sessions,
        SessionPolicy(
            default_ttl_ms=int(settings.session_default_ttl * 1000),
            max_ttl_ms=int(settings.session_max_ttl * 1000),
        ),
    )


def batch_policy(settings: Settings) -> BatchPolicy:
    return BatchPolicy(
        max_items=settings.batch_max_items,
        default_window_ms=int(settings.batch_completion_window * 1000),
        max_window_ms=int(settings.batch_max_completion_window * 1000),
    )


class BatchStack:
    """Queue, manager, expirer and (once started) worker over one registry."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        sessions: SessionManager,
        chat: ChatOrchestrator,
    ) -> None:
        self.settings = settings
        self.opened: OpenedQueue = open_work_queue(
            settings.redis_url,
            key_prefix=settings.redis_key_prefix,
            queue=BATCH_QUEUE,
            socket_timeout_s=settings.redis_socket_timeout,
            connect_timeout_s=settings.redis_connect_timeout,
            max_connections=settings.redis_max_connections,
        )
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
        if self.worker is not None:
            return self.worker
        self.worker = QueueWorker(
            self.opened.queue,
            self.runner.handle,
            concurrency=concurrency or self.settings.batch_worker_concurrency,
            lease_s=self.settings.batch_worker_lease,
            poll_s=self.settings.batch_worker_poll,
            grace_s=self.settings.shutdown_grace,
        )
        self._worker_task = asyncio.create_task(self.worker.run(), name="batch-worker")
        log.info(
            "batch worker %s started (concurrency %d)",
            self.worker.consumer,
            self.worker.concurrency,
        )
        return self.worker

    async def stop_worker(self) -> None:
        """Stop leasing; running items get the shutdown grace, then go back to the queue."""
        if self.worker is not None:
            self.worker.stop()
        task, self._worker_task = self._worker_task, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def aclose(self) -> None:
        await self.stop_worker()
        await self.expirer.stop()
        await self.opened.aclose()


async def run_workers(settings: Settings, dispatcher: Dispatcher, limits: JobLimits) -> None:
    """``orchestrator worker``: run batch items against REDIS_URL until SIGTERM/SIGINT."""
    from server.app import registry_config

    if not settings.redis_url:
        raise ValueError("orchestrator worker needs REDIS_URL (workers share the queue)")
    registry = open_registry(registry_config(settings))
    sessions = session_manager(registry, settings)
    chat = ChatOrchestrator(sessions, registry.jobs, registry.events, dispatcher, limits)
    stack = BatchStack(settings, registry, sessions, chat)
    stack.start_worker()
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        await stop_requested.wait()
    finally:
        log.info("worker stopping")
        await stack.aclose()
        await dispatcher.aclose()
        await registry.aclose()
