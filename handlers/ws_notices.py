"""The seed's JSON task notices <-> domain, for the WebSocket bridge.

The seed's form: ``{"event": "job_completed", "service": "query|embedding", "job_id": "...",
"tenant_id": "...", "agent_id": "optional", "result": {...}}``. Events ``job_progress``,
``job_delta`` and ``job_failed`` (or the bare names) carry ``progress``/``message``, ``delta``
and ``error``. ``sequence`` is optional: without it notices apply in arrival order.

Agent work: ``tool_call`` (service ``agent_execution``) carries ``"tool_call": {"call_id",
"name", "phase": "started|finished|failed", "arguments": <any JSON> (or "arguments_json": JSON
text), "result_summary", "error": {...}}``; ``step`` (service ``workflow_engine``) carries
``"step": {"step_id", "name", "index", "phase", "summary", "error": {...}}``;
``agent_changed`` (service ``agent_management``) names ``tenant_id`` and ``agent_id`` and no job.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from domain.jobs import NoticeEvent, NoticeOutcome
from domain.models import Service, TokenUsage
from domain.notices import NoticeInput
from handlers.event_converters import usage_to_data

_EVENTS = {
    "job_completed": NoticeEvent.COMPLETED,
    "job_failed": NoticeEvent.FAILED,
    "job_progress": NoticeEvent.PROGRESS,
    "job_delta": NoticeEvent.DELTA,
    "job_tool_call": NoticeEvent.TOOL_CALL,
    "step": NoticeEvent.STEP,
    "job_step": NoticeEvent.STEP,
    **{e.value: e for e in NoticeEvent},
}
_RESULT_FIELDS = ("text", "model", "embeddings", "usage")


class NoticeShapeError(ValueError):
    """The JSON is valid but not a notice object (answered as malformed)."""


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _result_data(result: Mapping[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "text": _text(result.get("text") or result.get("answer") or result.get("output")),
        "model": _text(result.get("model")),
    }
    embeddings = result.get("embeddings")
    if embeddings is not None:
        if not isinstance(embeddings, list) or not all(
            isinstance(v, list) and all(_number(x) for x in v) for v in embeddings
        ):
            raise NoticeShapeError("result.embeddings: must be lists of numbers")
        try:
            data["embeddings"] = [[float(x) for x in v] for v in embeddings]
        except OverflowError:
            raise NoticeShapeError("result.embeddings: must be lists of finite numbers") from None
    extra = {k: v for k, v in result.items() if k not in _RESULT_FIELDS}
    if extra:
        data["data"] = extra
    return data


_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _usage(value: Any) -> TokenUsage:
    """Token counts as sent: whole numbers (their range is checked with the notice)."""
    if value is None:
        return TokenUsage()
    if not isinstance(value, Mapping):
        raise NoticeShapeError("usage: must be an object")
    counts: list[int] = []
    for name in _USAGE_FIELDS:
        count = value.get(name, 0)
        if isinstance(count, float) and count.is_integer():
            count = int(count)
        if not isinstance(count, int) or isinstance(count, bool):
            raise NoticeShapeError(f"usage.{name}: must be a whole number")
        counts.append(count)
    return TokenUsage(*counts)


def _error_data(error: Any) -> dict[str, Any]:
    """An error as sent: an object {code, message, retryable} or just its message."""
    if isinstance(error, Mapping):
        return {
            "code": _text(error.get("code")) or "unknown",
            "message": _text(error.get("message")),
            "retryable": bool(error.get("retryable", False)),
        }
    return {"code": "unknown", "message": _text(error), "retryable": False}


def _work_item(message: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    item = message.get(name)
    if item is not None and not isinstance(item, Mapping):
        raise NoticeShapeError(f"{name}: must be an object")
    return item


def _phased(item: Mapping[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the item's phase and error (values as sent: domain.notices checks them)."""
    data["phase"] = item.get("phase", "")
    error = item.get("error")
    if error is not None:
        data["error"] = _error_data(error)
    return data


def _tool_call_data(message: Mapping[str, Any]) -> dict[str, Any]:
    call = _work_item(message, "tool_call")
    if call is None:
        return {}
    arguments = call.get("arguments_json")
    if arguments is None and "arguments" in call:
        arguments = json.dumps(call["arguments"], ensure_ascii=False, separators=(",", ":"))
    return _phased(
        call,
        {
            "call_id": call.get("call_id", ""),
            "name": call.get("name", ""),
            "arguments": "" if arguments is None else arguments,
            "result_summary": call.get("result_summary", ""),
        },
    )


def _step_data(message: Mapping[str, Any]) -> dict[str, Any]:
    step = _work_item(message, "step")
    if step is None:
        return {}
    return _phased(
        step,
        {
            "step_id": step.get("step_id", ""),
            "name": step.get("name", ""),
            "index": step.get("index", 0),
            "summary": step.get("summary", ""),
        },
    )


def notice_from_json(message: Any) -> NoticeInput:
    if not isinstance(message, Mapping):
        raise NoticeShapeError("a notice must be a JSON object")
    event = _EVENTS.get(_text(message.get("event")))
    try:
        service: Service | None = Service(_text(message.get("service")))
    except ValueError:
        service = None
    sequence = message.get("sequence")
    if sequence is not None and (not isinstance(sequence, int) or isinstance(sequence, bool)):
        raise NoticeShapeError("sequence: must be an integer")
    result = message.get("result")
    result = result if isinstance(result, Mapping) else {}
    usage = _usage(message.get("usage") or result.get("usage"))
    data: dict[str, Any]
    if event is NoticeEvent.COMPLETED:
        data = {"result": _result_data(result), "usage": usage_to_data(usage)}
    elif event is NoticeEvent.FAILED:
        data = {"error": _error_data(message.get("error"))}
    elif event is NoticeEvent.PROGRESS:
        progress = message.get("progress", 0.0)
        if not isinstance(progress, int | float) or isinstance(progress, bool):
            raise NoticeShapeError("progress: must be a number")
        try:
            fraction = float(progress)
        except OverflowError:
            raise NoticeShapeError("progress: must be between 0 and 1") from None
        data = {"fraction": fraction, "message": _text(message.get("message"))}
    elif event is NoticeEvent.DELTA:
        data = {"text": _text(message.get("delta") or result.get("text"))}
    elif event is NoticeEvent.TOOL_CALL:
        data = _tool_call_data(message)
    elif event is NoticeEvent.STEP:
        data = _step_data(message)
    else:
        data = {}
    return NoticeInput(
        event=event,
        service=service,
        job_id=_text(message.get("job_id")),
        tenant_id=_text(message.get("tenant_id")),
        sequence=sequence,
        agent_id=_text(message.get("agent_id")),
        data=data,
        usage=usage,
    )


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether decoded JSON nests objects and arrays more than ``limit`` levels (``value``
    itself being level 1). Iterative, so any depth is safe to check."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def verdict_to_json(index: int, job_id: str, outcome: NoticeOutcome) -> dict[str, Any]:
    reply: dict[str, Any] = {"index": index, "job_id": job_id, "verdict": outcome.verdict.value}
    if outcome.detail:
        reply["detail"] = outcome.detail
    if outcome.event is not None:
        reply["sequence"] = outcome.event.sequence
    return reply
