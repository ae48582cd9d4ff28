"""The reporter's single stream survives an orchestrator that is late or restarts."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from orchestrator.v1 import common_pb2, task_update_pb2
from query.v1 import query_pb2, query_pb2_grpc
from reference.app import ReferenceServices
from reference.reporter import Answer, Notice, Reporter, _Stream
from tests.reference.conftest import Stack, reference_config
from tests.support.redis_process import free_port
from tests.support.task_updates import RecordingOrchestrator


def ask(job_id: str) -> query_pb2.SubmitQueryRequest:
    return query_pb2.SubmitQueryRequest(tenant_id="acme", prompt=f"prompt {job_id}", job_id=job_id)


async def test_notices_wait_for_a_late_orchestrator_and_survive_its_restart() -> None:
    orchestrator = RecordingOrchestrator(port=free_port())  # not started yet
    reference = ReferenceServices(reference_config(orchestrator.address))
    await reference.start()
    channel = grpc.aio.insecure_channel(reference.address)
    stub = query_pb2_grpc.QueryServiceStub(channel)
    try:
        await stub.SubmitQuery(ask("early"), timeout=5)
        await orchestrator.start()
        recorder = orchestrator.recorder
        early = await recorder.wait_finished("early")
        assert [n.sequence for n in early] == [1, 2, 3, 4, 5, 6]
        await reference.reporter.wait_drained(5)

        await orchestrator.stop(None)  # restart: the open stream breaks
        await stub.SubmitQuery(ask("during"), timeout=5)
        restarted = RecordingOrchestrator(port=orchestrator.port)
        await restarted.start()
        during = await restarted.recorder.wait_finished("during")
        assert [n.sequence for n in during] == [1, 2, 3, 4, 5, 6]
        assert "".join(n.delta for n in during) == during[-1].result.text
        assert reference.reporter.connects >= 2
    finally:
        await channel.close(grace=None)
        await reference.stop(grace=0.1)
        await orchestrator.stop(None)
        if "restarted" in locals():
            await restarted.stop(None)


async def test_stop_waits_for_every_answer(stack: Stack) -> None:
    stub = query_pb2_grpc.QueryServiceStub(stack.channel)
    await stub.SubmitQuery(ask("j"), timeout=5)
    await stack.orchestrator.recorder.wait_finished("j")
    await stack.reference.stop(grace=0.1)
    counts = stack.reference.reporter.counts
    assert counts.answered == counts.accepted == 6
    assert stack.reference.reporter.unanswered == 0


async def test_stop_with_the_orchestrator_down_gives_up_in_time() -> None:
    address = f"127.0.0.1:{free_port()}"
    reference = ReferenceServices(reference_config(address, stop_timeout_s=0.3))
    await reference.start()
    async with grpc.aio.insecure_channel(reference.address) as channel:
        await query_pb2_grpc.QueryServiceStub(channel).SubmitQuery(ask("lost"), timeout=5)
    await reference.stop(grace=0.1)
    assert reference.reporter.unanswered > 0


async def test_stop_with_the_orchestrator_down_does_not_wait_for_the_stop_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failed = asyncio.Event()

    class OnFailure(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "ReportUpdates to" in record.getMessage():
                failed.set()

    handler = OnFailure()
    logging.getLogger("reference.reporter").addHandler(handler)
    reporter = Reporter(f"127.0.0.1:{free_port()}", (), reconnect_base_s=3600, reconnect_cap_s=3600)
    reporter.start()
    reporter.publish(
        Notice(
            event=task_update_pb2.NOTICE_EVENT_PROGRESS,
            service=common_pb2.SERVICE_QUERY,
            job_id="j",
            tenant_id="t",
            sequence=1,
        )
    )
    await failed.wait()  # the first attempt failed; it now backs off for an hour
    # An hour's stop timeout and an hour's backoff: stop returns only because it gives up at
    # once (the test's own timeout would end a wait).
    await reporter.stop(timeout_s=3600)
    assert reporter.unanswered == 1
    assert "stopping with 1 notice(s) unanswered" in caplog.text
    assert "reporter stopped with" not in caplog.text  # not the timeout's warning
    logging.getLogger("reference.reporter").removeHandler(handler)


async def test_no_notice_is_lost_when_the_stream_breaks_under_load() -> None:
    first = RecordingOrchestrator()
    await first.start()
    reporter = Reporter(first.address, (), reconnect_base_s=0.02, reconnect_cap_s=0.2)
    reporter.start()
    total = 3000

    async def produce() -> None:
        for i in range(total):
            reporter.publish(
                Notice(
                    event=task_update_pb2.NOTICE_EVENT_PROGRESS,
                    service=common_pb2.SERVICE_QUERY,
                    job_id=f"j{i}",
                    tenant_id="t",
                    sequence=1,
                )
            )
            if i % 50 == 0:
                await asyncio.sleep(0)  # let the stream run meanwhile

    producer = asyncio.create_task(produce())
    second = RecordingOrchestrator(port=first.port)
    try:
        await first.recorder.wait_until(lambda: len(first.recorder.notices) >= 100)
        await first.stop(None)  # breaks the stream mid-flow
        await second.start()
        await producer
        await reporter.wait_drained(20)
        await reporter.stop(5)
        jobs = {n.job_id for n in first.recorder.notices + second.recorder.notices}
        assert len(jobs) == total
    finally:
        producer.cancel()
        await reporter.stop(1)
        await first.stop(None)
        await second.stop(None)


def progress(job_id: str, sequence: int = 1) -> Notice:
    return Notice(
        event=task_update_pb2.NOTICE_EVENT_PROGRESS,
        service=common_pb2.SERVICE_QUERY,
        job_id=job_id,
        tenant_id="t",
        sequence=sequence,
    )


async def test_answered_notices_are_never_sent_again_after_a_restart() -> None:
    first = RecordingOrchestrator()
    await first.start()
    reporter = Reporter(first.address, (), reconnect_base_s=0.02, reconnect_cap_s=0.2)
    reporter.start()
    second = RecordingOrchestrator(port=first.port)
    try:
        for i in range(50):
            reporter.publish(progress(f"before{i}"))
        await reporter.wait_drained(10)  # every one answered
        assert reporter.counts.accepted == 50
        await first.stop(None)
        await second.start()
        reporter.publish(progress("after"))
        await reporter.wait_drained(10)
        assert [n.job_id for n in second.recorder.notices] == ["after"]
    finally:
        await reporter.stop(1)
        await first.stop(None)
        await second.stop(None)


async def test_unanswered_notices_are_sent_again_in_order_after_a_restart() -> None:
    first = RecordingOrchestrator()
    first.recorder.answering = False  # receives, then dies before answering
    await first.start()
    reporter = Reporter(first.address, (), reconnect_base_s=0.02, reconnect_cap_s=0.2)
    reporter.start()
    second = RecordingOrchestrator(port=first.port)
    try:
        reporter.publish(progress("early"))
        await first.recorder.wait_until(lambda: len(first.recorder.notices) == 1)
        sent = [f"j{i}" for i in range(20)]
        for job_id in sent:
            reporter.publish(progress(job_id))
        await first.recorder.wait_until(lambda: len(first.recorder.notices) == 21)
        assert reporter.unanswered == 21
        await first.stop(None)
        await second.start()
        await reporter.wait_drained(10)
        assert [n.job_id for n in second.recorder.notices] == ["early", *sent]
        assert reporter.counts.answered == 21
    finally:
        await reporter.stop(1)
        await first.stop(None)
        await second.stop(None)


async def test_an_answer_read_before_the_next_notice_is_asked_for_is_counted() -> None:
    """gRPC resumes the request generator only after a write, and may read the notice's
    answer first (a loaded machine): that answer still settles the notice."""
    reporter = Reporter("127.0.0.1:1", ())  # never started: the test plays the call
    reporter.publish(progress("j"))
    stream = _Stream()
    requests = reporter._requests(stream)
    written = await anext(requests)  # written; gRPC has not asked for the next one yet
    assert written.notice.job_id == "j"

    reporter._answered(stream, Answer(verdict=task_update_pb2.NOTICE_VERDICT_ACCEPTED))

    assert reporter.counts.accepted == 1
    assert reporter.unanswered == 0
    await reporter.wait_drained(0.1)


async def test_a_rejected_notice_is_counted_logged_and_not_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    orchestrator = RecordingOrchestrator()
    orchestrator.recorder.reject_job_ids.add("refused")
    await orchestrator.start()
    reporter = Reporter(orchestrator.address, ())
    reporter.start()
    try:
        reporter.publish(progress("refused"))
        reporter.publish(progress("fine"))
        await reporter.wait_drained(10)
        assert reporter.counts.rejected == {"wrong_service": 1}
        ((notice, answer),) = reporter.rejections
        assert notice.job_id == "refused" and answer.detail == "not yours"
        assert "notice rejected: wrong_service (job refused" in caplog.text
        assert [n.job_id for n in orchestrator.recorder.notices] == ["refused", "fine"]
    finally:
        await reporter.stop(1)
        await orchestrator.stop(None)
