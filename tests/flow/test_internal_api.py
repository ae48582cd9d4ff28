"""The internal platform API (orchestrator.internal.v1.PlatformService) over real gRPC, on both
backends: each call is a child job of the job the calling service runs (here the test plays
both that service and Query/Embedding, through the recording dispatcher and PublishUpdates),
its tokens add up exactly across the job, its final event, its session and its tenant; refusals
for jobs the caller may not call for; idempotent call ids; bounds on every field."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import grpc
import pytest

from domain.dispatch import CallContext, WorkRequest
from domain.errors import PermissionDenied
from domain.identity import Caller, Role
from domain.internal_calls import CompletionCall
from domain.models import Service, WorkKind
from orchestrator.internal.v1 import platform_pb2, platform_pb2_grpc
from orchestrator.v1 import common_pb2, session_pb2
from tests.support.admin_calls import get_task, quota_subjects, tenant_usage
from tests.support.flow import Flow, kind_of, notice, read_to_end
from tests.support.servers import admin, service, tenant

TIMEOUT_S = 10.0
MAX_CALLS = 3


@pytest.fixture
def flow_settings() -> dict[str, Any]:
    return {"internal_max_calls": MAX_CALLS}


def stub(flow: Flow) -> platform_pb2_grpc.PlatformServiceAsyncStub:
    return platform_pb2_grpc.PlatformServiceStub(flow.channel)


def usage(prompt: int, completion: int) -> common_pb2.TokenUsage:
    return common_pb2.TokenUsage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def complete_request(job_id: str, call_id: str = "c1", **fields: Any) -> Any:
    base: dict[str, Any] = {
        "tenant_id": "acme",
        "job_id": job_id,
        "call_id": call_id,
        "prompt": "summarize the tool results",
    }
    return platform_pb2.CompleteRequest(**{**base, **fields})


async def parent_job(flow: Flow, session_id: str | None = None) -> tuple[Any, str, str]:
    """A running job (its SendMessage call, id and session), as a service would hold it."""
    session_id = session_id or await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    await flow.publish([notice(accepted.job_id, 1, "progress", progress=0.1)])
    return call, accepted.job_id, session_id


async def answer_child(
    flow: Flow,
    text: str,
    tokens: tuple[int, int] = (3, 5),
    *,
    deltas: tuple[str, ...] = (),
    service_pb: int = common_pb2.SERVICE_QUERY,
    embedding: list[float] | None = None,
) -> WorkRequest:
    """Play Query (or Embedding): take the next submitted child job and complete it."""
    work = await flow.dispatcher.next_submit()
    notices = [
        notice(work.job_id, i + 1, "delta", delta=d, service_pb=service_pb)
        for i, d in enumerate(deltas)
    ]
    result = common_pb2.JobResult(text=text, model="m-child")
    if embedding is not None:
        result.embeddings.add(values=embedding)
    notices.append(
        notice(
            work.job_id,
            len(deltas) + 1,
            "completed",
            result=result,
            usage=usage(*tokens),
            service_pb=service_pb,
        )
    )
    reply = await flow.publish(notices)
    assert reply.accepted == len(notices), reply
    return work


async def finish_parent(flow: Flow, call: Any, job_id: str, tokens: tuple[int, int]) -> Any:
    """Play the parent's service: complete it with its own tokens; its final event."""
    await flow.publish(
        [
            notice(
                job_id,
                2,
                "completed",
                result=common_pb2.JobResult(text="done", model="m1"),
                usage=usage(*tokens),
            )
        ]
    )
    events = await read_to_end(call)
    assert kind_of(events[-1]) == "completed"
    return events[-1]


def today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


async def test_a_completion_runs_as_a_child_job_of_the_callers_job(flow: Flow) -> None:
    call, job_id, _ = await parent_job(flow)
    pending = asyncio.ensure_future(
        stub(flow).Complete(complete_request(job_id, model="m-x"), metadata=service())
    )
    work = await answer_child(flow, "the summary")
    reply = await asyncio.wait_for(pending, TIMEOUT_S)

    # The child took the parent's tenant and agent; the caller chose neither.
    assert (work.tenant_id, work.agent_id, work.kind) == ("acme", "agent-1", WorkKind.LLM_QUERY)
    assert (work.content, work.model) == ("summarize the tool results", "m-x")
    assert reply.text == "the summary" and reply.model == "m-child"
    assert reply.call_id == "c1" and reply.call_job_id == work.job_id and not reply.replayed
    assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (3, 8)
    await finish_parent(flow, call, job_id, (1, 1))


