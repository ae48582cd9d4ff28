"""`orchestrator-reference` as a real child process: serves, reports, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from query.v1 import query_pb2, query_pb2_grpc
from tests.support.redis_process import free_port
from tests.support.task_updates import RecordingOrchestrator

BIN = Path(sys.executable).parent


async def wait_serving(address: str, proc: asyncio.subprocess.Process, timeout_s: float) -> None:
    """Health/Check with wait_for_ready until SERVING (the process may still be starting)."""
    async with grpc.aio.insecure_channel(address) as channel, asyncio.timeout(timeout_s):
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True)
        assert proc.returncode is None
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_serves_reports_and_stops_on_sigterm(tmp_path: Path) -> None:
    orchestrator = RecordingOrchestrator()
    await orchestrator.start()
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "REF_LISTEN_ADDRESS": address,
        "REF_ORCHESTRATOR_ADDRESS": orchestrator.address,
        "REF_STEP_DELAY": "0",
    }
    log_path = tmp_path / "reference.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "orchestrator-reference"), env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        await wait_serving(address, proc, 20.0)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = query_pb2_grpc.QueryServiceStub(channel)
            request = query_pb2.SubmitQueryRequest(tenant_id="acme", prompt="hi", job_id="cli-1")
            assert (await stub.SubmitQuery(request, timeout=5)).job_id == "cli-1"
        notices = await orchestrator.recorder.wait_finished("cli-1")
        assert notices[-1].result.text == "Reference answer to: hi"

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
        output = log_path.read_text()
        assert "ReportUpdates closed" in output
        assert "answered 6" in output
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await orchestrator.stop(None)
