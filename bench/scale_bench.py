"""How chats/s and fan-out scale from one to two server processes: ``orchestrator serve
--processes N`` (N processes on one port through SO_REUSEPORT, one shared redis-server), N = 1
and 2 alternating in one run (1, 2, then 2, 1, ...), each phase a fresh start of the command.

- chats: SendMessage until ``completed``, closed loop at a fixed concurrency over 8 client
  connections (the kernel spreads connections, not calls, over the processes), the reference
  services answering at once in a process of their own (step delay 0, 2 deltas; their one
  ReportUpdates stream reaches one of the processes, which applies every notice through Redis).
  Figures: chats/s, and the server processes' CPU per chat (all of them, utime + stime).
- fan-out: 1,000 StreamSession streams over 100 sessions and 10 connections, each session with
  one embedding job in flight (accepted by a stub Embedding service in this process), delta
  notices published as fast as 8 PublishUpdates streams go (each through any process): peak
  delivered events/s.

Keys are real ones stored in the shared Redis (created through AdminService with a bootstrap
admin key). The client runs in this one process, on the same 2 cores as the servers, Redis and
the reference services: what a second process adds is what the machine has left. Each row also
shows the bare grpc.aio figure for its shape, measured in the same run (bench.machine). No
target: ``python -m bench.scale_bench [--rounds N] [--chats N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench import machine
from bench.flow_bench import (
    CHANNEL_OPTIONS,
    ChatResult,
    Followers,
    create_sessions,
    drive_chats,
    open_channels,
    publish_all,
)
from bench.machine import Limits
from bench.options import chat_load_parser
from bench.processes import BIN, loopback_server, on_private_redis
from bench.tables import print_table, quotient
from embedding.v1 import embedding_pb2, embedding_pb2_grpc
from orchestrator.admin.v1 import admin_pb2
from orchestrator.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from tests.support.admin_calls import create_api_key
from tests.support.processes import wait_healthy
from tests.support.redis_process import free_port
from tests.support.servers import bearer

TENANT = "bench"
BOOTSTRAP_ADMIN_KEY = "ao_benchscale_" + "s" * 43
Metadata = tuple[tuple[str, str], ...]


class StubEmbedding(embedding_pb2_grpc.EmbeddingServiceServicer):
    """Accepts every submit and never reports: the bench publishes the jobs' notices."""

    def __init__(self) -> None:
        self.submitted: set[str] = set()
        self.arrived = asyncio.Event()

    async def SubmitEmbedding(
        self, request: embedding_pb2.SubmitEmbeddingRequest, context: Any
    ) -> embedding_pb2.SubmitEmbeddingResponse:
        self.submitted.add(request.job_id)
        self.arrived.set()
        return embedding_pb2.SubmitEmbeddingResponse(job_id=request.job_id)


@contextlib.asynccontextmanager
async def stub_embedding() -> AsyncIterator[tuple[str, StubEmbedding]]:
    stub = StubEmbedding()  # type: ignore[abstract]
    async with loopback_server(
        lambda server: embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(stub, server),
        grace_s=0.2,
    ) as port:
        yield f"127.0.0.1:{port}", stub


@dataclass
class Platform:
    """What every phase shares: Redis, the port, the stub Embedding service, the reference
    services' address and the keys."""

    redis_url: str
    port: int
    embedding_address: str
    embedding: StubEmbedding
    reference_address: str
    log_dir: Path
    client: Metadata = ()
    service: Metadata = ()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "ORCH_LISTEN_ADDRESS": self.address,
            "ORCH_BOOTSTRAP_ADMIN_KEY": BOOTSTRAP_ADMIN_KEY,
            "ORCH_QUERY_SERVICE_ADDRESS": self.reference_address,
            "ORCH_EMBEDDING_SERVICE_ADDRESS": self.embedding_address,
            "ORCH_RATE_LIMIT_ENABLED": "false",
            "ORCH_MAX_STREAMS_PER_TENANT": "50000",
            "ORCH_MAX_CONCURRENT_RPCS": "100000",
            "ORCH_REDIS_MAX_CONNECTIONS": "256",
            "ORCH_WS_ADDRESS": "",
            "ORCH_METRICS_ADDRESS": "",
            "ORCH_AGENT_CHECK": "false",
            "ORCH_PLANS": "false",
            "ORCH_DEMO_KEYS": "false",
        }


