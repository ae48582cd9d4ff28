"""The reference Agent Execution Service: runs a tool agent for a job. The agent decides from
the user's message which of its tools to call (each arithmetic expression -> calculator; a
question about the time, date or clock -> clock), calls them one after the other through the
reference tools, at most ``max_tool_calls`` times, and answers with their results. It reports
each tool call (started, then finished or failed, with its arguments and result summary), the
answer's deltas and the completion with usage over PublishUpdates."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent_execution.v1 import agent_execution_pb2, agent_execution_pb2_grpc
from orchestrator.v1 import common_pb2
from reference import fields
from reference.jobs import NoticeWriter
from reference.platform_api import CallOrigin
from reference.services import (
    JobServicer,
    Runtime,
    complete_through_orchestrator,
    complete_with_calls_usage,
)
from reference.tools import CALCULATOR, CLOCK, MAX_EXPRESSION_CHARS, ToolBox, ToolError

if TYPE_CHECKING:
    from reference.fields import Context

DEFAULT_AGENT_MODEL = "reference-agent"
# Tool calls per run when the request leaves it to the service, and the most a request may ask.
DEFAULT_MAX_TOOL_CALLS = 8
MAX_TOOL_CALLS = 64
MAX_TOOLS = 64
TOOL_DESCRIPTION_CHARS = 4096
TOOL_SCHEMA_CHARS = 64 * 1024
# Characters of a tool's result kept in its tool_call notice.
RESULT_SUMMARY_CHARS = 256

# Runs of characters an arithmetic expression is made of; a run is an expression when it has a
# binary operator between two operands (whether it evaluates is the calculator's business).
_ARITHMETIC_RUN = re.compile(r"[0-9.+\-*/() ]+")
_TIME_WORDS = re.compile(r"\b(?:time|clock|date)\b", re.IGNORECASE)
_OPERAND_THEN_OPERATOR = re.compile(r"[0-9.)]\s*[-+*/]\s*[-+(]*\s*[0-9.(]")


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """A tool call the agent decided to make."""

    name: str
    arguments: dict[str, str]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, sort_keys=True)


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    request: ToolRequest
    result: str = ""
    error: str = ""


def _expression(run: str) -> str | None:
    """The arithmetic expression in a run of expression characters, if it is one (parentheses
    the sentence opened or closed around it are dropped)."""
    candidate = run.strip().rstrip(" +-*/.").lstrip(" */.")
    while candidate.startswith("(") and candidate.count("(") > candidate.count(")"):
        candidate = candidate[1:].strip()
    while candidate.endswith(")") and candidate.count(")") > candidate.count("("):
        candidate = candidate[:-1].strip()
    if len(candidate) > MAX_EXPRESSION_CHARS or not _OPERAND_THEN_OPERATOR.search(candidate):
        return None
    return candidate


def decide_tool_calls(message: str, tools: Collection[str]) -> list[ToolRequest]:
    """The tool calls the reference agent makes for ``message``, in the order the message asks
    for them, using only ``tools``."""
    found: list[tuple[int, ToolRequest]] = []
    if CALCULATOR.name in tools:
        for match in _ARITHMETIC_RUN.finditer(message):
            expression = _expression(match.group())
            if expression is not None:
                found.append(
                    (match.start(), ToolRequest(CALCULATOR.name, {"expression": expression}))
                )
    if CLOCK.name in tools:
        asked = _TIME_WORDS.search(message)
        if asked is not None:
            found.append((asked.start(), ToolRequest(CLOCK.name, {})))
    return [request for _, request in sorted(found, key=lambda item: item[0])]


def summarize_result(result: str) -> str:
    if len(result) <= RESULT_SUMMARY_CHARS:
        return result
    return result[: RESULT_SUMMARY_CHARS - 3] + "..."


def agent_answer(
    message: str, outcomes: Sequence[ToolOutcome], skipped: int, earlier_turns: int
) -> str:
    """The agent's reply: the question, then each tool call's result or error."""
    text = f"Reference agent answer to: {message}"
    if earlier_turns:
        text += f" (after {earlier_turns} earlier turn(s))"
    if outcomes:
        shown = []
        for outcome in outcomes:
            call = outcome.request
            argument = call.arguments.get("expression", "")
            result = outcome.result or f"error: {outcome.error}"
            shown.append(f"{call.name}({argument}) = {result}")
        text += ". Tool results: " + "; ".join(shown)
    if skipped:
        text += f". {skipped} more tool call(s) not made: the limit is {len(outcomes)}"
    return text


async def run_agent(
    runtime: Runtime,
    toolbox: ToolBox,
    notices: NoticeWriter,
    request: agent_execution_pb2.StartRunRequest,
    origin: CallOrigin,
) -> None:
    """After "started": one tool call after the other (started -> finished or failed), then
    the answer: the agent's draft (the question and every tool result, ``agent_answer``)
    completed by the LLM through the orchestrator's internal API (call id ``answer``), its
    deltas reported as they come, progress 1, completed. The tokens are the completion's,
    charged to the job by the orchestrator: the run reports none of its own."""
    available = {tool.name for tool in request.tools}
    wanted = decide_tool_calls(request.input, available)
    limit = request.max_tool_calls or DEFAULT_MAX_TOOL_CALLS
    outcomes: list[ToolOutcome] = []
    for number, call in enumerate(wanted[:limit], start=1):
        call_id = f"call-{number}"
        notices.tool_call(call_id, call.name, common_pb2.STEP_PHASE_STARTED, call.arguments_json)
        await runtime.step()
        try:
            result = toolbox.call(call.name, call.arguments)
        except ToolError as exc:
            outcomes.append(ToolOutcome(call, error=str(exc)))
            notices.tool_call(
                call_id,
                call.name,
                common_pb2.STEP_PHASE_FAILED,
                call.arguments_json,
                error=common_pb2.JobError(code="tool_error", message=str(exc), retryable=False),
            )
            continue
        outcomes.append(ToolOutcome(call, result=result))
        notices.tool_call(
            call_id,
            call.name,
            common_pb2.STEP_PHASE_FINISHED,
            call.arguments_json,
            result_summary=summarize_result(result),
        )
    history = list(request.history)
    draft = agent_answer(request.input, outcomes, len(wanted) - len(outcomes), len(history))
    model = request.model or DEFAULT_AGENT_MODEL
    answer = await complete_through_orchestrator(runtime, notices, origin, "answer", draft, model)
    if answer is None:
        return
    await runtime.step()
    notices.progress(1.0, "answered")
    complete_with_calls_usage(notices, answer)


def _check_tools(request: agent_execution_pb2.StartRunRequest) -> None:
    fields.count(request.tools, "tools", maximum=MAX_TOOLS)
    for index, tool in enumerate(request.tools):
        where = f"tools[{index}]"
        fields.text(tool.name, f"{where}.name", max_chars=fields.TOOL_NAME_CHARS)
        fields.text(
            tool.description,
            f"{where}.description",
            max_chars=TOOL_DESCRIPTION_CHARS,
            required=False,
        )
        fields.text(
            tool.parameters_json_schema,
            f"{where}.parameters_json_schema",
            max_chars=TOOL_SCHEMA_CHARS,
            required=False,
        )


class AgentExecutionServicer(JobServicer, agent_execution_pb2_grpc.AgentExecutionServiceServicer):
    def __init__(self, runtime: Runtime, toolbox: ToolBox) -> None:
        super().__init__(runtime)
        self.toolbox = toolbox

    async def StartRun(
        self, request: agent_execution_pb2.StartRunRequest, context: Context
    ) -> agent_execution_pb2.StartRunResponse:
        async with fields.checked(context):
            fields.job_start(request)
            fields.system_prompt(request.system_prompt, "system_prompt")
            _check_tools(request)
            fields.number(request.max_tool_calls, "max_tool_calls", maximum=MAX_TOOL_CALLS)
        job_id = await self.runtime.start(
            "StartRun",
            common_pb2.SERVICE_AGENT_EXECUTION,
            request,
            context,
            lambda notices, origin: run_agent(self.runtime, self.toolbox, notices, request, origin),
        )
        return agent_execution_pb2.StartRunResponse(job_id=job_id)

    async def CancelRun(
        self, request: agent_execution_pb2.CancelRunRequest, context: Context
    ) -> agent_execution_pb2.CancelRunResponse:
        return agent_execution_pb2.CancelRunResponse(cancelled=await self.cancel(request, context))
