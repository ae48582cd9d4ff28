"""Domain errors map to gRPC statuses with google.rpc details, in one place."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from domain.errors import FieldViolation, InvalidArgument, NotFound, ResourceExhausted
from handlers.errors import call_gone_is_cancellation, to_grpc_status, trailing_metadata_for


def details_of(status: grpc.Status) -> status_pb2.Status:
    raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    return status_pb2.Status.FromString(raw)


def test_invalid_argument_lists_every_field_violation() -> None:
    error = InvalidArgument([FieldViolation("a", "is required"), FieldViolation("b", "too long")])
    status = to_grpc_status(error)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert details_of(status).details[0].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("a", "is required"),
        ("b", "too long"),
    ]


def test_not_found_has_no_details() -> None:
    status = to_grpc_status(NotFound("session x not found"))
    assert status.code == grpc.StatusCode.NOT_FOUND
    assert status.details == "session x not found"


def test_resource_exhausted_carries_retry_info_quota_and_retry_after() -> None:
    error = ResourceExhausted(
        "slow down", retry_after_s=1.5, quota_subject="tenant:acme", quota_description="budget"
    )
    status = to_grpc_status(error)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = details_of(status).details
    retry = error_details_pb2.RetryInfo()
    quota = error_details_pb2.QuotaFailure()
    assert details[0].Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 1500
    assert details[1].Unpack(quota)
    assert quota.violations[0].subject == "tenant:acme"
    assert trailing_metadata_for(error) == (("retry-after", "2"),)


def test_an_operation_on_an_ended_call_becomes_a_cancellation() -> None:
    with pytest.raises(asyncio.CancelledError) as raised, call_gone_is_cancellation():
        raise grpc.aio.InternalError("Failed send_message op")
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_other_errors_pass_through_the_call_gone_guard() -> None:
    with pytest.raises(ValueError, match="not about the call"), call_gone_is_cancellation():
        raise ValueError("not about the call")
    with call_gone_is_cancellation():  # and nothing raised, nothing changes
        pass
