"""Every field of every request is bounded: the test walks the request descriptors of every RPC
of the Chat, Session, Batch and Admin services, requires a bound for each string, bytes,
repeated, map, number and Duration field (a new field without one fails here), and checks for
each bound that a value just past it is INVALID_ARGUMENT naming the field while the bound itself
passes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from domain.errors import InvalidArgument
from handlers.request_limits import (
    DURATION,
    INT64_MAX,
    LIMITS,
    check_request,
    is_map,
    is_repeated,
    needs_limit,
)
from server.app import SERVICE_NAMES

BOUNDED_SERVICES = [name for name in SERVICE_NAMES if not name.endswith("TaskUpdateService")]


def request_types() -> list[Descriptor]:
    pool = descriptor_pool.Default()
    return [
        method.input_type
        for service in BOUNDED_SERVICES
        for method in pool.FindServiceByName(service).methods
    ]


def fields_of(message: Descriptor, seen: set[str] | None = None) -> Iterator[FieldDescriptor]:
    """Every field reachable from a request type (map entries and nested messages too)."""
    seen = set() if seen is None else seen
    for field in message.fields:
        yield field
        nested = field.message_type
        if nested is not None and nested.full_name != DURATION and nested.full_name not in seen:
            seen.add(nested.full_name)
            yield from fields_of(nested, seen)


ALL_FIELDS = sorted(
    {f.full_name: f for m in request_types() for f in fields_of(m)}.values(),
    key=lambda f: f.full_name,
)
BOUNDED = [f for f in ALL_FIELDS if needs_limit(f)]


def test_the_walk_covers_every_bounded_service() -> None:
    assert len(BOUNDED_SERVICES) == 4
    assert len(request_types()) >= 17


@pytest.mark.parametrize("field", BOUNDED, ids=lambda f: f.full_name)
def test_every_string_repeated_map_number_and_duration_field_has_a_bound(
    field: FieldDescriptor,
) -> None:
    assert field.full_name in LIMITS, f"{field.full_name} has no bound in handlers/request_limits"


def test_no_bound_names_a_field_that_does_not_exist() -> None:
    assert set(LIMITS) <= {f.full_name for f in ALL_FIELDS}


def _owner(field: FieldDescriptor) -> tuple[Descriptor, str, Any]:
    """(request type to send, path of the field in it, a function setting a value there)."""
    container = field.containing_type
    assert container is not None
    if container.GetOptions().map_entry:  # a map's key or value: set through the map
        for request in request_types():
            for outer in request.fields:
                if outer.message_type is container:
                    return request, outer.name, ("map", outer.name, field.name)
    if container.full_name == "orchestrator.v1.BatchItem":
        return request_types_by_name()["orchestrator.v1.SubmitBatchRequest"], "items[0]", None
    return container, "", None


def request_types_by_name() -> dict[str, Descriptor]:
    return {m.full_name: m for m in request_types()}


def _value(field: FieldDescriptor, over: bool) -> Any:
    limit = LIMITS[field.full_name]
    if field.type == FieldDescriptor.TYPE_STRING:
        return "x" * (limit.max_chars + (1 if over else 0))
    if limit.max_value == INT64_MAX:  # nothing fits above it: go below the minimum
        return limit.min_value - 1 if over else limit.max_value
    return limit.max_value + (1 if over else 0)


def _request_with(field: FieldDescriptor, over: bool) -> tuple[Message, str]:
    """A request whose ``field`` is just past its bound (``over``) or at it; and the name the
    violation must carry."""
    request_type, prefix, how = _owner(field)
    request = GetMessageClass(request_type)()
    limit = LIMITS[field.full_name]
    if how is not None:  # map key or value
        _, map_name, part = how
        entries = getattr(request, map_name)
        if part == "key":
            entries[_value(field, over)] = "v"
        else:
            entries["k"] = _value(field, over)
        return request, map_name
    target: Any = request
    if prefix == "items[0]":
        target = request.items.add()  # type: ignore[attr-defined]
    path = f"{prefix}.{field.name}" if prefix else field.name
    if is_map(field):
        entries = getattr(target, field.name)
        for n in range(limit.max_items + (1 if over else 0)):
            entries[f"k{n}"] = "v"
        return request, path
    if is_repeated(field):
        values = getattr(target, field.name)
        count = limit.max_items + (1 if over else 0)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for _ in range(count):
                values.add()
        elif field.type == FieldDescriptor.TYPE_ENUM:
            values.extend([1] * count)
        else:
            values.extend(["c"] * count)
        return request, path
    if field.type == FieldDescriptor.TYPE_MESSAGE:  # Duration
        getattr(target, field.name).seconds = _value(field, over)
        return request, path
    setattr(target, field.name, _value(field, over))
    return request, path


@pytest.mark.parametrize("field", BOUNDED, ids=lambda f: f.full_name)
def test_a_value_past_its_bound_is_invalid_argument_naming_the_field(
    field: FieldDescriptor,
) -> None:
    at_bound, _ = _request_with(field, over=False)
    check_request(at_bound)
    over, path = _request_with(field, over=True)
    with pytest.raises(InvalidArgument) as caught:
        check_request(over)
    named = [v.field.split("[")[0] if "['" in v.field else v.field for v in caught.value.violations]
    assert named == [path]


def test_a_duration_with_nanos_out_of_range_is_refused() -> None:
    request = GetMessageClass(request_types_by_name()["orchestrator.v1.CreateSessionRequest"])()
    request.ttl.nanos = 2_000_000_000  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument) as caught:
        check_request(request)
    assert [v.field for v in caught.value.violations] == ["ttl.nanos"]


def test_each_element_of_a_repeated_string_is_bounded() -> None:
    request = GetMessageClass(request_types_by_name()["orchestrator.v1.SendMessageRequest"])()
    request.collections.extend(["ok", "x" * 1_000_000])  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument) as caught:
        check_request(request)
    assert [v.field for v in caught.value.violations] == ["collections[1]"]
