"""ReportUpdates, the acknowledged form of PublishUpdates, over real gRPC on both backends: each
notice is answered with its verdict as soon as it is applied, in stream order; a bad frame is
answered and the stream goes on; a caller going away is not an error."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest

from orchestrator.v1 import common_pb2, task_update_pb2, task_update_pb2_grpc
from tests.support.admin_calls import service_key_for
from tests.support.flow import (
    EOF,
    TIMEOUT_S,
    Flow,
    completed,
    kind_of,
    notice,
    read_events,
    read_to_end,
)
from tests.support.servers import service

REPORT_UPDATES = "/orchestrator.v1.TaskUpdateService/ReportUpdates"
UNKNOWN_JOB = "0190a0b0-0000-7000-8000-000000000001"
# A length-delimited field 1 claiming 255 bytes that never come.
TRUNCATED = b"\x0a\xff\x01only a few bytes"
Request = task_update_pb2.ReportUpdatesRequest
Answer = task_update_pb2.ReportUpdatesResponse
ACCEPTED = task_update_pb2.NOTICE_VERDICT_ACCEPTED
DUPLICATE = task_update_pb2.NOTICE_VERDICT_DUPLICATE
REJECTED = task_update_pb2.NOTICE_VERDICT_REJECTED


def open_report(flow: Flow, metadata: Any = None) -> Any:
    """A ReportUpdates call written with write()/done_writing() and read with read()."""
    stub = task_update_pb2_grpc.TaskUpdateServiceStub(flow.channel)
    return stub.ReportUpdates(metadata=metadata or service(), timeout=TIMEOUT_S)  # type: ignore[call-arg]


async def answer_to(call: Any, notice_pb: task_update_pb2.PublishUpdatesRequest) -> Answer:
    await call.write(Request(notice=notice_pb))
    async with asyncio.timeout(TIMEOUT_S):
        answer: Answer = await call.read()
    return answer


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR or r.exc_info is not None
    ]


async def test_each_notice_is_answered_before_the_next_is_sent(flow: Flow) -> None:
    session_id = await flow.new_session()
    chat, accepted = await flow.start_job(session_id)
    job_id = accepted.job_id
    call = open_report(flow)

    first = await answer_to(call, notice(job_id, 1, "delta", delta="Hel"))
    assert (first.index, first.job_id, first.sequence, first.verdict) == (0, job_id, 1, ACCEPTED)
    (delta,) = await read_events(chat, 1)
    assert first.event_sequence == delta.sequence  # the answer names the event it added

    again = await answer_to(call, notice(job_id, 1, "delta", delta="Hel"))
    assert (again.index, again.verdict, again.event_sequence) == (1, DUPLICATE, 0)

    done = await answer_to(call, completed(job_id, 2, "Hello"))
    assert (done.index, done.sequence, done.verdict) == (2, 2, ACCEPTED)
    late = await answer_to(call, notice(job_id, 3, "delta", delta="late"))
    assert (late.verdict, late.reason) == (REJECTED, task_update_pb2.REJECT_REASON_JOB_FINISHED)

    await call.done_writing()
    assert await call.read() is EOF
    assert await call.code() == grpc.StatusCode.OK
    assert [kind_of(e) for e in await read_to_end(chat)] == ["completed"]


async def test_notices_written_together_are_answered_in_stream_order(flow: Flow) -> None:
    jobs = []
    chats = []
    for _ in range(3):
        chat, accepted = await flow.start_job(await flow.new_session())
        jobs.append(accepted.job_id)
        chats.append(chat)
    sent = [
        notice(UNKNOWN_JOB, 1, "progress"),
        *(notice(job, 1, "progress", progress=0.5) for job in jobs),
        notice(jobs[0], 1, "progress", tenant_id="globex"),
        notice(jobs[1], 2, "progress", service_pb=common_pb2.SERVICE_EMBEDDING),
        task_update_pb2.PublishUpdatesRequest(job_id=jobs[2], tenant_id="acme", sequence=2),
        *(completed(job, 2, f"done {n}") for n, job in enumerate(jobs)),
    ]
    stub = task_update_pb2_grpc.TaskUpdateServiceStub(flow.channel)
    call = stub.ReportUpdates(
        iter([Request(notice=n) for n in sent]), metadata=service(), timeout=TIMEOUT_S
    )
    answers = [answer async for answer in call]
    assert [a.index for a in answers] == list(range(len(sent)))
    assert [(a.job_id, a.sequence) for a in answers] == [(n.job_id, n.sequence) for n in sent]
    rejected = task_update_pb2.RejectReason
    assert [(a.verdict, a.reason) for a in answers] == [
        (REJECTED, rejected.Value("REJECT_REASON_UNKNOWN_JOB")),
        (ACCEPTED, 0),
        (ACCEPTED, 0),
        (ACCEPTED, 0),
        (REJECTED, rejected.Value("REJECT_REASON_WRONG_TENANT")),
        (REJECTED, rejected.Value("REJECT_REASON_WRONG_SERVICE")),
        (REJECTED, rejected.Value("REJECT_REASON_MALFORMED")),
        (ACCEPTED, 0),
        (ACCEPTED, 0),
        (ACCEPTED, 0),
    ]
    assert "event" in answers[6].detail
    for n, chat in enumerate(chats):
        events = await read_to_end(chat)
        assert [kind_of(e) for e in events] == ["progress", "completed"]
        assert events[-1].completed.result.text == f"done {n}"


async def test_a_bad_frame_is_answered_malformed_and_the_stream_goes_on(
    flow: Flow, caplog: pytest.LogCaptureFixture
) -> None:
    session_id = await flow.new_session()
    chat, accepted = await flow.start_job(session_id)
    job_id = accepted.job_id
    # The notice's delta (field 12, a string) as invalid UTF-8, inside field 1 of the request.
    inner = notice(job_id, 2, "delta").SerializeToString() + bytes([12 << 3 | 2, 2]) + b"\xff\xfe"
    invalid_utf8 = bytes([1 << 3 | 2, len(inner)]) + inner
    frames = [
        Request(notice=notice(job_id, 1, "progress", progress=0.5)).SerializeToString(),
        TRUNCATED,
        Request().SerializeToString(),  # no notice
        invalid_utf8,
        Request(notice=completed(job_id, 3, "after the bad frames")).SerializeToString(),
    ]
    report = flow.channel.stream_stream(
        REPORT_UPDATES,
        request_serializer=lambda frame: frame,
        response_deserializer=Answer.FromString,
    )
    call = report(iter(frames), metadata=service(), timeout=TIMEOUT_S)
    answers = [answer async for answer in call]
    assert [(a.index, a.verdict) for a in answers] == [
        (0, ACCEPTED),
        (1, REJECTED),
        (2, REJECTED),
        (3, REJECTED),
        (4, ACCEPTED),
    ]
    assert all(a.reason == task_update_pb2.REJECT_REASON_MALFORMED for a in answers[1:4])
    assert "ReportUpdatesRequest" in answers[1].detail
    assert answers[2].detail == "notice: is required"
    assert "ReportUpdatesRequest" in answers[3].detail
    events = await read_to_end(chat)
    assert [kind_of(e) for e in events] == ["progress", "completed"]
    assert _errors_logged(caplog) == []


async def test_a_notice_for_a_service_the_key_does_not_speak_for_is_answered_wrong_service(
    flow: Flow,
) -> None:
    embedding_only = await service_key_for(flow.channel, common_pb2.SERVICE_EMBEDDING)
    _, accepted = await flow.start_job(await flow.new_session())
    call = open_report(flow, embedding_only)
    answer = await answer_to(call, completed(accepted.job_id, 1, "forged"))
    assert (answer.verdict, answer.reason) == (
        REJECTED,
        task_update_pb2.REJECT_REASON_WRONG_SERVICE,
    )
    assert "does not speak for query" in answer.detail
    call.cancel()


async def test_a_caller_going_away_mid_stream_is_not_an_error(
    flow: Flow, caplog: pytest.LogCaptureFixture
) -> None:
    session_id = await flow.new_session()
    chat, accepted = await flow.start_job(session_id)
    job_id = accepted.job_id
    call = open_report(flow)
    await answer_to(call, notice(job_id, 1, "progress"))
    for sequence in range(2, 40):
        await call.write(Request(notice=notice(job_id, sequence, "delta", delta=".")))
    call.cancel()  # gone with answers unread
    # The job still takes the notices of the next stream; anything applied counts once.
    again = open_report(flow)
    done = await answer_to(again, completed(job_id, 100, "finished"))
    assert done.verdict == ACCEPTED
    again.cancel()
    events = await read_to_end(chat)
    assert events[-1].completed.result.text == "finished"
    assert _errors_logged(caplog) == []
