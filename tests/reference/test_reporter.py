"""The reporter's single stream survives an orchestrator that is late or restarts."""

from __future__ import annotations

import grpc

from query.v1 import query_pb2, query_pb2_grpc
from reference.app import ReferenceServices
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


async def test_stop_half_closes_and_gets_the_counts(stack: Stack) -> None:
    stub = query_pb2_grpc.QueryServiceStub(stack.channel)
    await stub.SubmitQuery(ask("j"), timeout=5)
    await stack.orchestrator.recorder.wait_finished("j")
    await stack.reference.stop(grace=0.1)
    response = stack.reference.reporter.last_response
    assert response is not None
    assert response.received == response.accepted == 6
    assert stack.reference.reporter.unwritten == 0


async def test_stop_with_the_orchestrator_down_gives_up_in_time() -> None:
    address = f"127.0.0.1:{free_port()}"
    reference = ReferenceServices(reference_config(address, stop_timeout_s=0.3))
    await reference.start()
    async with grpc.aio.insecure_channel(reference.address) as channel:
        await query_pb2_grpc.QueryServiceStub(channel).SubmitQuery(ask("lost"), timeout=5)
    await reference.stop(grace=0.1)
    assert reference.reporter.unwritten > 0