async def test_tokens_add_up_across_the_job_its_final_event_session_agent_and_tenant(
    flow: Flow,
) -> None:
    call, job_id, session_id = await parent_job(flow)
    for call_id, tokens in (("first", (3, 5)), ("second", (10, 20))):
        pending = asyncio.ensure_future(
            stub(flow).Complete(complete_request(job_id, call_id), metadata=service())
        )
        await answer_child(flow, call_id, tokens)
        await asyncio.wait_for(pending, TIMEOUT_S)
    final = await finish_parent(flow, call, job_id, (1, 2))

    # The job's own 3 tokens and its calls' 8 + 30, counted once everywhere.
    expected = (14, 27, 41)
    got = final.completed.usage
    assert (got.prompt_tokens, got.completion_tokens, got.total_tokens) == expected
    task = await get_task(flow.channel, "acme", job_id)
    assert (task.usage.prompt_tokens, task.usage.total_tokens) == (14, 41)
    session = await flow.get_session(session_id)
    assert session.token_usage.total_tokens == 41
    assert session.message_count == 2  # the message and its reply; the calls are none
    report = await tenant_usage(flow.channel, "acme")
    assert report.total.total_tokens == 41 and report.tokens_today == 41
    assert [(a.agent_id, a.total_tokens) for a in report.agents] == [("agent-1", 41)]


async def test_each_call_is_an_internal_call_step_of_the_jobs_plan(flow: Flow) -> None:
    call, job_id, _ = await parent_job(flow)
    pending = asyncio.ensure_future(
        stub(flow).Complete(complete_request(job_id), metadata=service())
    )
    await answer_child(flow, "ok")
    await asyncio.wait_for(pending, TIMEOUT_S)
    task = await get_task(flow.channel, "acme", job_id)
    steps = [(s.name, s.method, s.state) for s in task.plan]
    assert steps[-1] == ("internal_call", "Complete", common_pb2.PLAN_STEP_STATE_DONE)
    assert task.plan[-1].service == common_pb2.SERVICE_QUERY
    assert task.plan[-1].index == len(task.plan) - 1
    await finish_parent(flow, call, job_id, (1, 1))


async def test_stream_complete_sends_the_deltas_then_the_final_message(flow: Flow) -> None:
    call, job_id, _ = await parent_job(flow)
    request = platform_pb2.StreamCompleteRequest(
        tenant_id="acme", job_id=job_id, call_id="s1", prompt="go"
    )
    stream = stub(flow).StreamComplete(request, metadata=service(), timeout=TIMEOUT_S)

    async def read_all() -> list[platform_pb2.StreamCompleteResponse]:
        return [message async for message in stream]

    reading = asyncio.ensure_future(read_all())
    await answer_child(flow, "Hello world", (2, 2), deltas=("Hello", " world"))
    messages = await asyncio.wait_for(reading, TIMEOUT_S)
    assert [m.WhichOneof("event") for m in messages] == ["delta", "delta", "final"]
    assert [m.delta for m in messages[:2]] == ["Hello", " world"]
    assert messages[-1].final.text == "Hello world"
    assert messages[-1].final.usage.total_tokens == 4
    await finish_parent(flow, call, job_id, (1, 1))


async def test_a_retried_call_id_answers_the_first_outcome_and_is_not_charged_twice(
    flow: Flow,
) -> None:
    call, job_id, session_id = await parent_job(flow)
    pending = asyncio.ensure_future(
        stub(flow).Complete(complete_request(job_id, "same"), metadata=service())
    )
    # The caller retries while the first call still runs: both follow one child job.
    again = asyncio.ensure_future(
        stub(flow).Complete(complete_request(job_id, "same"), metadata=service())
    )
    await answer_child(flow, "once", (3, 5))
    first, second = await asyncio.wait_for(asyncio.gather(pending, again), TIMEOUT_S)
    later = await stub(flow).Complete(complete_request(job_id, "same"), metadata=service())

    assert first.text == second.text == later.text == "once"
    assert first.call_job_id == second.call_job_id == later.call_job_id
    assert later.replayed
    assert len(flow.dispatcher.submitted) == 2  # the parent and one child
    final = await finish_parent(flow, call, job_id, (0, 0))
    assert final.completed.usage.total_tokens == 8
    assert (await flow.get_session(session_id)).token_usage.total_tokens == 8
    assert (await tenant_usage(flow.channel, "acme")).total.total_tokens == 8


