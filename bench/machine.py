"""What bare grpc.aio does on this machine, measured in the calling benchmark's run, so each of
its rows reads as a fraction of what the machine can do for the same shape:

* unary echo: a grpc.aio server whose one unary method returns its request (64 bytes, no
  protobuf), called at a fixed concurrency over one channel: calls/s. The shape of every unary
  call and, counted per call, of a chat (one SendMessage).
* server-streaming: the same server streaming 100-byte messages on a number of concurrent
  calls: messages/s across them. The shape of fan-out (one event per message).

The server runs in a child process of its own (``python -m bench.machine --serve``), on the
benchmarks' event loop (``ORCH_EVENT_LOOP``, default uvloop), the client in the benchmark's
process: the same split as the benchmarks' orchestrator children. ``python -m bench.machine``
prints both figures alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from bench.processes import loopback_server, start_serving, until_sigterm
from bench.tables import fraction
from server import event_loop

SERVICE = "bench.Bare"
UNARY = f"/{SERVICE}/Echo"
STREAM = f"/{SERVICE}/Stream"
PAYLOAD = b"x" * 64
STREAM_MESSAGE = b"y" * 100


def bench_loop() -> str:
    """The event loop the benchmarks run on: ORCH_EVENT_LOOP, as the service's (uvloop)."""
    return os.environ.get("ORCH_EVENT_LOOP", "uvloop")


def run(main: Any) -> Any:
    """``asyncio.run`` on the benchmarks' event loop."""
    return event_loop.run(main, bench_loop())


def _identity(data: bytes) -> bytes:
    return data


async def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for _ in range(int(request)):
        yield STREAM_MESSAGE


async def serve() -> None:
    """The ``--serve`` child: the bare server on a free loopback port until SIGTERM."""
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(
            _echo, request_deserializer=_identity, response_serializer=_identity
        ),
        "Stream": grpc.unary_stream_rpc_method_handler(
            _stream, request_deserializer=_identity, response_serializer=_identity
        ),
    }
    generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
    async with loopback_server(
        lambda server: server.add_generic_rpc_handlers((generic,)), grace_s=0.5
    ) as port:
        await until_sigterm(port)


@dataclass(frozen=True)
class Limits:
    """Bare grpc.aio on this machine: unary echo calls/s and server-streaming messages/s."""

    unary_per_s: float
    unary_concurrency: int
    stream_messages_per_s: float
    streams: int

    def unary_cell(self) -> str:
        return f"{self.unary_per_s:,.0f} calls/s (unary echo, {self.unary_concurrency} concurrent)"

    def stream_cell(self) -> str:
        per_s = self.stream_messages_per_s
        return f"{per_s:,.0f} msgs/s (server-streaming, {self.streams} streams)"

    def unary_fraction(self, per_s: float) -> str:
        """``per_s`` (calls, chats or items a second) as a fraction of the unary echo."""
        return fraction(per_s, self.unary_per_s)

    def stream_fraction(self, per_s: float) -> str:
        """``per_s`` (streamed messages a second) as a fraction of bare server-streaming."""
        return fraction(per_s, self.stream_messages_per_s)

    def print_line(self) -> None:
        """One line under a table: the machine's bare figures in this run."""
        print(f"bare grpc.aio on this machine, this run: {self.unary_cell()}; {self.stream_cell()}")


async def _unary(channel: grpc.aio.Channel, calls: int, concurrency: int) -> float:
    echo = channel.unary_unary(UNARY, request_serializer=_identity, response_deserializer=_identity)
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            reply = await echo(PAYLOAD, timeout=30)
            if reply != PAYLOAD:
                raise RuntimeError("the echo server answered something else")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return calls / (time.perf_counter() - started)


async def _streaming(channel: grpc.aio.Channel, streams: int, messages: int) -> float:
    stream = channel.unary_stream(
        STREAM, request_serializer=_identity, response_deserializer=_identity
    )

    async def one() -> int:
        count = 0
        async for _ in stream(str(messages).encode(), timeout=60):
            count += 1
        return count

    started = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(streams)))
    elapsed = time.perf_counter() - started
    if sum(counts) != streams * messages:
        raise RuntimeError("the streaming server sent fewer messages than asked")
    return sum(counts) / elapsed


async def measure(
    *,
    unary_calls: int = 4000,
    concurrency: int = 16,
    streams: int = 64,
    messages: int = 1000,
) -> Limits:
    """Both figures, on a bare server started for this (after a warm-up of each)."""
    child, port = start_serving(["bench.machine", "--serve"], "bare grpc.aio server")
    with child:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await _unary(channel, concurrency * 20, concurrency)
            unary = await _unary(channel, unary_calls, concurrency)
            await _streaming(channel, streams, messages // 10)
            streaming = await _streaming(channel, streams, messages)
    return Limits(unary, concurrency, streaming, streams)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.machine", description=__doc__)
    parser.add_argument("--serve", action="store_true", help="run the bare server (a child)")
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--messages", type=int, default=1000, help="per stream")
    args = parser.parse_args(argv)
    if args.serve:
        run(serve())
        return 0
    limits: Limits = run(
        measure(
            unary_calls=args.calls,
            concurrency=args.concurrency,
            streams=args.streams,
            messages=args.messages,
        )
    )
    print(f"event loop: {bench_loop()}")
    limits.print_line()
    return 0


if __name__ == "__main__":
    sys.exit(main())
