"""A client that opens streaming calls and never reads them, in the test's process or in its
own (``python -m tests.support.stalled_client --address ... --rpc StreamSession --target <id>
--count 20``: it prints ``open`` once every call is started, then waits to be killed).

``--rpc websocket --address ws://...`` sends ``--count`` JSON notices over the WebSocket
bridge instead, reads none of the verdicts, prints ``sent`` and waits to be killed.

Its channel turns off HTTP/2 BDP probing, so each stream's flow-control window stays at the
default 64 KiB: a server that sends a stream more than that without the client reading has its
write held by flow control (a stalled consumer), at a small cost in the test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import grpc

from orchestrator.v1 import (
    batch_pb2,
    batch_pb2_grpc,
    chat_pb2,
    chat_pb2_grpc,
    task_update_pb2,
    task_update_pb2_grpc,
)
from tests.support.flow import notice
from tests.support.servers import service, tenant

RPCS = ("StreamSession", "SendMessage", "StreamBatchResults", "PublishUpdates")
CHANNEL_OPTIONS = (("grpc.http2.bdp_probe", 0),)
TENANT = "acme"


def stalled_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


async def _one_notice_then_silence(forever: asyncio.Event) -> AsyncIterator[Any]:
    """A PublishUpdates request stream that sends one notice and then nothing, never ending."""
    yield notice("no-such-job", 1, "progress", tenant_id=TENANT)
    await forever.wait()


def open_calls(
    channel: grpc.aio.Channel, rpc: str, targets: Sequence[str], count: int
) -> list[Any]:
    """``count`` calls of ``rpc``, spread over ``targets`` (session ids, or the batch id), none
    of which is ever read. PublishUpdates calls ignore ``targets``."""
    chat = chat_pb2_grpc.ChatServiceStub(channel)
    calls: list[Any] = []
    for n in range(count):
        target = targets[n % len(targets)] if targets else ""
        if rpc == "StreamSession":
            calls.append(
                chat.StreamSession(
                    chat_pb2.StreamSessionRequest(session_id=target), metadata=tenant(TENANT)
                )
            )
        elif rpc == "SendMessage":
            calls.append(
                chat.SendMessage(
                    chat_pb2.SendMessageRequest(session_id=target, content=f"m{n}"),
                    metadata=tenant(TENANT),
                )
            )
        elif rpc == "StreamBatchResults":
            calls.append(
                batch_pb2_grpc.BatchServiceStub(channel).StreamBatchResults(
                    batch_pb2.StreamBatchResultsRequest(batch_id=target),
                    metadata=tenant(TENANT),
                )
            )
        elif rpc == "PublishUpdates":
            stub = task_update_pb2_grpc.TaskUpdateServiceStub(channel)
            requests: AsyncIterator[task_update_pb2.PublishUpdatesRequest] = (
                _one_notice_then_silence(asyncio.Event())
            )
            calls.append(stub.PublishUpdates(requests, metadata=service()))
        else:
            raise ValueError(f"unknown rpc {rpc}")
    return calls


def ws_notice(n: int) -> str:
    """A JSON notice of about 200 bytes for the WebSocket bridge, judged malformed (its job id was
    not issued by the orchestrator) after the whole path of a notice up to the check."""
    return json.dumps(
        {
            "event": "job_progress",
            "service": "query",
            "job_id": f"no-such-job-{n}",
            "tenant_id": TENANT,
            "status_message": "x" * 100,
        }
    )


async def _send_notices_unread(address: str, count: int) -> None:
    authorization = dict(service())["authorization"]
    async with aiohttp.ClientSession() as session:
        socket = await session.ws_connect(address, headers={"authorization": authorization})
        for n in range(count):
            await socket.send_str(ws_notice(n))
        print("sent", flush=True)
        await asyncio.Event().wait()  # until killed


async def _main(args: argparse.Namespace) -> None:
    if args.rpc == "websocket":
        await _send_notices_unread(args.address, args.count)
        return
    channel = stalled_channel(args.address)
    calls = open_calls(channel, args.rpc, args.target, args.count)
    await asyncio.gather(*(call.wait_for_connection() for call in calls))
    print("open", flush=True)
    await asyncio.Event().wait()  # until killed


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--rpc", choices=(*RPCS, "websocket"), required=True)
    parser.add_argument("--target", action="append", default=[])
    parser.add_argument("--count", type=int, required=True)
    asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
