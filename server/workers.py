"""The queue workers of a process: one runs batch items from the ``batch`` queue, one runs
queued chat messages from the ``chat`` queue. The server embeds them (when enabled);
``orchestrator worker`` (``run_workers``) runs only them, against Redis."""

from __future__ import annotations

import asyncio
import logging

from domain.dispatch import Dispatcher
from domain.ports.queue import WorkQueue
from domain.worker import DeadLetterHook, Handler, QueueWorker
from registry.backend import open_backend
from server.backend_config import backend_config
from server.config import Settings
from server.services import Services, build_services, default_platform
from server.signals import wait_for_stop_signal

log = logging.getLogger(__name__)


class QueueWorkers:
    """The batch and chat workers over one process's services, started on demand."""

    def __init__(self, settings: Settings, services: Services) -> None:
        self.settings = settings
        self.services = services
        self.batch: QueueWorker | None = None
        self.chat: QueueWorker | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start_batch_worker(self, concurrency: int | None = None) -> QueueWorker:
        """Start leasing and running batch items in this process."""
        if self.batch is None:
            runner = self.services.batch_runner
            self.batch = self._run(
                "batch",
                self.services.batch_queue,
                runner.handle,
                runner.dead_lettered,
                concurrency or self.settings.batch_worker_concurrency,
            )
        return self.batch

    def start_chat_worker(self, concurrency: int | None = None) -> QueueWorker:
        """Start running queued chat messages in this process."""
        if self.chat is None:
            runner = self.services.chat_runner
            self.chat = self._run(
                "chat",
                self.services.chat_queue,
                runner.handle,
                runner.dead_lettered,
                concurrency or self.settings.chat_worker_concurrency,
            )
        return self.chat

    def _run(
        self,
        name: str,
        queue: WorkQueue,
        handler: Handler,
        on_dead_letter: DeadLetterHook,
        concurrency: int,
    ) -> QueueWorker:
        worker = QueueWorker(
            queue,
            handler,
            concurrency=concurrency,
            on_dead_letter=on_dead_letter,
            lease_s=self.settings.batch_worker_lease,
            poll_s=self.settings.batch_worker_poll,
            grace_s=self.settings.shutdown_grace,
        )
        self._tasks.append(asyncio.create_task(worker.run(), name=f"{name}-worker"))
        log.info("%s worker %s started (concurrency %d)", name, worker.consumer, concurrency)
        return worker

    async def stop(self) -> None:
        """Stop leasing; running items get the shutdown grace, then go back to the queue."""
        for worker in (self.batch, self.chat):
            if worker is not None:
                worker.stop()
        tasks, self._tasks = self._tasks, []
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_workers(settings: Settings, dispatcher: Dispatcher) -> None:
    """``orchestrator worker``: run batch items and queued chat messages against REDIS_URL
    until SIGTERM/SIGINT."""
    if not settings.redis_url:
        raise ValueError("orchestrator worker needs REDIS_URL (workers share the queue)")
    backend = open_backend(backend_config(settings))
    platform = default_platform(settings)
    services = build_services(settings, backend, dispatcher, platform)
    workers = QueueWorkers(settings, services)
    # Workers hand jobs over too, so they also redo interrupted hand-offs (of any process).
    services.handoffs.start()
    workers.start_batch_worker()
    workers.start_chat_worker()
    try:
        await wait_for_stop_signal()
    finally:
        log.info("worker stopping")
        await services.handoffs.stop()
        await workers.stop()
        await services.chat.drain(settings.shutdown_grace)
        await dispatcher.aclose()
        await platform.aclose()
        await backend.aclose()
