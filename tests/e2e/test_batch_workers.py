"""Batches and background messages run by `orchestrator worker` processes on Redis against the
reference services: the server only accepts the work and the notices; two worker processes
share the queues."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from orchestrator.v1 import batch_pb2
from reference.app import ReferenceServices
from reference.config import ReferenceConfig
from tests.support.batches import get_batch, llm_item, read_results, stream, submit
from tests.support.downstream import RecordingDispatcher
from tests.support.flow import Flow, kind_of, read_to_end
from tests.support.redis_process import free_port
from tests.support.servers import running_server, service, test_settings

BIN = Path(sys.executable).parent


@pytest.fixture
async def platform(redis_url: str) -> AsyncIterator[tuple[Flow, str]]:
    orchestrator_port, reference_port = free_port(), free_port()
    settings = test_settings(
        redis_url,
        listen_address=f"127.0.0.1:{orchestrator_port}",
        batch_worker_enabled=False,
        chat_worker_enabled=False,
    )
    reference = ReferenceServices(
        ReferenceConfig(
            listen_address=f"127.0.0.1:{reference_port}",
            orchestrator_address=f"127.0.0.1:{orchestrator_port}",
            step_delay_s=0.0,
            failure_rate=0.2,
            publish_metadata=service(),
        )
    )
    async with running_server(settings) as running:
        await reference.start()
        try:
            yield Flow(running, RecordingDispatcher()), f"127.0.0.1:{reference_port}"
        finally:
            await reference.stop()


@pytest.fixture
def workers(
    platform: tuple[Flow, str], redis_url: str, tmp_path: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    _, reference_address = platform
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "ORCH_QUERY_SERVICE_ADDRESS": reference_address,
        "ORCH_EMBEDDING_SERVICE_ADDRESS": reference_address,
        "ORCH_BATCH_WORKER_CONCURRENCY": "16",
        "ORCH_BATCH_WORKER_POLL": "0.2",
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


async def test_worker_processes_run_a_batch_exactly_once(
    platform: tuple[Flow, str], workers: list[subprocess.Popen[bytes]]
) -> None:
    flow, _ = platform
    batch = await submit(flow, [llm_item(f"w{n}", f"question {n}") for n in range(300)])
    results = await read_results(stream(flow, batch.batch_id), timeout_s=60.0)
    assert len(results) == 300
    assert set(collections.Counter(r.custom_id for r in results).values()) == {1}
    states = collections.Counter(r.state for r in results)
    final = await get_batch(flow, batch.batch_id)
    assert final.state == batch_pb2.BATCH_STATE_COMPLETED
    assert final.counts.completed == states[batch_pb2.BATCH_ITEM_STATE_COMPLETED]
    assert final.counts.failed == states[batch_pb2.BATCH_ITEM_STATE_FAILED]
    assert final.counts.completed + final.counts.failed == 300
    assert 0 < final.counts.failed < 300  # the reference services fail some on purpose
    for proc in workers:
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(timeout=15) for proc in workers] == [0, 0]


async def test_worker_processes_run_a_background_message(
    platform: tuple[Flow, str], workers: list[subprocess.Popen[bytes]]
) -> None:
    flow, _ = platform
    session_id = await flow.new_session()
    call = flow.send(session_id, "run me later", background=True)
    events = await read_to_end(call, timeout_s=30.0)
    assert events[0].accepted.queued
    assert kind_of(events[-1]) in ("completed", "failed")  # the reference fails some on purpose
    assert all(e.job_id == events[0].job_id for e in events)
