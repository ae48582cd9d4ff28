"""A client going away is not an error: whatever its streams were doing (a write held by flow
control because the client stopped reading, a handler waiting for the next notice) and however
it goes (it cancels its calls, closes its channel, or its process is killed with SIGKILL), the
server logs no ERROR and no traceback, releases every stream (the open-stream gauge, the
tenant's stream slots, the open-stream registry), and keeps serving.

grpc.aio logs "ExecuteBatchError raised in core by servicer method" with a traceback when a
write it was running for the servicer fails before it has seen the client's close, which is
what happens to a write held by flow control: every stream below is held so before its client
goes away (server.edge writes them itself and turns that failure into a cancellation).
PublishUpdates, held waiting for the next notice, did not log errors before either.

The WebSocket bridge likewise: a client killed with verdicts still to be sent made aiohttp log
"Error handling request" with a traceback ("Cannot write to closing transport").
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from orchestrator.v1 import batch_pb2
from tests.support.batches import NoticeDriver, get_batch, llm_item, submit
from tests.support.downstream import RecordingDispatcher
from tests.support.flow import Flow, completed, kind_of, notice, read_to_end
from tests.support.servers import running_server, service, test_settings
from tests.support.stalled_client import TENANT, open_calls, stalled_channel, ws_notice

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 15.0
# Each stalled stream is owed this much (30 messages of about 8 KB), well past the 64 KiB
# window of a client that does not read (tests.support.stalled_client).
MESSAGES = 30
PAYLOAD = "x" * 8000


class Records(logging.Handler):
    """Every log record at WARNING or above, from any logger (grpc's own and asyncio's too)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        """ERROR records and records with a traceback, formatted for an assertion message."""
        return [
            f"{r.levelname} {r.name}: {r.getMessage()}"
            for r in self.records
            if r.levelno >= logging.ERROR or r.exc_info is not None
        ]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


@pytest.fixture
async def flow(backend_url: str | None) -> AsyncIterator[Flow]:
    settings = dataclasses.replace(
        test_settings(backend_url), batch_worker_enabled=True, batch_worker_concurrency=32
    )
    dispatcher = RecordingDispatcher()
    async with running_server(settings, dispatcher=dispatcher) as running:
        yield Flow(running, dispatcher)


