"""What the benchmarks share to run servers in processes of their own (so a process' memory and
CPU are its own): settings that do not throttle a benchmark, an orchestrator that serves until
SIGTERM, and :class:`Child`, a child process with its /proc readings.

A serving child prints ``PORT <n>`` once serving; :func:`start_serving` reads that line.
Peak memory is read from /proc: VmHWM, reset first through /proc/<pid>/clear_refs (Linux >= 4.0)
so it covers the measured phase only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.config import Settings
from server.gc_tuning import settle_heap
from tests.support.redis_cluster import RedisClusterProcess
from tests.support.redis_process import RedisProcess
from tests.support.servers import running_server, test_settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def bench_settings(redis_url: str | None, **overrides: Any) -> Settings:
    """Test settings without the limits that would throttle a benchmark, and with the
    service's own cadences of its background work (the tests shorten them: an idle queue
    worker polling ten times a second, the reaper ten times, cost a benchmark's server CPU
    that a deployed server does not spend)."""
    defaults = Settings()
    base: dict[str, Any] = dict(
        rate_limit_enabled=False,
        max_streams_per_tenant=50_000,
        max_concurrent_rpcs=100_000,
        ws_address="",
        metrics_address="",
        health_interval=defaults.health_interval,
        reaper_interval=defaults.reaper_interval,
        batch_worker_poll=defaults.batch_worker_poll,
        redis_socket_timeout=5.0,
        downstream_timeout=5.0,
        # The pool refuses (UNAVAILABLE) rather than queues beyond its size; bursts of stream
        # opens and chats need more than the default 64.
        redis_max_connections=256,
    )
    base.update(overrides)
    return test_settings(redis_url, **base)


@asynccontextmanager
async def loopback_server(
    register: Callable[[grpc.aio.Server], object], *, grace_s: float
) -> AsyncIterator[int]:
    """A bare grpc.aio server serving what ``register`` adds to it on a free loopback port,
    stopped (within ``grace_s``) on the way out; its port."""
    server = grpc.aio.server()
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace_s)


async def until_sigterm(port: int) -> None:
    """Print ``PORT <port>`` (start_serving reads it), then wait for SIGTERM."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"PORT {port}", flush=True)
    await stop.wait()


async def serve_until_sigterm(settings: Settings) -> None:
    """Run an orchestrator; print ``PORT <n>`` once serving and stop on SIGTERM."""
    async with running_server(settings) as running:
        settle_heap(settings.gc_young_threshold)  # as OrchestratorServer.serve_until_signalled
        await until_sigterm(running.server.port)


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
        """utime + stime: fields 14 and 15 of /proc/<pid>/stat counted from 1 ([0] is field 3)."""
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

    def __exit__(self, *exc_info: object) -> None:
        """Stop the child whether or not the block raised (an exception propagates)."""
        self.close()


def start_serving(module_args: list[str], name: str) -> tuple[Child, int]:
    """``python -m <module_args>``, a child that prints ``PORT <n>`` once serving: the child
    and that port."""
    proc = subprocess.Popen([sys.executable, "-m", *module_args], stdout=subprocess.PIPE, cwd=ROOT)
    child = Child(proc, name)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("PORT "):
        child.close()
        raise RuntimeError(f"{name} child did not start: {line!r}")
    return child, int(line.split()[1])


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


T = TypeVar("T")


async def on_private_redis(measure: Callable[[str], Awaitable[T]]) -> T:
    """``measure(redis_url)`` on a redis-server of its own, stopped afterwards."""
    redis_server = RedisProcess()
    redis_server.start()
    try:
        return await measure(redis_server.url)
    finally:
        redis_server.close()


async def on_private_cluster(measure: Callable[[str], Awaitable[T]]) -> T:
    """``measure(cluster_url)`` on a private 3-master Redis Cluster (``redis+cluster://``, every
    node on this machine), stopped afterwards."""
    with RedisClusterProcess() as cluster:
        return await measure(cluster.url)


async def on_redis_and_cluster(
    measure: Callable[[str], Awaitable[T]], *, cluster: bool
) -> tuple[T, T | None]:
    """``measure`` on a private single Redis, then (``cluster``) on a private cluster: the same
    shape on both backends in one run (None for the cluster when not asked)."""
    single = await on_private_redis(measure)
    return single, (await on_private_cluster(measure) if cluster else None)
