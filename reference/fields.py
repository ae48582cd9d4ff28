"""Bounds on what the reference services accept: every request field is checked at the edge and
a bad one is refused with INVALID_ARGUMENT naming it (NOT_FOUND when it names something the
service does not have)."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeAlias

import grpc

from conversation.v1 import conversation_pb2

if TYPE_CHECKING:
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

# Ids (tenant, session, job, agent, request) as long as the orchestrator allows them.
ID_CHARS = 1024
MODEL_CHARS = 1024
# A user's message (the orchestrator allows 256 Ki characters) and any turn's content.
INPUT_CHARS = 256 * 1024
TURN_CHARS = 1024 * 1024
SYSTEM_PROMPT_CHARS = 64 * 1024
# Turns of history sent with a run or workflow.
HISTORY_TURNS = 1000
TOOL_NAME_CHARS = 128


class InvalidField(ValueError):
    """A request field out of bounds; the message starts with the field's name."""

    status = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(InvalidField):
    """A request field naming something the service does not have."""

    status = grpc.StatusCode.NOT_FOUND


async def refuse(context: Context, error: InvalidField) -> NoReturn:
    await context.abort(error.status, str(error))


class checked:
    """``async with checked(context):`` runs a request's field checks and look-ups: the
    InvalidField one raises is refused (:func:`refuse`). A lower-case class like
    ``contextlib.suppress`` rather than an ``@asynccontextmanager`` generator, which costs
    about a microsecond more on every call of the reference services."""

    __slots__ = ("_context",)

    def __init__(self, context: Context) -> None:
        self._context = context

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, InvalidField):
            await refuse(self._context, exc)


def text(value: str, field: str, *, max_chars: int, required: bool = True) -> str:
    if required and not value:
        raise InvalidField(field, "is required")
    if len(value) > max_chars:
        raise InvalidField(field, f"exceeds {max_chars} characters")
    return value


def ident(value: str, field: str, *, required: bool = True) -> str:
    return text(value, field, max_chars=ID_CHARS, required=required)


def idents(request: object, *names: str, required: bool = True) -> None:
    """:func:`ident` for each of the request's fields ``names``, in that order."""
    for name in names:
        ident(getattr(request, name), name, required=required)


def system_prompt(value: str, field: str) -> str:
    return text(value, field, max_chars=SYSTEM_PROMPT_CHARS, required=False)


def number(value: int, field: str, *, maximum: int, minimum: int = 0) -> int:
    if not minimum <= value <= maximum:
        raise InvalidField(field, f"must be between {minimum} and {maximum}")
    return value


def count(values: Sequence[Any], field: str, *, maximum: int, minimum: int = 0) -> int:
    if len(values) < minimum:
        raise InvalidField(field, f"needs at least {minimum} element(s)")
    if len(values) > maximum:
        raise InvalidField(field, f"has more than {maximum} elements")
    return len(values)


def turns(values: Sequence[conversation_pb2.Turn], field: str, *, maximum: int) -> None:
    """Bounds of a list of conversation turns: roles set, content and counts in range."""
    count(values, field, maximum=maximum)
    for index, turn in enumerate(values):
        where = f"{field}[{index}]"
        if turn.role not in (conversation_pb2.ROLE_USER, conversation_pb2.ROLE_ASSISTANT):
            raise InvalidField(f"{where}.role", "must be ROLE_USER or ROLE_ASSISTANT")
        text(turn.content, f"{where}.content", max_chars=TURN_CHARS, required=False)
        ident(turn.job_id, f"{where}.job_id", required=False)
        number(turn.tokens, f"{where}.tokens", maximum=2**31 - 1)
        if turn.HasField("time") and not (
            0 <= turn.time.seconds <= 253_402_300_799 and 0 <= turn.time.nanos < 1_000_000_000
        ):
            raise InvalidField(f"{where}.time", "must be a valid timestamp from 1970 to 9999")


class JobStart(Protocol):
    """What StartRun and StartWorkflow requests share."""

    tenant_id: str
    session_id: str
    agent_id: str
    job_id: str
    request_id: str
    model: str
    input: str
    agent_version: int

    @property
    def history(self) -> Sequence[conversation_pb2.Turn]: ...


def job_start(request: JobStart) -> None:
    """Bounds of the fields every asynchronous start carries (only the tenant and the input are
    required: the job id is made up when missing, like the Query's)."""
    idents(request, "tenant_id")
    idents(request, "session_id", "agent_id", "job_id", "request_id", required=False)
    text(request.model, "model", max_chars=MODEL_CHARS, required=False)
    text(request.input, "input", max_chars=INPUT_CHARS)
    turns(request.history, "history", maximum=HISTORY_TURNS)
    number(request.agent_version, "agent_version", maximum=2**63 - 1)


def turn_tokens(turn: conversation_pb2.Turn) -> int:
    """The tokens a turn counts for: its own count, else its words."""
    return turn.tokens or len(turn.content.split())
