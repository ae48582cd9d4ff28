"""Servicers of query.v1.QueryService and embedding.v1.EmbeddingService with deterministic
jobs that report progress, deltas and the outcome through the Reporter."""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeAlias

import grpc

from embedding.v1 import embedding_pb2, embedding_pb2_grpc
from orchestrator.v1 import common_pb2
from query.v1 import query_pb2, query_pb2_grpc
from reference import content, fields
from reference.config import ReferenceConfig
from reference.jobs import JobTable, NoticeWriter
from reference.platform_api import CallOrigin, PlatformApi, PlatformCallError
from reference.reporter import Reporter

if TYPE_CHECKING:
    from reference.fields import Context


class Seen(NamedTuple):
    """What one submit received (for tests)."""

    method: str
    job_id: str
    tenant_id: str
    request_id: str | None
    traceparent: str | None


# What a job does after its "started" progress, given its notice writer.
JobBody: TypeAlias = Callable[[NoticeWriter], Coroutine[Any, Any, None]]

# The submit log keeps the latest entries only, so long benchmark runs do not grow it forever.
SEEN_LIMIT = 10_000
# How long one internal call (a completion or an embedding) may take.
PLATFORM_CALL_TIMEOUT_S = 60.0


class Runtime:
    """What both servicers share: settings, the reporter, running jobs and the submit log."""

    def __init__(self, config: ReferenceConfig, reporter: Reporter) -> None:
        self.config = config
        self.reporter = reporter
        self.jobs = JobTable()
        self.seen: deque[Seen] = deque(maxlen=SEEN_LIMIT)
        # The orchestrator's internal API: the LLM and embedding calls jobs make.
        self.platform = PlatformApi(
            config.orchestrator_address, config.publish_metadata, PLATFORM_CALL_TIMEOUT_S
        )

    def origin(self, tenant_id: str, job_id: str, context: Context) -> CallOrigin:
        """The job an internal call serves, with the request id and traceparent of the submit
        that started it."""
        metadata = {key: str(value) for key, value in context.invocation_metadata() or ()}
        return CallOrigin(
            tenant_id, job_id, metadata.get("x-request-id"), metadata.get("traceparent")
        )

    def admit(self, method: str, job_id: str, tenant_id: str, context: Context) -> tuple[str, str]:
        """Resolve the job id and tenant of a submit and record it. The tenant falls back to the
        x-tenant-id header."""
        metadata = {key: str(value) for key, value in context.invocation_metadata() or ()}
        job_id = job_id or uuid.uuid4().hex
        tenant_id = tenant_id or metadata.get("x-tenant-id", "")
        self.seen.append(
            Seen(
                method, job_id, tenant_id, metadata.get("x-request-id"), metadata.get("traceparent")
            )
        )
        return job_id, tenant_id

    async def submit(
        self,
        method: str,
        service: common_pb2.Service.ValueType,
        job_id: str,
        tenant_id: str,
        agent_id: str,
        context: Context,
        *,
        missing: str,
        job: JobBody,
    ) -> str:
        """Admit a submit, refuse it (INVALID_ARGUMENT) without a tenant or when ``missing``
        names what the request lacks, else start ``job`` under its id; that id."""
        job_id, tenant_id = self.admit(method, job_id, tenant_id, context)
        if not tenant_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "tenant_id is required")
        if missing:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, missing)
        notices = NoticeWriter(self.reporter, service, job_id, tenant_id, agent_id)
        self.jobs.start(job_id, tenant_id, self._run(notices, job))
        return job_id

    async def start(
        self,
        method: str,
        service: common_pb2.Service.ValueType,
        request: fields.JobStart,
        context: Context,
        job: Callable[[NoticeWriter, CallOrigin], Coroutine[Any, Any, None]],
    ) -> str:
        """:meth:`submit` for a start of agent work (StartRun, StartWorkflow; its fields
        checked already): ``job`` also gets the origin of the internal calls it makes."""
        return await self.submit(
            method,
            service,
            request.job_id,
            request.tenant_id,
            request.agent_id,
            context,
            missing="",
            job=lambda notices: job(
                notices, self.origin(request.tenant_id, request.job_id, context)
            ),
        )

    async def _run(self, notices: NoticeWriter, job: JobBody) -> None:
        """Progress 0 "started", then the job; or as the job id decides: nothing at all, or
        "started" then a failure."""
        outcome = self.outcome(notices.job_id)
        if outcome == "silent":
            return
        notices.progress(0.0, "started")
        if outcome == "fail":
            await self.step()
            notices.failed(
                "model_error",
                f"the reference model failed job {notices.job_id} (REF_FAILURE_RATE)",
                retryable=False,
            )
            return
        await job(notices)

    async def step(self) -> None:
        await asyncio.sleep(self.config.step_delay_s)

    def outcome(self, job_id: str) -> str:
        """ "silent", "fail" or "ok", decided by the job id alone."""
        if content.is_silent(job_id, self.config.silent_rate):
            return "silent"
        if content.fails(job_id, self.config.failure_rate):
            return "fail"
        return "ok"


async def run_query(
    runtime: Runtime, notices: NoticeWriter, request: query_pb2.SubmitQueryRequest
) -> None:
    """After "started": deltas -> progress 1 -> completed."""
    collections: Sequence[str] = (
        list(request.collections) if request.mode == query_pb2.QUERY_MODE_RAG else ()
    )
    text = content.answer_text(request.prompt, collections)
    await stream_deltas(runtime, notices, text)
    await finish(
        runtime,
        notices,
        "generated",
        text,
        request.model or content.DEFAULT_QUERY_MODEL,
        content.word_count(request.prompt),
    )


