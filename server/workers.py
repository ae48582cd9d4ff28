"""The queue workers of a process: one runs batch items from the ``batch`` queue, one runs
queued chat messages from the ``chat`` queue. The server embeds them (when enabled);
``orchestrator worker`` (``run_workers``) runs only them, against Redis."""

from __future__ import annotations

import asyncio
import logging

from domain.dispatch import Dispatcher
from domain.ports.queue import WorkQueue
from domain.worker import ItemRunner, QueueWorker
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
        self._workers: dict[str, QueueWorker] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start_batch_worker(self, concurrency: int | None = None) -> QueueWorker:
        """Start leasing and running batch items in this process."""
        services = self.services
        concurrency = concurrency or self.settings.batch_worker_concurrency
        return self._start("batch", services.batch_queue, services.batch_runner, concurrency)

    def start_chat_worker(self, concurrency: int | None = None) -> QueueWorker:
        """Start running queued chat messages in this process."""
        services = self.services
        concurrency = concurrency or self.settings.chat_worker_concurrency
        return self._start("chat", services.chat_queue, services.chat_runner, concurrency)

    def _start(
        self, name: str, queue: WorkQueue, runner: ItemRunner, concurrency: int
    ) -> QueueWorker:
        """The worker of queue ``name``, started on the first call."""
        worker = self._workers.get(name)
        if worker is not None:
            return worker
        worker = QueueWorker(
            queue,
            runner.handle,
            concurrency=concurrency,
            on_dead_letter=runner.dead_lettered,
            lease_s=self.settings.batch_worker_lease,
            poll_s=self.settings.batch_worker_poll,
            grace_s=self.settings.shutdown_grace,
        )
        self._workers[name] = worker
        self._tasks.append(asyncio.create_task(worker.run(), name=f"{name}-worker"))
        log.info("%s worker %s started (concurrency %d)", name, worker.consumer, concurrency)
        return worker

    async def stop(self) -> None:
        """Stop leasing; running items get the shutdown grace, then go back to the queue."""
        for worker in self._workers.values():
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
