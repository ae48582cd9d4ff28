"""Memory under steady load (``make soak``; not part of ``make test``, CI or ``make bench``).

Four processes on loopback: a private redis-server, ``orchestrator serve`` (the real command,
configured by environment variables as in production, with its bootstrap admin key), the
reference Query and Embedding services (``orchestrator-reference``, in their own process so
the server's memory is its own) and this process, the client. The client creates a client key
and a service key through AdminService, gives each of ``--streams`` sessions one chat, then
follows each of them with an idle StreamSession stream (open once its first event arrives),
and sends chats at ``--rate`` per second for ``--duration`` seconds (open loop), spread over
lanes of sessions: each lane sends on its session and moves to a fresh one every
``--chats-per-session`` chats, so sessions come and go as they would in production.

Every ``--sample-interval`` seconds it reads the server's RSS (/proc/<pid>/status VmRSS) and
the number of chats that have ended. After ``--warm-up`` seconds it reports: the RSS at the end
of the warm-up and at the end, the growth per chat (least-squares slope of RSS over chats after
the warm-up) and whether it levelled off (the slope over the last third of the samples after
the warm-up against the slope over the first third). The reference services' RSS and Redis'
used_memory are reported beside it; ``--samples FILE`` writes every sample as CSV. The
levelled-off test is coarse: RSS moves in allocator arenas (up to a MiB), so when the growth
is tiny a single step decides it; look at the samples. ``--tracemalloc FILE`` runs the server with
``orchestrator serve --tracemalloc FILE`` and asks it for a report (SIGUSR1) at the end of the
warm-up, after each third and at the end (tracing slows the server and adds to its RSS).

Bounded in count and time: every call has a deadline, the run stops after ``--duration`` and
the processes are stopped on the way out. ``python -m bench.soak [--streams N] ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import csv
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from redis.asyncio import Redis

from bench.options import doc_parser
from bench.processes import BIN, ROOT, Child, on_private_redis, wait_serving
from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.v1 import chat_pb2, chat_pb2_grpc, session_pb2, session_pb2_grpc
from tests.support.redis_process import free_port

TENANT = "soak"
# Slope (bytes per chat) under which the last third counts as flat whatever the first was: the
# RSS moves in pages and allocator arenas, so a slope this small is noise.
FLAT_BYTES_PER_CHAT = 32.0
# The last third levels off when its slope is at most this share of the first third's.
LEVELLED_SHARE = 0.25
CHAT_TIMEOUT_S = 60.0


def least_squares_slope(points: Sequence[tuple[float, float]]) -> float:
    """Slope of the least-squares line through (x, y) points; 0 when x does not vary."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    if var_x == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x


@dataclass(frozen=True, slots=True)
class Sample:
    seconds: float  # since the steady load started
    chats: int  # chats ended by then
    rss: int  # the server's, bytes
    reference_rss: int


@dataclass
class Growth:
    """RSS against chats after the warm-up."""

    samples: list[Sample]

    def _points(self, part: Sequence[Sample]) -> list[tuple[float, float]]:
        return [(float(s.chats), float(s.rss)) for s in part]

    @property
    def chats(self) -> int:
        return self.samples[-1].chats - self.samples[0].chats if self.samples else 0

    @property
    def per_chat(self) -> float:
        """Bytes of RSS per chat over the whole measured phase."""
        return least_squares_slope(self._points(self.samples))

    def thirds(self) -> tuple[float, float]:
        """Slopes (bytes per chat) over the first and the last third of the samples."""
        third = len(self.samples) // 3
        if third < 2:
            return 0.0, 0.0
        first = least_squares_slope(self._points(self.samples[:third]))
        last = least_squares_slope(self._points(self.samples[-third:]))
        return first, last

    @property
    def levelled_off(self) -> bool:
        first, last = self.thirds()
        return last <= max(LEVELLED_SHARE * first, FLAT_BYTES_PER_CHAT)