async def eventually(what: str, predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Wait until ``predicate()`` holds (server-side state that no event announces)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


# -- what the server holds -----------------------------------------------------------------------


def open_streams(flow: Flow, rpc: str) -> int:
    """The open-stream gauge of ``rpc``."""
    service = "BatchService" if rpc == "StreamBatchResults" else "ChatService"
    value = flow.running.server.metrics.registry.get_sample_value(
        "orchestrator_open_streams", {"method": f"/orchestrator.v1.{service}/{rpc}"}
    )
    return int(value or 0)


def stream_slots(flow: Flow) -> int:
    return flow.running.server.stream_slots.open_streams(TENANT)


def registered(flow: Flow) -> int:
    """Streaming calls (either direction) in the registry of open streams (server.revocation)."""
    return flow.running.server.revocation.streams.count()


def sending(flow: Flow) -> int:
    """Open streams whose server is suspended in a write to a client that does not read."""
    return flow.running.server.revocation.streams.sending()


def notices_judged(flow: Flow) -> int:
    """Notices the server has given a verdict, whatever it was."""
    return sum(
        int(sample.value)
        for metric in flow.running.server.metrics.registry.collect()
        if metric.name == "orchestrator_notices"
        for sample in metric.samples
        if sample.name == "orchestrator_notices_total"
    )


# -- each streaming RPC, its calls held by the server --------------------------------------------


@dataclasses.dataclass
class Scenario:
    """How many calls of ``rpc`` the stalled client opens, what they need before (``prepare``
    returns their targets) and after they are open (``after_open``), and the server-side state
    that shows they are held (``held``)."""

    rpc: str
    count: int
    prepare: Callable[[Flow], Awaitable[list[str]]]
    after_open: Callable[[Flow, int], Awaitable[None]]
    held: Callable[[Flow, int], bool]


async def nothing(flow: Flow, count: int) -> None:
    return None


async def a_finished_job_with_many_events(flow: Flow) -> list[str]:
    """One session whose log holds a job's MESSAGES large deltas and its completion: each
    StreamSession opened on it catches up from the log and is held by flow control."""
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    job_id = accepted.job_id
    deltas = [notice(job_id, n, "delta", delta=PAYLOAD) for n in range(1, MESSAGES + 1)]
    reply = await flow.publish([*deltas, completed(job_id, MESSAGES + 1, "done")])
    assert reply.accepted == MESSAGES + 1
    assert kind_of((await read_to_end(call))[-1]) == "completed"
    return [session_id]


async def one_session_per_message(flow: Flow, count: int) -> list[str]:
    return [await flow.new_session() for _ in range(count)]


async def many_deltas_for_each_job(flow: Flow, count: int) -> None:
    """Each SendMessage call's job gets MESSAGES large deltas, which its stream owes its client."""
    jobs = [(await flow.dispatcher.next_submit(WAIT_S)).job_id for _ in range(count)]
    notices = [
        notice(job_id, n, "delta", delta=PAYLOAD) for job_id in jobs for n in range(1, MESSAGES + 1)
    ]
    reply = await flow.publish(notices)
    assert reply.accepted == len(notices)


async def a_finished_batch_with_large_results(flow: Flow) -> list[str]:
    """A completed batch of MESSAGES items with results of about 8 KB each: each
    StreamBatchResults opened on it owes its client all of them."""
    items = [llm_item(f"i{n}", content=PAYLOAD) for n in range(MESSAGES)]
    async with NoticeDriver(flow).running():
        batch = await submit(flow, items)
        deadline = time.monotonic() + WAIT_S
        while (await get_batch(flow, batch.batch_id)).state != batch_pb2.BATCH_STATE_COMPLETED:
            assert time.monotonic() < deadline, "the batch did not complete"
            await asyncio.sleep(0.05)
    return [batch.batch_id]


async def no_targets(flow: Flow) -> list[str]:
    return []


def open_and_held_in_a_write(rpc: str) -> Callable[[Flow, int], bool]:
    def held(flow: Flow, count: int) -> bool:
        return (
            open_streams(flow, rpc) == count
            and stream_slots(flow) == count
            and sending(flow) == count
        )

    return held


def open_and_waiting_for_notices(flow: Flow, count: int) -> bool:
    """Each PublishUpdates stream had its first notice judged and waits for the next."""
    return registered(flow) == count and notices_judged(flow) == count


SCENARIOS = {
    "StreamSession": Scenario(
        "StreamSession",
        20,
        a_finished_job_with_many_events,
        nothing,
        open_and_held_in_a_write("StreamSession"),
    ),
    "SendMessage": Scenario(
        "SendMessage",
        8,
        lambda flow: one_session_per_message(flow, 8),
        many_deltas_for_each_job,
        open_and_held_in_a_write("SendMessage"),
    ),
    "StreamBatchResults": Scenario(
        "StreamBatchResults",
        10,
        a_finished_batch_with_large_results,
        nothing,
        open_and_held_in_a_write("StreamBatchResults"),
    ),
    "PublishUpdates": Scenario(
        "PublishUpdates", 10, no_targets, nothing, open_and_waiting_for_notices
    ),
}


# -- the ways a client goes away -----------------------------------------------------------------


class InProcessClient:
    """The stalled calls on a channel of the test's own process."""

    def __init__(self, flow: Flow, scenario: Scenario, targets: list[str]) -> None:
        self.channel = stalled_channel(flow.running.address)
        self.calls = open_calls(self.channel, scenario.rpc, targets, scenario.count)

    async def cancel(self) -> None:
        for call in self.calls:
            call.cancel()
        await self.channel.close(grace=None)

    async def close_channel(self) -> None:
        await self.channel.close(grace=None)


class ClientProcess:
    """The stalled calls in a client process of their own (tests.support.stalled_client)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.stalled_client", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )

    @classmethod
    def stalled_calls(
        cls, flow: Flow, scenario: Scenario, targets: list[str], log: Path
    ) -> ClientProcess:
        args = ["--address", flow.running.address, "--rpc", scenario.rpc]
        args += ["--count", str(scenario.count)]
        for target in targets:
            args += ["--target", target]
        return cls(args, log)

    async def wait_for(self, line: bytes) -> None:
        assert self.proc.stdout is not None
        said = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), WAIT_S)
        assert said == line, f"client process: {said!r}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()


WAYS = ("cancel", "channel_close", "sigkill")


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("rpc", list(SCENARIOS))
async def test_a_client_going_away_from_held_streams_is_not_an_error(
    flow: Flow, records: Records, rpc: str, way: str, tmp_path: Path
) -> None:
    scenario = SCENARIOS[rpc]
    targets = await scenario.prepare(flow)
    assert registered(flow) == 0 and stream_slots(flow) == 0
    process: ClientProcess | None = None
    client: InProcessClient | None = None
    try:
        if way == "sigkill":
            process = ClientProcess.stalled_calls(flow, scenario, targets, tmp_path / "client.log")
            await process.wait_for(b"open\n")
        else:
            client = InProcessClient(flow, scenario, targets)
        await scenario.after_open(flow, scenario.count)
        await eventually(
            f"the server holds {scenario.count} {rpc} calls",
            lambda: scenario.held(flow, scenario.count),
        )

        if process is not None:
            process.kill()
        elif client is not None and way == "cancel":
            await client.cancel()
        elif client is not None:
            await client.close_channel()

        await eventually(
            "every stream is released",
            lambda: open_streams(flow, rpc) == 0 and stream_slots(flow) == 0,
        )
        await eventually("no stream is registered", lambda: registered(flow) == 0)
    finally:
        if process is not None:
            process.kill()
        if client is not None:
            await client.close_channel()

    # The server keeps serving: a new chat runs, streamed to its caller.
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    await flow.publish([completed(accepted.job_id, 1, "still here")])
    assert kind_of((await read_to_end(call))[-1]) == "completed"
    gc.collect()  # "Task exception was never retrieved" is logged when the task is collected
    await asyncio.sleep(0)
    assert records.errors() == []


WS_NOTICES = 20000


async def test_a_websocket_client_killed_with_verdicts_unread_is_not_an_error(
    flow: Flow, records: Records, tmp_path: Path
) -> None:
    bridge = flow.running.server.ws_bridge
    address = f"ws://127.0.0.1:{bridge.port}/ws/task_updates"
    process = ClientProcess(
        ["--address", address, "--rpc", "websocket", "--count", str(WS_NOTICES)],
        tmp_path / "client.log",
    )
    try:
        await process.wait_for(b"sent\n")
        await eventually("the bridge answers notices", lambda: notices_judged(flow) > 0)
        judged_before = notices_judged(flow)
        assert bridge.open_sockets == 1
        process.kill()
    finally:
        process.kill()
    # The bridge still had notices to answer when its client died.
    assert judged_before < WS_NOTICES
    await eventually("the socket is released", lambda: bridge.open_sockets == 0)

    # The bridge keeps serving: a new socket gets its verdict.
    async with aiohttp.ClientSession() as session:
        authorization = dict(service())["authorization"]
        socket = await session.ws_connect(address, headers={"authorization": authorization})
        await socket.send_str(ws_notice(0))
        verdict = await asyncio.wait_for(socket.receive_json(), WAIT_S)
        await socket.close()
    assert verdict["index"] == 0 and verdict["verdict"] == "malformed", verdict
    gc.collect()
    await asyncio.sleep(0)
    assert records.errors() == []