async def test_a_call_whose_caller_gave_up_still_runs_and_a_retry_reads_its_outcome(
    flow: Flow,
) -> None:
    call, job_id, _ = await parent_job(flow)
    first = stub(flow).Complete(complete_request(job_id, "slow"), metadata=service(), timeout=0.5)
    work = await flow.dispatcher.next_submit()  # accepted: the child job runs
    with pytest.raises(grpc.aio.AioRpcError) as gave_up:
        await first
    assert gave_up.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await flow.publish(
        [
            notice(
                work.job_id,
                1,
                "completed",
                result=common_pb2.JobResult(text="late", model="m-child"),
                usage=usage(2, 2),
            )
        ]
    )
    again = await stub(flow).Complete(complete_request(job_id, "slow"), metadata=service())
    assert (again.text, again.replayed, again.call_job_id) == ("late", True, work.job_id)
    assert len(flow.dispatcher.submitted) == 2
    final = await finish_parent(flow, call, job_id, (0, 0))
    assert final.completed.usage.total_tokens == 4


async def test_a_call_after_the_job_finished_is_a_failed_precondition(flow: Flow) -> None:
    call, job_id, _ = await parent_job(flow)
    await finish_parent(flow, call, job_id, (1, 1))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub(flow).Complete(complete_request(job_id), metadata=service())
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "not in flight" in (refused.value.details() or "")


async def test_a_call_for_another_tenants_job_is_not_found_like_an_unknown_job(
    flow: Flow,
) -> None:
    call, job_id, _ = await parent_job(flow)
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await stub(flow).Complete(complete_request(job_id, tenant_id="globex"), metadata=service())
    unknown_id = "01890a5d-ac96-774b-bcce-b302099a8057"
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub(flow).Complete(
            complete_request(unknown_id, tenant_id="globex"), metadata=service()
        )
    assert other.value.code() is unknown.value.code() is grpc.StatusCode.NOT_FOUND
    assert other.value.details() == f"job {job_id} not found for tenant globex"
    assert unknown.value.details() == f"job {unknown_id} not found for tenant globex"
    assert len(flow.dispatcher.submitted) == 1  # nothing ran
    await finish_parent(flow, call, job_id, (1, 1))


@pytest.mark.parametrize("key", ["client", "admin"])
async def test_only_service_keys_may_call_the_internal_api(flow: Flow, key: str) -> None:
    call, job_id, _ = await parent_job(flow)
    metadata = tenant("acme") if key == "client" else admin()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub(flow).Complete(complete_request(job_id), metadata=metadata)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    embed = platform_pb2.EmbedRequest(tenant_id="acme", job_id=job_id, call_id="e", texts=["x"])
    with pytest.raises(grpc.aio.AioRpcError) as embed_refused:
        await stub(flow).Embed(embed, metadata=metadata)
    assert embed_refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    await finish_parent(flow, call, job_id, (1, 1))


async def test_a_key_that_does_not_speak_for_the_jobs_service_is_refused(flow: Flow) -> None:
    call, job_id, _ = await parent_job(flow)  # a Query job
    calls = flow.running.server.services.internal_calls
    embedding_only = Caller("platform", Role.SERVICE, "k1", frozenset({Service.EMBEDDING}))
    request = CompletionCall("acme", job_id, "c1", "prompt")
    with pytest.raises(PermissionDenied, match="does not speak for the query service"):
        async for _ in calls.complete(embedding_only, CallContext("platform", "r1"), request):
            pass
    assert len(flow.dispatcher.submitted) == 1
    await finish_parent(flow, call, job_id, (1, 1))


async def test_a_job_may_make_a_bounded_number_of_calls(flow: Flow) -> None:
    call, job_id, _ = await parent_job(flow)
    for i in range(MAX_CALLS):
        pending = asyncio.ensure_future(
            stub(flow).Complete(complete_request(job_id, f"c{i}"), metadata=service())
        )
        await answer_child(flow, "ok", (1, 1))
        await asyncio.wait_for(pending, TIMEOUT_S)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub(flow).Complete(complete_request(job_id, "one-more"), metadata=service())
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota_subjects(refused.value) == [f"internal_calls:{job_id}"]
    # A retry of a call made before still answers.
    again = await stub(flow).Complete(complete_request(job_id, "c0"), metadata=service())
    assert again.replayed
    await finish_parent(flow, call, job_id, (1, 1))


