"""The processes of the batch benchmark, each in its own OS process so its memory is its own:

- the orchestrator (``python -m bench.batch_processes REDIS_URL QUERY_ADDRESS PORT
  CONCURRENCY``): a real OrchestratorServer on a private Redis with the batch worker embedded,
  accepting the deterministic test keys (tests.support.keys); prints ``PORT <n>`` once serving
  and stops on SIGTERM;
- optionally ``orchestrator worker`` processes sharing the batch queue;
- the reference Query/Embedding services (``orchestrator-reference``, REF_* settings), reporting
  to that orchestrator with the test service key.

Peak memory is read from /proc: VmHWM, reset first through /proc/<pid>/clear_refs (Linux >= 4.0)
so it covers the measured phase only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from domain.identity import Role
from server.config import Settings
from tests.support.keys import api_key_for
from tests.support.servers import running_server, test_settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def orchestrator_settings(
    redis_url: str, query_address: str, port: int, concurrency: int
) -> Settings:
    """A server with the batch worker on and nothing that would throttle the benchmark."""
    return test_settings(
        redis_url,
        listen_address=f"127.0.0.1:{port}",
        query_service_address=query_address,
        embedding_service_address=query_address,
        rate_limit_enabled=False,
        max_streams_per_tenant=10_000,
        ws_address="",
        metrics_address="",
        health_interval=1.0,
        reaper_interval=1.0,
        redis_socket_timeout=5.0,
        downstream_timeout=5.0,
        redis_max_connections=256,
        batch_worker_enabled=True,
        batch_worker_concurrency=concurrency,
        batch_worker_poll=0.2,
    )


async def serve(redis_url: str, query_address: str, port: int, concurrency: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("server.app").setLevel(logging.ERROR)
    settings = orchestrator_settings(redis_url, query_address, port, concurrency)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with running_server(settings) as running:
        print(f"PORT {running.server.port}", flush=True)
        await stop.wait()


class Child:
    """A child process with its /proc readings; a context manager that stops it."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str) -> None:
        self.proc = proc
        self.name = name

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status_bytes(self, field: str) -> int:
        """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), in bytes."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} for {self.name}")

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS; False when the kernel does not allow it."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError:
            return False
        return True

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_orchestrator(redis_url: str, query_address: str, port: int, concurrency: int) -> Child:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.batch_processes",
            redis_url,
            query_address,
            str(port),
            str(concurrency),
        ],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    child = Child(proc, "orchestrator")
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("PORT "):
        child.close()
        raise RuntimeError(f"orchestrator child did not start: {line!r}")
    return child


def start_reference(
    listen_port: int,
    orchestrator_address: str,
    *,
    step_delay_s: float,
    deltas: int,
    failure_rate: float,
) -> Child:
    """``orchestrator-reference`` publishing with the test service key (then
    ``await wait_serving(child, address)``)."""
    env = {
        **os.environ,
        "REF_LISTEN_ADDRESS": f"127.0.0.1:{listen_port}",
        "REF_ORCHESTRATOR_ADDRESS": orchestrator_address,
        "REF_STEP_DELAY": str(step_delay_s),
        "REF_DELTAS": str(deltas),
        "REF_FAILURE_RATE": str(failure_rate),
        "REF_SILENT_RATE": "0",
        "REF_PUBLISH_API_KEY": api_key_for("platform", Role.SERVICE),
        "REF_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen([str(BIN / "orchestrator-reference")], env=env, cwd=ROOT)
    return Child(proc, "reference services")


def start_worker(redis_url: str, query_address: str, concurrency: int) -> Child:
    """``orchestrator worker``: batch items only, on the same Redis queue as the server."""
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "ORCH_QUERY_SERVICE_ADDRESS": query_address,
        "ORCH_EMBEDDING_SERVICE_ADDRESS": query_address,
        "ORCH_BATCH_WORKER_POLL": "0.2",
        "ORCH_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [str(BIN / "orchestrator"), "worker", "--concurrency", str(concurrency)], env=env, cwd=ROOT
    )
    return Child(proc, "orchestrator worker")


async def wait_serving(child: Child, address: str, timeout_s: float = 20.0) -> None:
    """Return once the child's gRPC health service answers SERVING."""
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            child.check_alive()
            try:
                reply: Any = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{child.name} did not become healthy on {address}")


def main(argv: list[str]) -> int:
    redis_url, query_address, port, concurrency = argv
    asyncio.run(serve(redis_url, query_address, int(port), int(concurrency)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
