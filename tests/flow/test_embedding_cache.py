"""The embedding cache: the same (tenant, model, text) is answered from the cache through the
normal job flow, without a downstream call; both backends, plus sharing and invalidation across
servers on one Redis."""

from __future__ import annotations

import dataclasses
from typing import Any

from redis.asyncio import Redis

from orchestrator.admin.v1 import admin_pb2
from orchestrator.v1 import common_pb2
from tests.support.admin_calls import get_task, tenant_usage
from tests.support.downstream import RecordingDispatcher
from tests.support.flow import Flow, kind_of, notice, read_events, read_to_end
from tests.support.servers import running_server, test_settings

EMBEDDING = common_pb2.WORK_KIND_EMBEDDING
VECTOR = [0.25, -0.5, 1.0]


def embed(
    flow: Flow, session_id: str, text: str, model: str = "emb-1", tenant_id: str = "acme"
) -> Any:
    return flow.send(session_id, text, tenant_id=tenant_id, kind=EMBEDDING, model=model)


async def embed_via_service(
    flow: Flow, session_id: str, text: str, model: str = "emb-1", tenant_id: str = "acme"
) -> list[Any]:
    """An embedding the (recording) service computes: submit, then its completed notice."""
    call = embed(flow, session_id, text, model, tenant_id)
    accepted = (await call.read()).event
    work = await flow.dispatcher.next_submit()
    assert work.job_id == accepted.job_id and work.content == text
    result = common_pb2.JobResult(
        model=f"{model}-v3", embeddings=[common_pb2.Vector(values=VECTOR)]
    )
    reply = await flow.publish(
        [
            notice(
                accepted.job_id,
                1,
                "completed",
                tenant_id=tenant_id,
                service_pb=common_pb2.SERVICE_EMBEDDING,
                result=result,
                usage=common_pb2.TokenUsage(prompt_tokens=4, total_tokens=4),
            )
        ]
    )
    assert reply.accepted == 1
    return [accepted, *await read_to_end(call)]


async def test_a_repeated_embedding_is_answered_from_the_cache(flow: Flow) -> None:
    session_id = await flow.new_session()
    first = await embed_via_service(flow, session_id, "embed me")
    assert [kind_of(e) for e in first] == ["accepted", "completed"]

    other_session = await flow.new_session()
    events = await read_to_end(embed(flow, other_session, "embed me"))
    assert [kind_of(e) for e in events] == ["accepted", "completed"]
    done = events[1].completed
    assert [list(v.values) for v in done.result.embeddings] == [VECTOR]
    assert done.result.model == "emb-1-v3"
    assert done.usage.total_tokens == 0
    assert len(flow.dispatcher.submitted) == 1  # no downstream call for the hit
    # The hit is a real job of the session, visible to followers and to operators.
    task = await get_task(flow.channel, "acme", events[0].job_id)
    assert task.state == admin_pb2.TASK_STATE_COMPLETED and task.usage.total_tokens == 0
    replay = await read_events_of(flow, other_session)
    assert [kind_of(e) for e in replay] == ["accepted", "completed"]
    # The session bookkeeping matches the miss's: one message and its reply, session idle.
    miss, hit = await flow.get_session(session_id), await flow.get_session(other_session)
    assert hit.message_count == miss.message_count == 2
    assert hit.state == miss.state and not hit.pending_job_ids
    # Only the service's tokens count.
    assert (await tenant_usage(flow.channel, "acme")).total.total_tokens == 4


async def read_events_of(flow: Flow, session_id: str) -> list[Any]:
    return await read_events(flow.follow(session_id), 2)


async def test_other_text_model_or_tenant_is_not_a_hit(flow: Flow) -> None:
    session_id = await flow.new_session()
    await embed_via_service(flow, session_id, "embed me")
    await embed_via_service(flow, session_id, "embed me too")
    await embed_via_service(flow, session_id, "embed me", model="emb-2")
    globex = await flow.new_session("globex")
    await embed_via_service(flow, globex, "embed me", tenant_id="globex")
    assert len(flow.dispatcher.submitted) == 4


async def test_failed_embeddings_and_queries_are_not_cached(flow: Flow) -> None:
    session_id = await flow.new_session()
    call = embed(flow, session_id, "fails")
    accepted = (await call.read()).event
    await flow.dispatcher.next_submit()
    await flow.publish(
        [notice(accepted.job_id, 1, "failed", service_pb=common_pb2.SERVICE_EMBEDDING)]
    )
    await read_to_end(call)
    await embed_via_service(flow, session_id, "fails")  # dispatched again
    assert len(flow.dispatcher.submitted) == 2


async def test_a_zero_ttl_disables_the_cache(backend_url: str | None) -> None:
    dispatcher = RecordingDispatcher()
    settings = test_settings(backend_url, embedding_cache_ttl=0.0)
    async with running_server(settings, dispatcher=dispatcher) as running:
        flow = Flow(running, dispatcher)
        session_id = await flow.new_session()
        await embed_via_service(flow, session_id, "embed me")
        await embed_via_service(flow, session_id, "embed me")
        assert len(dispatcher.submitted) == 2


async def test_replicas_share_the_cache_and_a_new_model_version_invalidates_it(
    redis_url: str, redis_client: Redis
) -> None:
    base = test_settings(redis_url, embedding_cache_ttl=120.0)
    one, two, new_model = RecordingDispatcher(), RecordingDispatcher(), RecordingDispatcher()
    async with (
        running_server(base, dispatcher=one) as first,
        running_server(base, dispatcher=two) as second,
        running_server(
            dataclasses.replace(base, embedding_model_version="2"), dispatcher=new_model
        ) as upgraded,
    ):
        flow = Flow(first, one)
        await embed_via_service(flow, await flow.new_session(), "shared")
        (key,) = await redis_client.keys("ao:{t:acme}:embcache:*")
        assert 110_000 < await redis_client.pttl(key) <= 120_000
        # Another replica answers from the shared cache ...
        replica = Flow(second, two)
        events = await read_to_end(embed(replica, await replica.new_session(), "shared"))
        assert [kind_of(e) for e in events] == ["accepted", "completed"]
        assert not two.submitted
        # ... but a server with another model version calls the service.
        fresh = Flow(upgraded, new_model)
        await embed_via_service(fresh, await fresh.new_session(), "shared")
        assert len(new_model.submitted) == 1