async def test_embed_runs_one_child_per_text_then_answers_from_the_shared_cache(
    flow: Flow,
) -> None:
    call, job_id, session_id = await parent_job(flow)
    request = platform_pb2.EmbedRequest(
        tenant_id="acme", job_id=job_id, call_id="e1", texts=["alpha", "beta"]
    )
    pending = asyncio.ensure_future(stub(flow).Embed(request, metadata=service()))
    vectors: dict[str, list[float]] = {"alpha": [1.0, 0.0], "beta": [0.0, 1.0]}
    for _ in range(2):
        work = await flow.dispatcher.next_submit()
        assert work.kind is WorkKind.EMBEDDING and work.tenant_id == "acme"
        await flow.publish(
            [
                notice(
                    work.job_id,
                    1,
                    "completed",
                    result=common_pb2.JobResult(
                        embeddings=[common_pb2.Vector(values=vectors[work.content])]
                    ),
                    usage=usage(2, 0),
                    service_pb=common_pb2.SERVICE_EMBEDDING,
                )
            ]
        )
    reply = await asyncio.wait_for(pending, TIMEOUT_S)
    assert [list(v.values) for v in reply.embeddings] == [[1.0, 0.0], [0.0, 1.0]]
    assert reply.usage.total_tokens == 4 and reply.cached == 0

    # The same texts under a new call id: from the cache, no child job, no tokens.
    cached = await stub(flow).Embed(
        platform_pb2.EmbedRequest(
            tenant_id="acme", job_id=job_id, call_id="e2", texts=["beta", "alpha"]
        ),
        metadata=service(),
    )
    assert [list(v.values) for v in cached.embeddings] == [[0.0, 1.0], [1.0, 0.0]]
    assert cached.cached == 2 and cached.usage.total_tokens == 0
    assert len(flow.dispatcher.submitted) == 3  # the parent and two children
    final = await finish_parent(flow, call, job_id, (1, 1))
    assert final.completed.usage.total_tokens == 6
    assert (await flow.get_session(session_id)).token_usage.total_tokens == 6
    assert (await tenant_usage(flow.channel, "acme")).total.total_tokens == 6


async def test_the_calls_sessions_are_not_listed_with_the_tenants_sessions(flow: Flow) -> None:
    call, job_id, session_id = await parent_job(flow)
    pending = asyncio.ensure_future(
        stub(flow).Complete(complete_request(job_id), metadata=service())
    )
    await answer_child(flow, "ok")
    await asyncio.wait_for(pending, TIMEOUT_S)
    listed = await flow.sessions.ListSessions(
        session_pb2.ListSessionsRequest(), metadata=tenant("acme")
    )
    assert [s.session_id for s in listed.sessions] == [session_id]
    await finish_parent(flow, call, job_id, (1, 1))


JOB = "01890a5d-ac96-774b-bcce-b302099a8057"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tenant_id": ""}, "tenant_id"),
        ({"tenant_id": "bad tenant"}, "tenant_id"),
        ({"tenant_id": "t" * 2000}, "tenant_id"),
        ({"job_id": ""}, "job_id"),
        ({"job_id": "not-a-job"}, "job_id"),
        ({"job_id": "j" * 2000}, "job_id"),
        ({"call_id": ""}, "call_id"),
        ({"call_id": "has space"}, "call_id"),
        ({"call_id": "c" * 65}, "call_id"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "p" * (64 * 1024 + 1)}, "prompt"),
        ({"model": "m" * 129}, "model"),
        ({"collections": ["c"] * 33}, "collections"),
        ({"collections": [""]}, "collections[0]"),
        ({"collections": ["c" * 257]}, "collections[0]"),
    ],
)
async def test_complete_refuses_bad_input_naming_the_field(
    flow: Flow, fields: dict[str, Any], field: str
) -> None:
    async def unary() -> None:
        await stub(flow).Complete(complete_request(**{"job_id": JOB, **fields}), metadata=service())

    async def streamed() -> None:
        base = {"tenant_id": "acme", "job_id": JOB, "call_id": "c", "prompt": "p"}
        request = platform_pb2.StreamCompleteRequest(**{**base, **fields})
        async for _ in stub(flow).StreamComplete(request, metadata=service()):
            pass

    for call in (unary, streamed):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call()
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert field in (refused.value.details() or ""), refused.value.details()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tenant_id": ""}, "tenant_id"),
        ({"job_id": "nope"}, "job_id"),
        ({"call_id": "a/b"}, "call_id"),
        ({"texts": []}, "texts"),
        ({"texts": ["x"] * 33}, "texts"),
        ({"texts": ["x"] * 2000}, "texts"),
        ({"texts": ["ok", ""]}, "texts[1]"),
        ({"texts": ["t" * 8193]}, "texts[0]"),
        ({"model": "m" * 129}, "model"),
    ],
)
async def test_embed_refuses_bad_input_naming_the_field(
    flow: Flow, fields: dict[str, Any], field: str
) -> None:
    base: dict[str, Any] = {"tenant_id": "acme", "job_id": JOB, "call_id": "e", "texts": ["x"]}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub(flow).Embed(platform_pb2.EmbedRequest(**{**base, **fields}), metadata=service())
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in (refused.value.details() or ""), refused.value.details()
