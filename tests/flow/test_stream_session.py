"""StreamSession: every event after the cursor, then live ones, with no gap or duplicate."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from orchestrator.v1 import session_pb2
from tests.support.flow import Flow, completed, kind_of, notice, read_events, read_to_end
from tests.support.servers import tenant


@pytest.fixture
def flow_settings() -> dict[str, Any]:
    return {"event_log_max_events": 8}


async def test_a_follower_sees_the_jobs_of_other_callers_live(flow: Flow) -> None:
    session_id = await flow.new_session()
    follower = flow.follow(session_id)
    call, accepted = await flow.start_job(session_id)
    (seen,) = await read_events(follower, 1)
    assert seen.job_id == accepted.job_id and kind_of(seen) == "accepted"
    await flow.publish([notice(accepted.job_id, 1, "delta", delta="x")])
    (delta,) = await read_events(follower, 1)
    assert delta.delta.text == "x"
    follower.cancel()
    call.cancel()


async def test_a_dropped_stream_resumes_from_its_cursor_exactly_once(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    job_id = accepted.job_id
    first = flow.follow(session_id)
    await flow.publish([notice(job_id, 1, "delta", delta="a")])
    seen = await read_events(first, 2)  # accepted, delta a
    first.cancel()  # the client drops mid-job
    await flow.publish(
        [notice(job_id, 2, "delta", delta="b"), notice(job_id, 3, "delta", delta="c")]
    )
    resumed = flow.follow(session_id, after=seen[-1].sequence)
    await flow.publish([completed(job_id, 4, "abc")])
    rest = await read_events(resumed, 3)
    sequences = [e.sequence for e in seen + rest]
    assert sequences == list(range(sequences[0], sequences[0] + 5))
    assert [kind_of(e) for e in rest] == ["delta", "delta", "completed"]
    resumed.cancel()
    await read_to_end(call)


async def test_a_cursor_older_than_the_log_starts_with_history_truncated(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    await flow.publish([notice(accepted.job_id, n, "delta", delta=str(n)) for n in range(1, 12)])
    # 12 events were written and 8 are retained: sequences 5..12.
    follower = flow.follow(session_id, after=1)
    events = await read_events(follower, 9)
    assert kind_of(events[0]) == "history_truncated"
    truncated = events[0].history_truncated
    assert (truncated.requested_after_sequence, truncated.oldest_retained_sequence) == (1, 5)
    assert [e.sequence for e in events[1:]] == list(range(5, 13))
    follower.cancel()
    call.cancel()


async def test_a_cursor_of_zero_replays_what_is_retained(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    await flow.publish([completed(accepted.job_id, 1, "x")])
    await read_to_end(call)
    replay = await read_events(flow.follow(session_id), 2)
    assert [kind_of(e) for e in replay] == ["accepted", "completed"]


async def test_closing_the_session_ends_its_streams(flow: Flow) -> None:
    session_id = await flow.new_session()
    follower = flow.follow(session_id)
    await flow.sessions.CloseSession(
        session_pb2.CloseSessionRequest(session_id=session_id), metadata=tenant("acme")
    )
    assert await read_to_end(follower) == []


async def test_following_another_tenants_session_is_not_found(flow: Flow) -> None:
    session_id = await flow.new_session("acme")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await read_to_end(flow.follow(session_id, tenant_id="globex"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_negative_cursor_is_invalid(flow: Flow) -> None:
    session_id = await flow.new_session()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await read_to_end(flow.follow(session_id, after=-1))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_many_sessions_followed_at_once_on_a_fresh_server(flow: Flow) -> None:
    # The first subscriptions of a process race to open its pub/sub connection; each must be
    # confirmed on the one connection the reader reads (none leaked, none lost).
    sessions = [await flow.new_session() for _ in range(12)]
    calls = [flow.send(session_id) for session_id in sessions]
    firsts = [await read_events(call, 1) for call in calls]
    assert all(kind_of(first) == "accepted" for (first,) in firsts)
    for call in calls:
        call.cancel()