@dataclass
class Results:
    streams: int
    rate: float
    duration_s: float
    warm_up_s: float
    samples: list[Sample] = field(default_factory=list)
    sent: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    stream_errors: list[str] = field(default_factory=list)
    streams_open_at_end: int = 0
    rss_start: int = 0  # at the end of the warm-up
    rss_end: int = 0
    reference_start: int = 0
    reference_end: int = 0
    redis_start: int = 0
    redis_end: int = 0
    tracemalloc_file: str = ""

    @property
    def growth(self) -> Growth:
        return Growth([s for s in self.samples if s.seconds >= self.warm_up_s])

    def problems(self) -> list[str]:
        found: list[str] = []
        ended = sum(self.outcomes.values())
        bad = {k: n for k, n in self.outcomes.items() if k not in ("completed", "failed")}
        if bad:
            found.append(f"chats that did not end completed or failed: {bad}")
        if ended < self.sent:
            found.append(f"{self.sent - ended} of {self.sent} chats did not end")
        if self.stream_errors:
            found.append(
                f"{len(self.stream_errors)} idle streams ended early, e.g. {self.stream_errors[0]}"
            )
        if self.streams_open_at_end != self.streams:
            found.append(f"{self.streams_open_at_end} of {self.streams} idle streams open at end")
        if len(self.growth.samples) < 6:
            found.append("too few samples after the warm-up for a slope")
        return found


# -- the processes --------------------------------------------------------------------------------


def start_server(
    redis_url: str,
    port: int,
    reference_address: str,
    admin_key: str,
    *,
    streams: int,
    tracemalloc_file: str,
) -> Child:
    """``orchestrator serve`` on loopback, configured as in production except for the rate
    limits (off: the soak sends faster than the default tenant rate), the stream cap and the
    agent check (off: no Agent Management)."""
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "ORCH_LISTEN_ADDRESS": f"127.0.0.1:{port}",
        "ORCH_BOOTSTRAP_ADMIN_KEY": admin_key,
        "ORCH_QUERY_SERVICE_ADDRESS": reference_address,
        "ORCH_EMBEDDING_SERVICE_ADDRESS": reference_address,
        "ORCH_RATE_LIMIT_ENABLED": "false",
        "ORCH_MAX_STREAMS_PER_TENANT": str(streams + 1000),
        "ORCH_WS_ADDRESS": "",
        "ORCH_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
        "ORCH_EMBEDDED_REFERENCE": "false",
        "ORCH_LOG_LEVEL": "WARNING",
        # Its sessions name a soak agent no Agent Management defines: any agent id.
        "ORCH_AGENT_CHECK": "false",
        "ORCH_PLANS": "false",
    }
    command = [str(BIN / "orchestrator"), "serve"]
    if tracemalloc_file:
        command += ["--tracemalloc", tracemalloc_file]
    return Child(subprocess.Popen(command, env=env, cwd=ROOT), "orchestrator serve")


def start_reference(port: int, orchestrator_address: str, service_key: str) -> Child:
    env = {
        **os.environ,
        "REF_LISTEN_ADDRESS": f"127.0.0.1:{port}",
        "REF_ORCHESTRATOR_ADDRESS": orchestrator_address,
        "REF_PUBLISH_API_KEY": service_key,
        "REF_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen([str(BIN / "orchestrator-reference")], env=env, cwd=ROOT)
    return Child(proc, "reference services")


async def create_key(
    channel: grpc.aio.Channel, admin_key: str, tenant: str, role: admin_pb2.ApiKeyRole.ValueType
) -> str:
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    reply = await stub.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant_id=tenant, role=role, description="soak"),
        metadata=(("authorization", f"Bearer {admin_key}"),),
        timeout=10,
    )
    return str(reply.api_key)


@dataclass
class Platform:
    server: Child
    reference: Child
    channel: grpc.aio.Channel
    client_metadata: tuple[tuple[str, str], ...]


