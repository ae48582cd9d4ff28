"""PublishUpdates: every notice is judged on its own and the stream answers with the tally."""

from __future__ import annotations

import grpc
import pytest

from orchestrator.v1 import common_pb2, session_pb2, task_update_pb2
from tests.support.flow import Flow, completed, kind_of, notice, read_to_end
from tests.support.servers import tenant

UNKNOWN_JOB = "0190a0b0-0000-7000-8000-000000000001"


async def test_bad_notices_are_counted_and_never_end_the_stream(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    job_id = accepted.job_id
    reply = await flow.publish(
        [
            notice(UNKNOWN_JOB, 1, "progress"),
            notice(job_id, 1, "progress", tenant_id="globex"),
            notice(job_id, 1, "progress", service_pb=common_pb2.SERVICE_EMBEDDING),
            task_update_pb2.PublishUpdatesRequest(job_id=job_id, tenant_id="acme", sequence=1),
            notice("not-a-job-id", 1, "progress"),
            notice(job_id, 1, "delta", delta="a"),
            notice(job_id, 1, "delta", delta="a"),  # repeated: duplicate
            completed(job_id, 2, "a"),
            notice(job_id, 3, "delta", delta="late"),  # after the end
        ]
    )
    assert reply.received == 9
    assert reply.accepted == 2
    assert reply.duplicate == 1
    assert reply.rejected_unknown_job == 1
    assert reply.rejected_wrong_tenant == 1
    assert reply.rejected_wrong_service == 1
    assert reply.rejected_malformed == 2
    assert reply.rejected_job_finished == 1
    assert [(r.index, r.reason) for r in reply.rejected] == [
        (0, task_update_pb2.REJECT_REASON_UNKNOWN_JOB),
        (1, task_update_pb2.REJECT_REASON_WRONG_TENANT),
        (2, task_update_pb2.REJECT_REASON_WRONG_SERVICE),
        (3, task_update_pb2.REJECT_REASON_MALFORMED),
        (4, task_update_pb2.REJECT_REASON_MALFORMED),
        (8, task_update_pb2.REJECT_REASON_JOB_FINISHED),
    ]
    assert "event" in reply.rejected[3].detail
    assert "job_id" in reply.rejected[4].detail
    events = await read_to_end(call)
    assert [kind_of(e) for e in events] == ["delta", "completed"]


async def test_a_wrong_tenant_notice_changes_nothing(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    reply = await flow.publish([completed(accepted.job_id, 1, "forged", tenant_id="globex")])
    assert reply.rejected_wrong_tenant == 1
    session = await flow.get_session(session_id)
    assert session.state == session_pb2.SESSION_STATE_BUSY
    assert session.token_usage.total_tokens == 0
    # the real completion still applies
    await flow.publish([completed(accepted.job_id, 1, "real")])
    (done,) = await read_to_end(call)
    assert done.completed.result.text == "real"


async def test_a_duplicate_completion_counts_usage_once(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    first = await flow.publish([completed(accepted.job_id, 1, "x")])
    again = await flow.publish([completed(accepted.job_id, 1, "x")])
    assert (first.accepted, again.duplicate) == (1, 1)
    await read_to_end(call)
    session = await flow.get_session(session_id)
    assert session.token_usage.total_tokens == 8


async def test_only_services_may_publish(flow: Flow) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await flow.publish([notice(UNKNOWN_JOB, 1, "progress")], metadata=tenant("acme"))
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_an_empty_stream_gets_an_empty_tally(flow: Flow) -> None:
    reply = await flow.publish([])
    assert reply.received == 0
