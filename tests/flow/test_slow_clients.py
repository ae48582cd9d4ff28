"""A slow client never holds back the others, and still receives every event in order."""

from __future__ import annotations

from tests.support.flow import Flow, kind_of, notice, read_events

EVENTS = 600


async def test_a_stalled_follower_catches_up_from_the_log_while_others_stream_live(
    flow: Flow,
) -> None:
    session_id = await flow.new_session()
    stalled = flow.follow(session_id)
    live = flow.follow(session_id)
    call, accepted = await flow.start_job(session_id)
    assert [e.job_id for e in await read_events(live, 1)] == [accepted.job_id]
    assert [e.job_id for e in await read_events(stalled, 1)] == [accepted.job_id]

    reply = await flow.publish(
        [notice(accepted.job_id, n, "delta", delta=str(n)) for n in range(1, EVENTS + 1)]
    )
    assert reply.accepted == EVENTS
    # The live follower gets everything while the stalled one has not read a single event.
    live_events = await read_events(live, EVENTS)
    assert [e.delta.text for e in live_events] == [str(n) for n in range(1, EVENTS + 1)]

    stalled_events = await read_events(stalled, EVENTS)
    assert [e.sequence for e in stalled_events] == [e.sequence for e in live_events]
    assert {kind_of(e) for e in stalled_events} == {"delta"}
    for stream in (stalled, live, call):
        stream.cancel()
