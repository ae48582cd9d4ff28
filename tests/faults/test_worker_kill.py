"""kill -9 of an `orchestrator worker` process mid-batch: every item still gets exactly one
result, the items it had in flight are not run again as new jobs downstream (their redelivery
follows the job already started), and the tenant's usage counts each job once.

Two real worker processes share a private redis-server with an in-process server (which only
accepts the batch and the notices) and the reference services, whose Query service counts the
job ids it receives per prompt."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

import reference.app
from domain.ports.queue import QueuePriority
from orchestrator.v1 import batch_pb2
from query.v1 import query_pb2
from reference.app import ReferenceServices
from reference.config import ReferenceConfig
from reference.services import QueryServicer
from registry.keys import KeySpace
from tests.support.admin_calls import tenant_usage
from tests.support.batches import get_batch, llm_item, read_results, stream, submit
from tests.support.downstream import RecordingDispatcher
from tests.support.flow import EOF, Flow
from tests.support.redis_process import free_port
from tests.support.servers import running_server, service, test_settings

pytestmark = pytest.mark.timeout(90)

BIN = Path(sys.executable).parent
ITEMS = 300
LEASE_S = 2.0
KILL_AFTER = 90  # results streamed before one worker is killed


class Platform:
    """The server, the reference services and what their Query service received."""

    def __init__(self, flow: Flow, reference_address: str, key_prefix: str) -> None:
        self.flow = flow
        self.reference_address = reference_address
        self.key_prefix = key_prefix
        self.submits: dict[str, list[str]] = collections.defaultdict(list)  # prompt -> job ids


@pytest.fixture
async def platform(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Platform]:
    submits: dict[str, list[str]] = collections.defaultdict(list)

    class CountingQuery(QueryServicer):
        """The reference Query service, recording each submit's job id under its prompt."""

        async def SubmitQuery(
            self, request: query_pb2.SubmitQueryRequest, context: Any
        ) -> query_pb2.SubmitQueryResponse:
            submits[request.prompt].append(request.job_id)
            return await super().SubmitQuery(request, context)

    monkeypatch.setattr(reference.app, "QueryServicer", CountingQuery)
    orchestrator_port, reference_port = free_port(), free_port()
    settings = test_settings(
        redis_url,
        listen_address=f"127.0.0.1:{orchestrator_port}",
        batch_worker_enabled=False,
        chat_worker_enabled=False,
    )
    services = ReferenceServices(
        ReferenceConfig(
            listen_address=f"127.0.0.1:{reference_port}",
            orchestrator_address=f"127.0.0.1:{orchestrator_port}",
            step_delay_s=0.02,
            failure_rate=0.1,
            publish_metadata=service(),
        )
    )
    async with running_server(settings) as running:
        await services.start()
        try:
            found = Platform(
                Flow(running, RecordingDispatcher()),
                f"127.0.0.1:{reference_port}",
                settings.redis_key_prefix,
            )
            found.submits = submits
            yield found
        finally:
            await services.stop()


@pytest.fixture
def workers(
    platform: Platform, redis_url: str, tmp_path: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "ORCH_REDIS_KEY_PREFIX": platform.key_prefix,
        "ORCH_QUERY_SERVICE_ADDRESS": platform.reference_address,
        "ORCH_EMBEDDING_SERVICE_ADDRESS": platform.reference_address,
        "ORCH_BATCH_WORKER_CONCURRENCY": "16",
        "ORCH_BATCH_WORKER_POLL": "0.2",
        "ORCH_BATCH_WORKER_LEASE": str(LEASE_S),
    }
    procs = [
        subprocess.Popen(
            [str(BIN / "orchestrator"), "worker"],
            env=env,
            stdout=(tmp_path / f"worker{n}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for n in range(2)
    ]
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def leased_by(redis_url: str, key_prefix: str, pid: int) -> int:
    """How many batch items of tenant acme the worker process ``pid`` holds leases on."""
    stream_key = KeySpace(key_prefix).work_stream("batch", QueuePriority.NORMAL.value, "acme")
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        summary: Any = await client.xpending(stream_key, "w")
    finally:
        await client.aclose()
    consumers = summary.get("consumers") or []
    return sum(int(c["pending"]) for c in consumers if str(c["name"]).endswith(f"-{pid}"))


async def test_killing_a_worker_mid_batch_runs_each_item_once_and_counts_usage_once(
    platform: Platform, workers: list[subprocess.Popen[bytes]], redis_url: str
) -> None:
    flow = platform.flow
    prompts = {f"w{n}": f"question number {n}" for n in range(ITEMS)}
    batch = await submit(flow, [llm_item(cid, text) for cid, text in prompts.items()])
    call = stream(flow, batch.batch_id)
    results = await read_results(call, count=KILL_AFTER, timeout_s=60.0)

    victim = workers[0]
    victim.kill()  # SIGKILL: no chance to give its items back
    victim.wait()
    # It died holding leases: those items were in flight and come back after the lease.
    assert await leased_by(redis_url, platform.key_prefix, victim.pid) > 0

    while (message := await call.read()) is not EOF:
        results.append(message.result)

    # Every item has exactly one result.
    assert sorted(r.custom_id for r in results) == sorted(prompts)
    final = await get_batch(flow, batch.batch_id)
    assert final.state == batch_pb2.BATCH_STATE_COMPLETED
    assert final.counts.completed + final.counts.failed == ITEMS

    # No item's work reached the service as a second job: at most one job id per prompt, the
    # one its result names (a repeated hand-off of that same job would be allowed). Only an item
    # whose hand-off failed (a loaded machine can time out a call) never reached the service.
    for result in results:
        seen = set(platform.submits[prompts[result.custom_id]])
        assert seen <= {result.job_id}, f"{result.custom_id} ran as jobs {sorted(seen)}"
        if not seen:
            assert result.state == batch_pb2.BATCH_ITEM_STATE_FAILED, result
    assert sum(1 for r in results if platform.submits[prompts[r.custom_id]]) > ITEMS // 2

    # Usage counts one completed task per completed item, and its tokens once.
    completed = [r for r in results if r.state == batch_pb2.BATCH_ITEM_STATE_COMPLETED]
    assert 0 < len(completed) < ITEMS  # the reference services fail some on purpose
    usage = await tenant_usage(flow.channel, "acme")
    assert usage.completed_tasks == len(completed)
    assert usage.total.total_tokens == sum(r.usage.total_tokens for r in completed)

    survivor = workers[1]
    assert survivor.poll() is None