class Served:
    """``orchestrator serve --processes N`` running, its log in a file."""

    def __init__(self, platform: Platform, processes: int) -> None:
        self.processes = processes
        self.log_path = platform.log_dir / f"serve-{processes}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(BIN / "orchestrator"), "serve", "--processes", str(processes)],
            env=platform.env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.address = platform.address

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout_s: float = 30.0) -> None:
        """Every process logged that it serves, and the port answers health checks."""
        wait_healthy(self.proc, self.address, "orchestrator", self.log, timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.log().count("serving on") < self.processes:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"not every process serves:\n{self.log()}")
            time.sleep(0.05)

    def server_pids(self) -> list[int]:
        if self.processes == 1:
            pid = self.proc.pid
            with open(f"/proc/{pid}/task/{pid}/children") as children:
                found = [int(child) for child in children.read().split()]
            return found or [pid]
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as children:
            return [int(child) for child in children.read().split()]

    def cpu_seconds(self) -> float:
        """utime + stime of every server process."""
        total = 0.0
        for pid in self.server_pids():
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def serving(platform: Platform, processes: int) -> Iterator[Served]:
    served = Served(platform, processes)
    try:
        served.wait_serving()
        yield served
    finally:
        served.stop()


@contextlib.contextmanager
def reference_process(platform: Platform, listen: str) -> Iterator[subprocess.Popen[bytes]]:
    """The reference services answering at once, reporting to the orchestrator's port."""
    env = {
        **os.environ,
        "REF_LISTEN_ADDRESS": listen,
        "REF_ORCHESTRATOR_ADDRESS": platform.address,
        "REF_STEP_DELAY": "0",
        "REF_DELTAS": "2",
        "REF_LOG_LEVEL": "WARNING",
        "REF_PUBLISH_API_KEY": platform.service[0][1].removeprefix("Bearer "),
    }
    log = (platform.log_dir / "reference.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "orchestrator-reference")], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield proc
    finally:
        log.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the two measurements -------------------------------------------------------------------------


async def chats(
    served: Served, client: Metadata, chats: int, concurrency: int, connections: int
) -> tuple[ChatResult, float]:
    """(chats over all connections, server CPU ms per chat)."""
    channels = open_channels(served.address, connections)
    try:
        per = [max(1, concurrency // connections)] * connections
        sessions = [
            await create_sessions(channel, 4 * n, metadata=client)
            for channel, n in zip(channels, per, strict=True)
        ]
        await asyncio.gather(
            *(
                drive_chats("warm-up", ch, s, n, n, metadata=client)
                for ch, s, n in zip(channels, sessions, per, strict=True)
            )
        )
        cpu_before = served.cpu_seconds()
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                drive_chats("chats", ch, s, chats // connections, n, metadata=client)
                for ch, s, n in zip(channels, sessions, per, strict=True)
            )
        )
        seconds = time.perf_counter() - started
        cpu = served.cpu_seconds() - cpu_before
    finally:
        for channel in channels:
            await channel.close(None)
    done = sum(r.chats for r in results)
    merged = ChatResult(
        f"{served.processes} process(es)",
        done,
        seconds,
        statistics.median(r.p50_ms for r in results),
        max(r.p99_ms for r in results),
    )
    return merged, 1000 * cpu / max(done, 1)


async def start_embedding_jobs(
    channel: grpc.aio.Channel, session_ids: list[str], stub: StubEmbedding, client: Metadata
) -> list[str]:
    """One embedding job in flight per session, handed to the stub (which never reports)."""
    chat = chat_pb2_grpc.ChatServiceStub(channel)
    job_ids: list[str] = []
    for start in range(0, len(session_ids), 50):
        calls = [
            chat.SendMessage(
                chat_pb2.SendMessageRequest(
                    session_id=sid, content="follow me", kind=common_pb2.WORK_KIND_EMBEDDING
                ),
                metadata=client,
                timeout=60,
            )
            for sid in session_ids[start : start + 50]
        ]
        firsts: list[Any] = await asyncio.gather(*(call.read() for call in calls))
        job_ids += [str(first.event.job_id) for first in firsts]
        while not set(job_ids) <= stub.submitted:
            stub.arrived.clear()
            await asyncio.wait_for(stub.arrived.wait(), 30)
        for call in calls:
            call.cancel()
    await asyncio.sleep(0.2)  # let each handler mark its job running after the submit
    return job_ids


async def fanout(
    served: Served, platform: Platform, notices: int, sessions: int = 100, per_session: int = 10
) -> float:
    """Peak delivered events/s to ``sessions * per_session`` streams."""
    channels = [
        grpc.aio.insecure_channel(served.address, options=CHANNEL_OPTIONS) for _ in range(10)
    ]
    followers = Followers(platform.client)
    try:
        session_ids = await create_sessions(channels[0], sessions, metadata=platform.client)
        jobs = await start_embedding_jobs(
            channels[0], session_ids, platform.embedding, platform.client
        )
        await followers.open(channels, session_ids, per_session)
        sequences = dict.fromkeys(jobs, 0)
        publish: dict[str, Any] = {
            "metadata": platform.service,
            "service_pb": common_pb2.SERVICE_EMBEDDING,
        }
        followers.expect(len(jobs) * per_session)
        await publish_all(channels, jobs, len(jobs), 8, sequences, **publish)
        await followers.wait_reached(60)
        followers.expect(notices * per_session)
        started = time.perf_counter()
        await publish_all(channels, jobs, notices, 8, sequences, **publish)
        await followers.wait_reached(120)
        return notices * per_session / (time.perf_counter() - started)
    finally:
        await followers.close()
        for channel in channels:
            await channel.close(None)


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Scale:
    chats_per_s: dict[int, list[float]] = field(default_factory=dict)
    cpu_ms: dict[int, list[float]] = field(default_factory=dict)
    events_per_s: dict[int, list[float]] = field(default_factory=dict)
    limits: Limits | None = None


async def measure(redis_url: str, args: argparse.Namespace, log_dir: Path) -> Scale:
    scale = Scale()
    async with stub_embedding() as (embedding_address, stub):
        reference = f"127.0.0.1:{free_port()}"
        platform = Platform(redis_url, free_port(), embedding_address, stub, reference, log_dir)
        with serving(platform, 1):
            platform.client = (
                bearer(
                    await create_api_key(
                        platform.address, BOOTSTRAP_ADMIN_KEY, TENANT, admin_pb2.API_KEY_ROLE_CLIENT
                    )
                ),
            )
            platform.service = (
                bearer(
                    await create_api_key(
                        platform.address,
                        BOOTSTRAP_ADMIN_KEY,
                        "platform",
                        admin_pb2.API_KEY_ROLE_SERVICE,
                    )
                ),
            )
        with reference_process(platform, reference):
            for round_number in range(args.rounds):
                order = (1, 2) if round_number % 2 == 0 else (2, 1)
                for processes in order:
                    with serving(platform, processes) as served:
                        result, cpu_ms = await chats(
                            served, platform.client, args.chats, args.concurrency, 8
                        )
                        events = await fanout(served, platform, args.notices)
                    scale.chats_per_s.setdefault(processes, []).append(result.per_second)
                    scale.cpu_ms.setdefault(processes, []).append(cpu_ms)
                    scale.events_per_s.setdefault(processes, []).append(events)
    scale.limits = await machine.measure()
    return scale


def print_results(scale: Scale, args: argparse.Namespace) -> None:
    limits = scale.limits
    assert limits is not None
    print(
        f"orchestrator serve --processes N on one Redis: chats ({args.concurrency} concurrent "
        f"over 8 connections) and fan-out (1,000 streams, {args.notices:,} notices); medians "
        f"of {args.rounds} alternating rounds"
    )
    one_chats = statistics.median(scale.chats_per_s[1])
    one_events = statistics.median(scale.events_per_s[1])
    rows: list[tuple[str, ...]] = [
        (
            "processes",
            "chats/s",
            "x 1 process",
            "of bare unary",
            "server CPU ms/chat",
            "fan-out events/s",
            "x 1 process",
            "of bare streaming",
        )
    ]
    for n in sorted(scale.chats_per_s):
        c, e = statistics.median(scale.chats_per_s[n]), statistics.median(scale.events_per_s[n])
        rows.append(
            (
                str(n),
                f"{c:,.0f}",
                f"{quotient(c, one_chats):.2f}",
                limits.unary_fraction(c),
                f"{statistics.median(scale.cpu_ms[n]):.2f}",
                f"{e:,.0f}",
                f"{quotient(e, one_events):.2f}",
                limits.stream_fraction(e),
            )
        )
    rows.append(
        (
            "bare grpc.aio",
            f"{limits.unary_per_s:,.0f}",
            "",
            "1",
            "",
            f"{limits.stream_messages_per_s:,.0f}",
            "",
            "1",
        )
    )
    print_table(rows)
    limits.print_line()


def main(argv: list[str] | None = None) -> int:
    p = chat_load_parser("bench.scale_bench", __doc__, chats_per="phase")
    p.set_defaults(rounds=2, chats=1600, concurrency=32)
    p.add_argument("--notices", type=int, default=2000, help="fan-out notices per phase")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as logs:
        scale: Scale = machine.run(on_private_redis(lambda url: measure(url, args, Path(logs))))
    print_results(scale, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