async def stream_deltas(runtime: Runtime, notices: NoticeWriter, text: str) -> None:
    """``text`` as REF_DELTAS delta notices, one step apart."""
    for chunk in content.split_deltas(text, runtime.config.deltas):
        await runtime.step()
        notices.delta(chunk)


async def finish(
    runtime: Runtime,
    notices: NoticeWriter,
    status: str,
    text: str,
    model: str,
    prompt_tokens: int,
) -> None:
    """Progress 1 with ``status``, then completed with ``text`` and usage (the completion
    counts the words of the text)."""
    await runtime.step()
    notices.progress(1.0, status)
    completion_tokens = content.word_count(text)
    notices.completed(
        common_pb2.JobResult(text=text, model=model),
        common_pb2.TokenUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )


async def complete_through_orchestrator(
    runtime: Runtime,
    notices: NoticeWriter,
    origin: CallOrigin,
    call_id: str,
    prompt: str,
    model: str,
) -> common_pb2.JobResult | None:
    """An LLM completion for the job through the orchestrator's internal API (StreamComplete):
    its deltas are reported as the job's own; None, with the job failed ``llm_call_failed``,
    when the call fails."""
    try:
        async for item in runtime.platform.stream_complete(origin, call_id, prompt, model):
            if isinstance(item, str):
                notices.delta(item)
            else:
                return common_pb2.JobResult(text=item.text, model=item.model or model)
    except PlatformCallError as exc:
        notices.failed(
            "llm_call_failed",
            f"the {call_id} completion through the orchestrator failed: {exc}",
            retryable=exc.retryable,
        )
    return None


def complete_with_calls_usage(notices: NoticeWriter, result: common_pb2.JobResult) -> None:
    """Complete a job whose every token was used by its internal calls: the orchestrator has
    charged them to the job already, so the job reports none of its own."""
    notices.completed(result, common_pb2.TokenUsage())


async def run_embedding(
    runtime: Runtime, notices: NoticeWriter, request: embedding_pb2.SubmitEmbeddingRequest
) -> None:
    """After "started": completed with one vector per text."""
    await runtime.step()
    dim = runtime.config.embedding_dim
    vectors = [common_pb2.Vector(values=content.embedding_vector(t, dim)) for t in request.texts]
    prompt_tokens = sum(content.word_count(t) for t in request.texts)
    notices.completed(
        common_pb2.JobResult(
            embeddings=vectors, model=request.model or content.DEFAULT_EMBEDDING_MODEL
        ),
        common_pb2.TokenUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
    )


class JobRef(Protocol):
    """What every Cancel<Job> request carries."""

    tenant_id: str
    job_id: str


class JobServicer:
    """The base of the servicers of the job-running services: the runtime their jobs run on,
    and the cancel their Cancel<Job> methods answer with."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def cancel(self, request: JobRef, context: Context) -> bool:
        """Stop a running job of the tenant (both ids required and bounded); whether it ran."""
        async with fields.checked(context):
            fields.idents(request, "tenant_id", "job_id")
        return self.runtime.jobs.cancel(request.job_id, request.tenant_id)


class QueryServicer(JobServicer, query_pb2_grpc.QueryServiceServicer):
    async def SubmitQuery(
        self, request: query_pb2.SubmitQueryRequest, context: Context
    ) -> query_pb2.SubmitQueryResponse:
        async with fields.checked(context):
            fields.system_prompt(request.system_prompt, "system_prompt")
            fields.turns(request.history, "history", maximum=fields.HISTORY_TURNS)
        job_id = await self.runtime.submit(
            "SubmitQuery",
            common_pb2.SERVICE_QUERY,
            request.job_id,
            request.tenant_id,
            request.agent_id,
            context,
            missing="" if request.prompt else "prompt is required",
            job=lambda notices: run_query(self.runtime, notices, request),
        )
        return query_pb2.SubmitQueryResponse(job_id=job_id)

    async def CancelQuery(
        self, request: query_pb2.CancelQueryRequest, context: Context
    ) -> query_pb2.CancelQueryResponse:
        return query_pb2.CancelQueryResponse(cancelled=await self.cancel(request, context))


class EmbeddingServicer(JobServicer, embedding_pb2_grpc.EmbeddingServiceServicer):
    async def SubmitEmbedding(
        self, request: embedding_pb2.SubmitEmbeddingRequest, context: Context
    ) -> embedding_pb2.SubmitEmbeddingResponse:
        job_id = await self.runtime.submit(
            "SubmitEmbedding",
            common_pb2.SERVICE_EMBEDDING,
            request.job_id,
            request.tenant_id,
            "",
            context,
            missing="" if request.texts else "texts must not be empty",
            job=lambda notices: run_embedding(self.runtime, notices, request),
        )
        return embedding_pb2.SubmitEmbeddingResponse(job_id=job_id)

    async def CancelEmbedding(
        self, request: embedding_pb2.CancelEmbeddingRequest, context: Context
    ) -> embedding_pb2.CancelEmbeddingResponse:
        return embedding_pb2.CancelEmbeddingResponse(cancelled=await self.cancel(request, context))
