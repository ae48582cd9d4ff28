"""The reference Workflow Engine: runs the ``research-flow`` workflow (retrieve -> summarize ->
answer) for a job, reporting each step's start and end, the answer's deltas and the completion
with usage over PublishUpdates. Every value is a pure function of the request."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from conversation.v1 import conversation_pb2
from orchestrator.v1 import common_pb2
from reference import content, fields
from reference.jobs import NoticeWriter
from reference.platform_api import CallOrigin
from reference.services import (
    JobServicer,
    Runtime,
    complete_through_orchestrator,
    complete_with_calls_usage,
)
from workflow.v1 import workflow_pb2, workflow_pb2_grpc

if TYPE_CHECKING:
    from reference.fields import Context

RESEARCH_FLOW = "research-flow"
# Workflow id -> its steps, in order.
WORKFLOWS: dict[str, tuple[str, ...]] = {RESEARCH_FLOW: ("retrieve", "summarize", "answer")}
# Passages the retrieve step keeps, and words of each that the summary quotes.
MAX_PASSAGES = 3
SUMMARY_WORDS = 12
_WORD = re.compile(r"[a-z0-9]{4,}")

STARTED = common_pb2.STEP_PHASE_STARTED
FINISHED = common_pb2.STEP_PHASE_FINISHED


def keywords(text: str) -> set[str]:
    """The words of four characters or more, lower-cased."""
    return set(_WORD.findall(text.lower()))


def retrieve(question: str, history: Sequence[conversation_pb2.Turn]) -> list[str]:
    """The newest earlier turns sharing a keyword with the question; without any, the newest
    turns. At most MAX_PASSAGES, oldest first."""
    wanted = keywords(question)
    relevant = [turn.content for turn in history if keywords(turn.content) & wanted]
    return (relevant or [turn.content for turn in history])[-MAX_PASSAGES:]


def summarize(passages: Sequence[str]) -> str:
    """The first SUMMARY_WORDS words of each passage, joined."""
    return "; ".join(" ".join(p.split()[:SUMMARY_WORDS]) for p in passages if p.split())


def research_answer(question: str, summary: str, earlier_turns: int) -> str:
    if not summary:
        return f"Reference research answer to: {question} (no earlier turns to draw on)"
    return (
        f"Reference research answer to: {question} "
        f"(drawing on {earlier_turns} earlier turn(s): {summary})"
    )


async def run_research_flow(
    runtime: Runtime,
    notices: NoticeWriter,
    request: workflow_pb2.StartWorkflowRequest,
    origin: CallOrigin,
) -> None:
    """After "started": each step started -> finished; the answer step completes the draft
    answer (``research_answer``) with the LLM through the orchestrator's internal API (call id
    ``answer``), its deltas reported inside the step; then progress 1 -> completed. The
    tokens are the completion's, charged to the job by the orchestrator."""
    history = list(request.history)
    notices.step(0, "retrieve", STARTED)
    await runtime.step()
    passages = retrieve(request.input, history)
    notices.step(
        0,
        "retrieve",
        FINISHED,
        summary=f"retrieved {len(passages)} passage(s) from {len(history)} earlier turn(s)",
    )

    notices.step(1, "summarize", STARTED)
    await runtime.step()
    summary = summarize(passages)
    notices.step(
        1, "summarize", FINISHED, summary=f"summarized into {content.word_count(summary)} word(s)"
    )

    notices.step(2, "answer", STARTED)
    draft = research_answer(request.input, summary, len(history))
    model = request.model or content.DEFAULT_QUERY_MODEL
    result = await complete_through_orchestrator(runtime, notices, origin, "answer", draft, model)
    if result is None:
        return
    words = content.word_count(result.text)
    notices.step(2, "answer", FINISHED, summary=f"answered in {words} word(s)")
    await runtime.step()
    notices.progress(1.0, "answered")
    complete_with_calls_usage(notices, result)


class WorkflowEngineServicer(JobServicer, workflow_pb2_grpc.WorkflowEngineServiceServicer):
    async def StartWorkflow(
        self, request: workflow_pb2.StartWorkflowRequest, context: Context
    ) -> workflow_pb2.StartWorkflowResponse:
        async with fields.checked(context):
            fields.job_start(request)
            fields.idents(request, "workflow_id")
            if request.workflow_id not in WORKFLOWS:
                raise fields.NotFound("workflow_id", f"no workflow {request.workflow_id!r}")
        job_id = await self.runtime.start(
            "StartWorkflow",
            common_pb2.SERVICE_WORKFLOW_ENGINE,
            request,
            context,
            lambda notices, origin: run_research_flow(self.runtime, notices, request, origin),
        )
        return workflow_pb2.StartWorkflowResponse(job_id=job_id)

    async def CancelWorkflow(
        self, request: workflow_pb2.CancelWorkflowRequest, context: Context
    ) -> workflow_pb2.CancelWorkflowResponse:
        return workflow_pb2.CancelWorkflowResponse(cancelled=await self.cancel(request, context))
