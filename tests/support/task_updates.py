"""A stand-in orchestrator TaskUpdateService that records every notice it receives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from orchestrator.v1 import task_update_pb2, task_update_pb2_grpc

Notice = task_update_pb2.PublishUpdatesRequest
FINAL_EVENTS = (task_update_pb2.NOTICE_EVENT_COMPLETED, task_update_pb2.NOTICE_EVENT_FAILED)


class NoticeRecorder(task_update_pb2_grpc.TaskUpdateServiceServicer):
    """Keeps every notice (in arrival order) and each stream's metadata; waiters are woken on
    every change, so tests await conditions instead of sleeping."""

    def __init__(self) -> None:
        self.notices: list[Notice] = []
        self.stream_metadata: list[dict[str, str]] = []
        # ReportUpdates answers every notice while True; set False to record without answering
        # (as an orchestrator that received notices and died before applying them).
        self.answering = True
        # Job ids whose ReportUpdates notices are answered rejected (wrong_service).
        self.reject_job_ids: set[str] = set()
        self._changed = asyncio.Condition()

    async def PublishUpdates(
        self,
        request_iterator: AsyncIterator[Notice],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> task_update_pb2.PublishUpdatesResponse:
        metadata = {key: str(value) for key, value in context.invocation_metadata() or ()}
        async with self._changed:
            self.stream_metadata.append(metadata)
            self._changed.notify_all()
        received = 0
        async for notice in request_iterator:
            received += 1
            async with self._changed:
                self.notices.append(notice)
                self._changed.notify_all()
        return task_update_pb2.PublishUpdatesResponse(received=received, accepted=received)

    async def ReportUpdates(
        self,
        request_iterator: AsyncIterator[task_update_pb2.ReportUpdatesRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[task_update_pb2.ReportUpdatesResponse]:
        metadata = {key: str(value) for key, value in context.invocation_metadata() or ()}
        async with self._changed:
            self.stream_metadata.append(metadata)
            self._changed.notify_all()
        index = 0
        async for request in request_iterator:
            notice = request.notice
            async with self._changed:
                self.notices.append(notice)
                self._changed.notify_all()
            if notice.job_id in self.reject_job_ids:
                yield task_update_pb2.ReportUpdatesResponse(
                    index=index,
                    job_id=notice.job_id,
                    sequence=notice.sequence,
                    verdict=task_update_pb2.NOTICE_VERDICT_REJECTED,
                    reason=task_update_pb2.REJECT_REASON_WRONG_SERVICE,
                    detail="not yours",
                )
            elif self.answering:
                yield task_update_pb2.ReportUpdatesResponse(
                    index=index,
                    job_id=notice.job_id,
                    sequence=notice.sequence,
                    verdict=task_update_pb2.NOTICE_VERDICT_ACCEPTED,
                )
            index += 1

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(predicate)

    def job(self, job_id: str) -> list[Notice]:
        """The job's notices by sequence, repeats (resent after a reconnect) dropped."""
        unique = {n.sequence: n for n in self.notices if n.job_id == job_id}
        return [unique[seq] for seq in sorted(unique)]

    def finished(self, job_id: str) -> bool:
        return any(n.event in FINAL_EVENTS for n in self.notices if n.job_id == job_id)

    async def wait_finished(self, job_id: str, timeout_s: float = 10.0) -> list[Notice]:
        await self.wait_until(lambda: self.finished(job_id), timeout_s)
        return self.job(job_id)


class RecordingOrchestrator:
    """A grpc.aio server on loopback hosting a NoticeRecorder; can be restarted on its port."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.recorder = NoticeRecorder()
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server()
        task_update_pb2_grpc.add_TaskUpdateServiceServicer_to_server(self.recorder, server)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        if port == 0:
            raise RuntimeError(f"could not bind 127.0.0.1:{self.port}")
        self.port = port
        await server.start()
        self._server = server

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
