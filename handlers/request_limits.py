"""Bounds on every field of every request (Chat, Session, Batch and Admin services), checked
before a handler converts the request: string lengths, repeated field and map sizes, number
ranges and Durations. A request over a bound is INVALID_ARGUMENT naming the field
(``items[3].collections[0]``, ``ttl.nanos``). These are outer bounds, the most a field may ever
carry; the domain's own rules (which may be tighter or configurable, such as
ORCH_BATCH_MAX_ITEMS) still apply after them. Notices (TaskUpdateService) are bounded where they
are validated (domain.notices).

``LIMITS`` has one entry per field, by full name; tests/unit/test_request_limits.py walks the
request descriptors of every RPC and fails for a string, bytes, repeated, map, number or
Duration field without an entry, so a new field cannot go unbounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from domain.errors import FieldViolation, InvalidArgument

INT64_MAX = 2**63 - 1
MAX_DURATION_S = 10 * 365 * 86400  # ten years: longer than any TTL or window a request may set
MAX_NANOS = 999_999_999


@dataclass(frozen=True, slots=True)
class Limit:
    """``max_chars`` for strings (each element of a repeated string, each map key/value);
    ``max_items`` for repeated fields and maps; ``min_value``/``max_value`` for numbers and
    Duration seconds."""

    max_chars: int = 0
    max_items: int = 0
    min_value: int = 0
    max_value: int = 0


# Outer bounds: where the domain checks a field itself (with a tighter limit, reporting every
# bad field of the request at once), the bound here is looser so the domain's report wins.
_ID = Limit(max_chars=1024)
_TOKEN = Limit(max_chars=4096)
_TENANT = Limit(max_chars=1024)
_PAGE_SIZE = Limit(min_value=-1_000_000, max_value=1_000_000)  # the domain checks the range
_SEQUENCE = Limit(min_value=-INT64_MAX, max_value=INT64_MAX)  # (negative: domain's message)
_DURATION = Limit(min_value=-MAX_DURATION_S, max_value=MAX_DURATION_S)
_METADATA = Limit(max_items=256)
_METADATA_KEY = Limit(max_chars=1024)
_METADATA_VALUE = Limit(max_chars=4096)
_CONTENT = Limit(max_chars=256 * 1024)
_MODEL = Limit(max_chars=1024)
_COLLECTIONS = Limit(max_chars=256, max_items=128)
_DATE = Limit(max_chars=64)
# History windows: the domain checks the range (negative: its message).
_LAST_TURNS = Limit(min_value=-1_000_000, max_value=1_000_000)
_TOKEN_BUDGET = Limit(min_value=-1_000_000_000, max_value=1_000_000_000)

_V1 = "orchestrator.v1."
_ADMIN = "orchestrator.admin.v1."

LIMITS: dict[str, Limit] = {
    # SessionService
    f"{_V1}CreateSessionRequest.agent_id": _ID,
    f"{_V1}CreateSessionRequest.user_id": _ID,
    f"{_V1}CreateSessionRequest.metadata": _METADATA,
    f"{_V1}CreateSessionRequest.MetadataEntry.key": _METADATA_KEY,
    f"{_V1}CreateSessionRequest.MetadataEntry.value": _METADATA_VALUE,
    f"{_V1}CreateSessionRequest.ttl": _DURATION,
    f"{_V1}GetSessionRequest.session_id": _ID,
    f"{_V1}ListSessionsRequest.page_size": _PAGE_SIZE,
    f"{_V1}ListSessionsRequest.page_token": _TOKEN,
    f"{_V1}ListSessionsRequest.agent_id": _ID,
    f"{_V1}CloseSessionRequest.session_id": _ID,
    f"{_V1}ListHistoryRequest.session_id": _ID,
    f"{_V1}ListHistoryRequest.page_size": _PAGE_SIZE,
    f"{_V1}ListHistoryRequest.page_token": _TOKEN,
    f"{_V1}ListHistoryRequest.last_turns": _LAST_TURNS,
    f"{_V1}ListHistoryRequest.token_budget": _TOKEN_BUDGET,
    # ChatService
    f"{_V1}SendMessageRequest.session_id": _ID,
    f"{_V1}SendMessageRequest.content": _CONTENT,
    f"{_V1}SendMessageRequest.model": _MODEL,
    f"{_V1}SendMessageRequest.collections": _COLLECTIONS,
    f"{_V1}StreamSessionRequest.session_id": _ID,
    f"{_V1}StreamSessionRequest.after_sequence": _SEQUENCE,
    f"{_V1}CancelJobRequest.session_id": _ID,
    f"{_V1}CancelJobRequest.job_id": _ID,
    # BatchService
    f"{_V1}SubmitBatchRequest.items": Limit(max_items=100_000),
    f"{_V1}BatchItem.custom_id": _ID,
    f"{_V1}BatchItem.session_id": _ID,
    f"{_V1}BatchItem.content": _CONTENT,
    f"{_V1}BatchItem.model": _MODEL,
    f"{_V1}BatchItem.collections": _COLLECTIONS,
    f"{_V1}SubmitBatchRequest.idempotency_key": _ID,
    f"{_V1}SubmitBatchRequest.completion_window": _DURATION,
    f"{_V1}SubmitBatchRequest.metadata": _METADATA,
    f"{_V1}SubmitBatchRequest.MetadataEntry.key": _METADATA_KEY,
    f"{_V1}SubmitBatchRequest.MetadataEntry.value": _METADATA_VALUE,
    f"{_V1}GetBatchRequest.batch_id": _ID,
    f"{_V1}ListBatchesRequest.page_size": _PAGE_SIZE,
    f"{_V1}ListBatchesRequest.page_token": _TOKEN,
    f"{_V1}StreamBatchResultsRequest.batch_id": _ID,
    f"{_V1}StreamBatchResultsRequest.after_sequence": _SEQUENCE,
    f"{_V1}CancelBatchRequest.batch_id": _ID,
    # AdminService
    f"{_ADMIN}CreateApiKeyRequest.tenant_id": _TENANT,
    f"{_ADMIN}CreateApiKeyRequest.description": Limit(max_chars=256),
    # Each service at most once (the domain refuses repeats): the enum bounds the list.
    f"{_ADMIN}CreateApiKeyRequest.services": Limit(max_items=16),
    f"{_ADMIN}ListApiKeysRequest.tenant_id": _TENANT,
    f"{_ADMIN}ListApiKeysRequest.page_size": _PAGE_SIZE,
    f"{_ADMIN}ListApiKeysRequest.page_token": _TOKEN,
    f"{_ADMIN}RevokeApiKeyRequest.key_id": Limit(max_chars=160),
    f"{_ADMIN}GetTaskRequest.tenant_id": _TENANT,
    f"{_ADMIN}GetTaskRequest.job_id": _ID,
    f"{_ADMIN}GetTenantUsageRequest.tenant_id": _TENANT,
    f"{_ADMIN}GetTenantUsageRequest.start_date": _DATE,
    f"{_ADMIN}GetTenantUsageRequest.end_date": _DATE,
    f"{_ADMIN}InvalidateAgentRequest.tenant_id": _TENANT,
    f"{_ADMIN}InvalidateAgentRequest.agent_id": _ID,
    f"{_ADMIN}ListTasksRequest.tenant_id": _TENANT,
    f"{_ADMIN}ListTasksRequest.states": Limit(max_items=64),
    f"{_ADMIN}ListTasksRequest.agent_id": _ID,
    f"{_ADMIN}ListTasksRequest.session_id": _ID,
    f"{_ADMIN}ListTasksRequest.page_size": _PAGE_SIZE,
    f"{_ADMIN}ListTasksRequest.page_token": _TOKEN,
    f"{_ADMIN}GetStatsRequest.tenant_id": _TENANT,
    f"{_ADMIN}ListDeadLettersRequest.queue": _ID,
    f"{_ADMIN}ListDeadLettersRequest.tenant_id": _TENANT,
    f"{_ADMIN}ListDeadLettersRequest.page_size": _PAGE_SIZE,
    f"{_ADMIN}ListDeadLettersRequest.page_token": _TOKEN,
    f"{_ADMIN}GetDeadLetterRequest.queue": _ID,
    f"{_ADMIN}GetDeadLetterRequest.item_id": _ID,
    f"{_ADMIN}RedriveDeadLetterRequest.queue": _ID,
    f"{_ADMIN}RedriveDeadLetterRequest.item_id": _ID,
    f"{_ADMIN}GetSessionRequest.tenant_id": _TENANT,
    f"{_ADMIN}GetSessionRequest.session_id": _ID,
    f"{_ADMIN}ListSessionEventsRequest.tenant_id": _TENANT,
    f"{_ADMIN}ListSessionEventsRequest.session_id": _ID,
    f"{_ADMIN}ListSessionEventsRequest.page_size": _PAGE_SIZE,
    f"{_ADMIN}ListSessionEventsRequest.page_token": _TOKEN,
    f"{_ADMIN}GetBatchRequest.tenant_id": _TENANT,
    f"{_ADMIN}GetBatchRequest.batch_id": _ID,
    f"{_ADMIN}RevokeTenantKeysRequest.tenant_id": _TENANT,
    # Timestamps (ListTasks' create time range): year 1 to 9999, as the type allows.
    "google.protobuf.Timestamp.seconds": Limit(min_value=-62135596800, max_value=253402300799),
    "google.protobuf.Timestamp.nanos": Limit(min_value=0, max_value=MAX_NANOS),
}

_STRING = FieldDescriptor.TYPE_STRING
_BYTES = FieldDescriptor.TYPE_BYTES
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
_NUMBERS = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
        FieldDescriptor.TYPE_DOUBLE,
        FieldDescriptor.TYPE_FLOAT,
    }
)
DURATION = "google.protobuf.Duration"


def needs_limit(field: FieldDescriptor) -> bool:
    """Whether a field must have an entry in LIMITS (enums and bools are bounded by their
    type and checked by the converters; other messages are walked field by field)."""
    if field.type in (_STRING, _BYTES) or field.type in _NUMBERS:
        return True
    if field.type == _MESSAGE:
        return is_repeated(field) or _message_name(field) == DURATION
    return is_repeated(field)


def is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _message_name(field: FieldDescriptor) -> str:
    return field.message_type.full_name if field.message_type is not None else ""


def is_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    return field.type == _MESSAGE and entry is not None and bool(entry.GetOptions().map_entry)


def check_request(request: Message) -> None:
    """InvalidArgument naming every field of ``request`` over its bound."""
    violations: list[FieldViolation] = []
    _check(request, "", violations)
    if violations:
        raise InvalidArgument(violations)


def _limit(field: FieldDescriptor) -> Limit:
    limit = LIMITS.get(field.full_name)
    if limit is None:  # a field without a bound is refused, not let through
        raise InvalidArgument.field(field.name, "has no declared bound on this server")
    return limit


def _check(message: Message, prefix: str, out: list[FieldViolation]) -> None:
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if is_map(field):
            limit = _limit(field)
            if len(value) > limit.max_items:
                out.append(FieldViolation(path, f"has more than {limit.max_items} entries"))
                continue
            entry = field.message_type
            assert entry is not None
            key_limit = _limit(entry.fields_by_name["key"])
            value_limit = _limit(entry.fields_by_name["value"])
            for key, item in value.items():
                if len(key) > key_limit.max_chars:
                    out.append(
                        FieldViolation(path, f"key exceeds {key_limit.max_chars} characters")
                    )
                elif isinstance(item, str) and len(item) > value_limit.max_chars:
                    out.append(
                        FieldViolation(
                            f"{path}[{key!r}]", f"value exceeds {value_limit.max_chars} characters"
                        )
                    )
        elif is_repeated(field):
            limit = _limit(field) if needs_limit(field) else Limit(max_items=0)
            if len(value) > limit.max_items:
                out.append(FieldViolation(path, f"has more than {limit.max_items} elements"))
                continue
            for index, item in enumerate(value):
                _check_value(field, item, f"{path}[{index}]", limit, out)
        else:
            limit = _limit(field) if needs_limit(field) else Limit()
            _check_value(field, value, path, limit, out)


def _check_value(
    field: FieldDescriptor, value: Any, path: str, limit: Limit, out: list[FieldViolation]
) -> None:
    if field.type in (_STRING, _BYTES):
        if len(value) > limit.max_chars:
            unit = "characters" if field.type == _STRING else "bytes"
            out.append(FieldViolation(path, f"exceeds {limit.max_chars} {unit}"))
    elif field.type in _NUMBERS:
        if not limit.min_value <= value <= limit.max_value:
            out.append(
                FieldViolation(path, f"must be between {limit.min_value} and {limit.max_value}")
            )
    elif field.type == _MESSAGE:
        if _message_name(field) == DURATION:
            _check_duration(value, path, limit, out)
        else:
            _check(value, f"{path}.", out)


def _check_duration(value: Any, path: str, limit: Limit, out: list[FieldViolation]) -> None:
    if not -MAX_NANOS <= value.nanos <= MAX_NANOS or value.seconds * value.nanos < 0:
        out.append(
            FieldViolation(
                f"{path}.nanos",
                f"must be between -{MAX_NANOS} and {MAX_NANOS}, with the sign of seconds",
            )
        )
    if not limit.min_value <= value.seconds <= limit.max_value:
        out.append(
            FieldViolation(path, f"must be between {limit.min_value} and {limit.max_value} s")
        )
