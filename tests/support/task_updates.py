"""A stand-in orchestrator: a TaskUpdateService that records every notice it receives, and an
internal PlatformService that answers completions as the reference Query would (records every
call)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from orchestrator.internal.v1 import platform_pb2, platform_pb2_grpc
from orchestrator.v1 import common_pb2, task_update_pb2, task_update_pb2_grpc
from reference import content

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


class PlatformRecorder(platform_pb2_grpc.PlatformServiceServicer):
    """The internal API as a stand-in: a completion is the reference Query's answer to the
    prompt (in ``deltas`` pieces, usage in words), an embedding the reference vectors; each
    request is kept with its metadata. ``fail_with`` refuses every call with that status."""

    def __init__(self, deltas: int = 3) -> None:
        self.deltas = deltas
        self.calls: list[tuple[Any, dict[str, str]]] = []
        self.fail_with: grpc.StatusCode | None = None

    async def _record(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metadata = {key: str(value) for key, value in context.invocation_metadata() or ()}
        self.calls.append((request, metadata))
        if self.fail_with is not None:
            await context.abort(self.fail_with, "refused by the stand-in")

    def _completion(self, request: Any) -> platform_pb2.CompleteResponse:
        text = content.answer_text(request.prompt, list(request.collections))
        prompt, completion = content.word_count(request.prompt), content.word_count(text)
        return platform_pb2.CompleteResponse(
            call_id=request.call_id,
            call_job_id=f"{request.job_id}/{request.call_id}",
            text=text,
            model=request.model or content.DEFAULT_QUERY_MODEL,
            usage=common_pb2.TokenUsage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            ),
        )

    async def Complete(
        self, request: platform_pb2.CompleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> platform_pb2.CompleteResponse:
        await self._record(request, context)
        return self._completion(request)

    async def StreamComplete(
        self,
        request: platform_pb2.StreamCompleteRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[platform_pb2.StreamCompleteResponse]:
        await self._record(request, context)
        final = self._completion(request)
        for piece in content.split_deltas(final.text, self.deltas):
            yield platform_pb2.StreamCompleteResponse(delta=piece)
        yield platform_pb2.StreamCompleteResponse(final=final)

    async def Embed(
        self, request: platform_pb2.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> platform_pb2.EmbedResponse:
        await self._record(request, context)
        vectors = [common_pb2.Vector(values=content.embedding_vector(t, 8)) for t in request.texts]
        return platform_pb2.EmbedResponse(call_id=request.call_id, embeddings=vectors)


class RecordingOrchestrator:
    """A grpc.aio server on loopback hosting a NoticeRecorder; can be restarted on its port."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.recorder = NoticeRecorder()
        self.platform = PlatformRecorder()
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server()
        task_update_pb2_grpc.add_TaskUpdateServiceServicer_to_server(self.recorder, server)
        platform_pb2_grpc.add_PlatformServiceServicer_to_server(self.platform, server)
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