@contextlib.asynccontextmanager
async def platform(redis_url: str, args: argparse.Namespace) -> AsyncIterator[Platform]:
    server_port, reference_port = free_port(), free_port()
    server_address = f"127.0.0.1:{server_port}"
    reference_address = f"127.0.0.1:{reference_port}"
    admin_key = f"ao_soakadmin_{secrets.token_urlsafe(32)}"
    with contextlib.ExitStack() as children:
        server = children.enter_context(
            start_server(
                redis_url,
                server_port,
                reference_address,
                admin_key,
                streams=args.streams,
                tracemalloc_file=args.tracemalloc or "",
            )
        )
        await wait_serving(server, server_address)
        async with grpc.aio.insecure_channel(server_address) as channel:
            client_key = await create_key(channel, admin_key, TENANT, admin_pb2.API_KEY_ROLE_CLIENT)
            service_key = await create_key(
                channel, admin_key, "platform", admin_pb2.API_KEY_ROLE_SERVICE
            )
            reference = children.enter_context(
                start_reference(reference_port, server_address, service_key)
            )
            await wait_serving(reference, reference_address)
            metadata = (("authorization", f"Bearer {client_key}"),)
            yield Platform(server, reference, channel, metadata)


# -- the load -------------------------------------------------------------------------------------


class Load:
    """Sessions, chats and idle streams against one server."""

    def __init__(self, p: Platform, results: Results) -> None:
        self.p = p
        self.results = results
        self.sessions = session_pb2_grpc.SessionServiceStub(p.channel)
        self.chat = chat_pb2_grpc.ChatServiceStub(p.channel)
        self.ended = 0
        self.idle_calls: list[Any] = []
        self.idle_tasks: list[asyncio.Task[None]] = []
        self.stopping = False

    async def new_session(self) -> str:
        reply = await self.sessions.CreateSession(
            session_pb2.CreateSessionRequest(agent_id="soak-agent"),
            metadata=self.p.client_metadata,
            timeout=CHAT_TIMEOUT_S,
        )
        return str(reply.session.session_id)

    async def send(self, session_id: str, content: str) -> str:
        """One chat, read to its end; its last event kind (or the status code)."""
        last = ""
        try:
            async for reply in self.chat.SendMessage(
                chat_pb2.SendMessageRequest(session_id=session_id, content=content),
                metadata=self.p.client_metadata,
                timeout=CHAT_TIMEOUT_S,
            ):
                last = reply.event.WhichOneof("kind") or ""
        except grpc.aio.AioRpcError as exc:
            last = exc.code().name
        return last

    async def idle_sessions(self, count: int, concurrency: int = 25) -> list[str]:
        """``count`` sessions with one finished chat each (their streams' first event)."""
        sessions: list[str] = []
        pending = list(range(count))

        async def lane() -> None:
            while pending:
                n = pending.pop()
                session_id = await self.new_session()
                outcome = await self.send(session_id, f"idle session {n}")
                if outcome not in ("completed", "failed"):
                    raise RuntimeError(f"the chat of idle session {n} ended with {outcome}")
                sessions.append(session_id)

        await asyncio.gather(*(lane() for _ in range(min(concurrency, count))))
        return sessions

    async def open_idle_streams(self, session_ids: list[str], wave: int = 50) -> None:
        """A StreamSession on each session, in waves, each open once its first event came."""
        for start in range(0, len(session_ids), wave):
            opened = [asyncio.Event() for _ in session_ids[start : start + wave]]
            for session_id, event in zip(session_ids[start : start + wave], opened, strict=True):
                call = self.chat.StreamSession(
                    chat_pb2.StreamSessionRequest(session_id=session_id),
                    metadata=self.p.client_metadata,
                )
                self.idle_calls.append(call)
                self.idle_tasks.append(asyncio.create_task(self._follow(call, event)))
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 60)
            if self.results.stream_errors:
                raise RuntimeError(f"idle streams failed: {self.results.stream_errors[:3]}")

    async def _follow(self, call: Any, opened: asyncio.Event) -> None:
        try:
            async for _ in call:
                opened.set()
        except grpc.aio.AioRpcError as exc:
            if not self.stopping:
                self.results.stream_errors.append(f"{exc.code().name}: {exc.details()}")
        except asyncio.CancelledError:
            return
        else:
            if not self.stopping:
                self.results.stream_errors.append("ended with OK")
        opened.set()  # wake the opener to report it

    def streams_open(self) -> int:
        return sum(1 for task in self.idle_tasks if not task.done())

    async def close_idle_streams(self) -> None:
        self.stopping = True
        for call in self.idle_calls:
            call.cancel()
        await asyncio.gather(*self.idle_tasks, return_exceptions=True)

    async def steady(self, rate: float, duration_s: float, lanes: int, per_session: int) -> None:
        """Chats at ``rate``/s for ``duration_s`` (open loop), over ``lanes`` sessions, each
        replaced by a fresh one every ``per_session`` chats."""
        lane_sessions: list[tuple[str, int]] = [("", per_session)] * lanes
        locks = [asyncio.Lock() for _ in range(lanes)]
        tasks: set[asyncio.Task[None]] = set()

        async def one(n: int) -> None:
            lane = n % lanes
            try:
                async with locks[lane]:
                    session_id, used = lane_sessions[lane]
                    if used >= per_session:
                        session_id, used = await self.new_session(), 0
                    lane_sessions[lane] = (session_id, used + 1)
            except grpc.aio.AioRpcError as exc:
                outcome = f"CreateSession {exc.code().name}"
            else:
                outcome = await self.send(session_id, f"soak chat {n}")
            self.results.outcomes[outcome] += 1
            self.ended += 1

        started = time.perf_counter()
        total = int(rate * duration_s)
        for n in range(total):
            delay = started + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            self.results.sent += 1
        if tasks:
            await asyncio.wait(tasks, timeout=CHAT_TIMEOUT_S + 10)


async def sample(
    load: Load, p: Platform, results: Results, interval_s: float, done: asyncio.Event
) -> None:
    started = time.perf_counter()
    while not done.is_set():
        p.server.check_alive()
        results.samples.append(
            Sample(
                time.perf_counter() - started,
                load.ended,
                p.server.status_bytes("VmRSS"),
                p.reference.status_bytes("VmRSS"),
            )
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), interval_s)


async def used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def probe_reports(
    server: Child, load: Load, args: argparse.Namespace, done: asyncio.Event
) -> None:
    """SIGUSR1 to the server (tracemalloc reports) at the end of the warm-up, after each third
    of the measured phase and at the end (``report`` is called by the caller at the end)."""
    measured = args.duration - args.warm_up
    marks = [args.warm_up, args.warm_up + measured / 3, args.warm_up + 2 * measured / 3]
    started = time.perf_counter()
    for mark in marks:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), max(0.0, started + mark - time.perf_counter()))
        if done.is_set():
            return
        os.kill(server.pid, signal.SIGUSR1)
        print(f"tracemalloc report asked for after {load.ended:,} chats", flush=True)


def reports_in(path: Path) -> int:
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().count("=== report ")
    return 0


async def final_report(server: Child, path: Path, timeout_s: float = 120.0) -> None:
    """One more tracemalloc report, waited for (a snapshot of a large heap takes a while)."""
    before = reports_in(path)
    os.kill(server.pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout_s
    while reports_in(path) <= before and time.monotonic() < deadline:
        server.check_alive()
        await asyncio.sleep(0.5)


async def measure(redis_url: str, args: argparse.Namespace) -> Results:
    results = Results(args.streams, args.rate, args.duration, args.warm_up)
    results.tracemalloc_file = args.tracemalloc or ""
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        async with platform(redis_url, args) as p:
            load = Load(p, results)
            sessions = await load.idle_sessions(args.streams)
            await load.open_idle_streams(sessions)
            done = asyncio.Event()
            sampler = asyncio.create_task(sample(load, p, results, args.sample_interval, done))
            probes = (
                asyncio.create_task(probe_reports(p.server, load, args, done))
                if args.tracemalloc
                else None
            )
            warm_up = asyncio.create_task(asyncio.sleep(args.warm_up))
            try:
                steady = asyncio.create_task(
                    load.steady(args.rate, args.duration, args.lanes, args.chats_per_session)
                )
                await warm_up
                results.redis_start = await used_memory(redis)
                await steady
            finally:
                done.set()
                await sampler
                if probes is not None:
                    await probes
            results.streams_open_at_end = load.streams_open()
            results.redis_end = await used_memory(redis)
            if args.tracemalloc:
                print(f"tracemalloc report asked for after {load.ended:,} chats", flush=True)
                await final_report(p.server, Path(args.tracemalloc))
            await load.close_idle_streams()
    finally:
        await redis.aclose()
    after = results.growth.samples
    if after:
        results.rss_start, results.rss_end = after[0].rss, after[-1].rss
        results.reference_start, results.reference_end = (
            after[0].reference_rss,
            after[-1].reference_rss,
        )
    return results


async def run(args: argparse.Namespace) -> Results:
    """Everything on a private redis-server."""
    return await on_private_redis(lambda redis_url: measure(redis_url, args))


# -- the report -----------------------------------------------------------------------------------


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"


def print_results(r: Results) -> None:
    g = r.growth
    first, last = g.thirds()
    outcomes = ", ".join(f"{k} {n:,}" for k, n in sorted(r.outcomes.items()))
    print(
        f"soak: {r.streams:,} idle StreamSession streams + {r.rate:g} chats/s for "
        f"{r.duration_s:g} s on Redis (warm-up {r.warm_up_s:g} s); server `orchestrator serve`, "
        "reference services in their own process"
    )
    rows = [
        ("chats sent / ended", f"{r.sent:,} / {sum(r.outcomes.values()):,} ({outcomes})"),
        ("chats measured (after the warm-up)", f"{g.chats:,}"),
        ("server RSS at warm-up end -> end", f"{_mib(r.rss_start)} -> {_mib(r.rss_end)}"),
        ("growth per chat (least squares)", f"{g.per_chat / 1024:.3f} KB"),
        (
            "first third -> last third",
            f"{first / 1024:.3f} -> {last / 1024:.3f} KB per chat: "
            + ("levelled off" if g.levelled_off else "NOT levelled off"),
        ),
        (
            "reference services RSS",
            f"{_mib(r.reference_start)} -> {_mib(r.reference_end)}",
        ),
        ("redis used_memory", f"{_mib(r.redis_start)} -> {_mib(r.redis_end)}"),
        ("idle streams open at the end", f"{r.streams_open_at_end:,} of {r.streams:,}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    if r.tracemalloc_file:
        print(f"tracemalloc reports (RSS includes tracing): {r.tracemalloc_file}")
    problems = r.problems()
    print("sanity: " + ("FAILED: " + "; ".join(problems) if problems else "ok"))


def parser() -> argparse.ArgumentParser:
    p = doc_parser(__doc__)
    p.add_argument("--streams", type=int, default=500, help="idle StreamSession streams")
    p.add_argument("--rate", type=float, default=20.0, help="chats per second")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of steady load")
    p.add_argument(
        "--warm-up",
        type=float,
        default=None,
        help="seconds at the start left out of the slope (default: a fifth, at most 60)",
    )
    p.add_argument("--lanes", type=int, default=40, help="sessions chatted on at once")
    p.add_argument(
        "--chats-per-session", type=int, default=10, help="chats before a lane takes a new session"
    )
    p.add_argument("--sample-interval", type=float, default=1.0, help="seconds between samples")
    p.add_argument(
        "--samples", metavar="FILE", help="also write every sample to FILE (CSV), to plot it"
    )
    p.add_argument(
        "--tracemalloc",
        metavar="FILE",
        help="run the server with --tracemalloc FILE and ask for reports along the way",
    )
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if args.warm_up is None:
        args.warm_up = min(60.0, args.duration / 5)
    if not 0 <= args.warm_up < args.duration:
        raise SystemExit("--warm-up must be shorter than --duration")
    if args.tracemalloc:
        args.tracemalloc = str(Path(args.tracemalloc).resolve())
    return args


def write_samples(path: Path, samples: Sequence[Sample]) -> None:
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["seconds", "chats", "rss_bytes", "reference_rss_bytes"])
        for s in samples:
            writer.writerow([f"{s.seconds:.2f}", s.chats, s.rss, s.reference_rss])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    results = asyncio.run(run(args))
    print_results(results)
    if args.samples:
        write_samples(Path(args.samples), results.samples)
    return 1 if results.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
