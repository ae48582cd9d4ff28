"""The live event readers (one sharded pub/sub connection per shard node, registry.redis_events)
keep every stream receiving, with nothing lost and nothing twice, when their connection is
killed, their node restarts, their path goes silent, their node hangs or their session's slot
moves to another master; a silent reader is reported in health until it hears its heartbeats
again. On one Redis and on the 3-master cluster fixture."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import cast

import pytest
import redis

from domain.errors import Unavailable
from domain.event_stream import SessionFollower
from domain.ids import new_id
from domain.jobs import IfBusy, JobLimits, NewJob, StartedJob
from domain.models import NewSession, Service, WorkKind
from registry.backend import Backend, BackendConfig, RedisInstance, open_backend
from registry.keys import KeySpace
from registry.redis_client import create_redis
from registry.redis_events import RedisEventLog
from registry.redis_jobs import EventLogConfig, RedisJobStore
from registry.redis_sessions import RedisSessionStore
from registry.shard_nodes import SINGLE_NODE
from server.health import (
    EVENTS_SERVICE,
    LIVENESS_SERVICE,
    NOT_SERVING,
    SERVING,
    HealthMonitor,
    HealthServicer,
)
from tests.support.redis_cluster import (
    RedisClusterProcess,
    cluster_node,
    parse_cluster_nodes,
)
from tests.support.redis_process import RedisProcess
from tests.support.tcp_proxy import DroppingProxy

TENANT = "acme"
LIMITS = JobLimits(deadline_ms=60_000, heartbeat_ms=60_000, retention_ms=60_000)
# Heartbeats every 0.1 s; silent after 1 s without one.
HEARTBEAT_S, SILENT_AFTER_S = 0.1, 1.0
# Every wait of these tests is bounded by this (a failover or a cluster's FAIL state takes some).
BOUND_S = 30.0


class Seen:
    """The sequences one stream yielded, in order."""

    def __init__(self) -> None:
        self.sequences: list[int] = []
        self._changed = asyncio.Event()

    def add(self, sequence: int) -> None:
        self.sequences.append(sequence)
        self._changed.set()

    async def reach(self, count: int) -> list[int]:
        async with asyncio.timeout(BOUND_S):
            while len(self.sequences) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.sequences


@asynccontextmanager
async def streaming(events: RedisEventLog, session_id: str) -> AsyncIterator[Seen]:
    """A client stream of the session from its start (subscribed, then the log, then live).
    A stream that ends UNAVAILABLE (its catch-up read met a node that was not ready) is
    resumed after its last sequence, as clients do."""
    seen = Seen()
    subscribed = asyncio.Event()
    stopping = False

    async def run() -> None:
        while not stopping:
            after = seen.sequences[-1] if seen.sequences else 0
            try:
                async with events.subscribe(TENANT, session_id) as feed:
                    subscribed.set()
                    follower = SessionFollower(events, feed, TENANT, session_id)
                    async for event in follower.events(after):
                        seen.add(event.sequence)
            except Unavailable:
                # (A cancellation that lands inside redis-py may come back as a lost
                # connection: a stream being stopped is not resumed.)
                if not subscribed.is_set() or stopping:
                    raise
                await asyncio.sleep(0.1)

    task = asyncio.create_task(run())
    async with asyncio.timeout(BOUND_S):
        waiting = asyncio.ensure_future(subscribed.wait())
        await asyncio.wait({waiting, task}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
    if task.done():
        task.result()  # the subscription failed: raise why
    try:
        yield seen
    finally:
        stopping = True
        task.cancel()
        # (Ending UNAVAILABLE as it stops is fine: a test may stop a node before its stream.)
        with contextlib.suppress(asyncio.CancelledError, Unavailable):
            async with asyncio.timeout(BOUND_S):  # a stream that cannot be cancelled fails here
                await task


async def append_event(backend: Backend, session_id: str) -> int:
    """One more event in the session's log (a job accepted); returns its sequence."""
    new = NewJob(new_id(), session_id, "agent-1", Service.QUERY, WorkKind.LLM_QUERY, "hi", "r")
    async with asyncio.timeout(BOUND_S):
        while True:  # a node that was just restarted or moved may refuse a first call
            try:
                started = await backend.jobs.start_job(TENANT, new, LIMITS, if_busy=IfBusy.RUN)
                break
            except Exception:
                await asyncio.sleep(0.1)
    assert isinstance(started, StartedJob)
    return started.accepted.sequence


async def eventually(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds (state without an event to await: polled, bounded)."""
    async with asyncio.timeout(BOUND_S):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def event_log(backend: Backend) -> RedisEventLog:
    return cast(RedisEventLog, backend.events)


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Backend]:
    backend = open_backend(
        BackendConfig(
            redis_url=url,
            key_prefix="test",
            session_retention_ms=60_000,
            event_heartbeat_interval_s=HEARTBEAT_S,
            event_heartbeat_timeout_s=SILENT_AFTER_S,
        )
    )
    try:
        yield backend
    finally:
        await backend.aclose()


async def new_session(backend: Backend) -> str:
    session_id = new_id()
    await backend.sessions.create_session(TENANT, session_id, NewSession("agent-1", "", {}, 60_000))
    return session_id


def node_port(events: RedisEventLog, session_id: str, default: int) -> int:
    """The port of the node whose reader carries the session (``default`` on one Redis)."""
    node = events._route[events._keys.session_channel(TENANT, session_id)]
    return default if node == SINGLE_NODE else int(node.rpartition(":")[2])


def cluster_ok(ports: list[int]) -> bool:
    for port in ports:
        with contextlib.suppress(redis.RedisError), redis.Redis(port=port) as node:
            if node.cluster("INFO").get("cluster_state") != "ok":
                return False
            continue
        return False
    return True


class Target:
    """One Redis or the cluster fixture, as the tests below need them: its URL and the
    process of a node by port."""

    def __init__(self, url: str, nodes: list[RedisProcess], cluster: bool) -> None:
        self.url = url
        self.nodes = {node.port: node for node in nodes}
        self.cluster = cluster

    def node(self, port: int) -> RedisProcess:
        return self.nodes[port]

    @property
    def first_port(self) -> int:
        return next(iter(self.nodes))

    async def until_ok(self) -> None:
        if self.cluster:
            ports = list(self.nodes)
            await eventually(lambda: cluster_ok(ports))


@pytest.fixture(params=["redis", "cluster"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """A Redis this test may restart (appendonly: nothing lost), or the cluster fixture."""
    if request.param == "cluster":
        cluster: RedisClusterProcess = request.getfixturevalue("redis_cluster")
        cluster.flush()
        yield Target(cluster.url, cluster.nodes, cluster=True)
        return
    proc = RedisProcess(appendonly=True)
    proc.start()
    try:
        yield Target(proc.url, [proc], cluster=False)
    finally:
        proc.close()


async def test_a_stream_keeps_receiving_after_its_pubsub_connection_is_killed(
    target: Target,
) -> None:
    async with opened(target.url) as backend:
        session_id = await new_session(backend)
        async with streaming(event_log(backend), session_id) as seen:
            first = await append_event(backend, session_id)
            assert await seen.reach(1) == [first]
            port = node_port(event_log(backend), session_id, target.first_port)
            with redis.Redis(port=port) as node:
                assert node.client_kill_filter(_type="pubsub") >= 1
            # Right away (during the reconnection) and after it.
            during = [await append_event(backend, session_id) for _ in range(3)]
            await eventually(lambda: event_log(backend).silent_readers() == [])
            last = await append_event(backend, session_id)
            assert await seen.reach(5) == [first, *during, last]


async def test_a_stream_keeps_receiving_after_its_node_restarts(target: Target) -> None:
    async with opened(target.url) as backend:
        session_id = await new_session(backend)
        async with streaming(event_log(backend), session_id) as seen:
            first = await append_event(backend, session_id)
            assert await seen.reach(1) == [first]
            port = node_port(event_log(backend), session_id, target.first_port)
            target.node(port).restart()
            await target.until_ok()
            later = [await append_event(backend, session_id) for _ in range(3)]
            assert await seen.reach(4) == [first, *later]
            assert len(set(seen.sequences)) == len(seen.sequences)


async def test_a_reader_on_a_hung_node_is_reported_silent_then_recovers(target: Target) -> None:
    async with opened(target.url) as backend:
        events = event_log(backend)
        session_id = await new_session(backend)
        async with streaming(events, session_id) as seen:
            first = await append_event(backend, session_id)
            assert await seen.reach(1) == [first]
            port = node_port(events, session_id, target.first_port)
            node = target.node(port)
            node.pause()
            try:
                await eventually(lambda: events.silent_readers() != [])
                problem = backend.events_problem()
                assert problem is not None and "heard no heartbeat" in problem
            finally:
                node.resume()
            await eventually(lambda: events.silent_readers() == [])
            assert backend.events_problem() is None
            await target.until_ok()
            later = await append_event(backend, session_id)
            assert await seen.reach(2) == [first, later]


async def test_a_silent_reader_makes_health_not_serving_until_it_hears_again(
    own_redis: RedisProcess,
) -> None:
    """The reader's path to Redis goes silent (no reset, no FIN: its connection looks idle,
    and Redis is fine for everything else): health says so within the heartbeat timeout,
    the reader is replaced, and the stream catches up on what it missed once the path works."""
    keys = KeySpace("test")
    redis_client = create_redis(own_redis.url, socket_timeout_s=1.0, connect_timeout_s=0.5)
    proxy = DroppingProxy(f"127.0.0.1:{own_redis.port}")
    subscriber = create_redis(
        f"redis://{await proxy.start()}/0",
        socket_timeout_s=3.0,
        connect_timeout_s=0.5,
        max_connections=2,
        retries=0,
    )
    events = RedisEventLog(
        redis_client,
        subscriber,
        keys,
        read_block_s=0.2,
        heartbeat_interval_s=HEARTBEAT_S,
        heartbeat_timeout_s=SILENT_AFTER_S,
    )
    sessions = RedisSessionStore(redis_client, keys, retention_ms=60_000)
    jobs = RedisJobStore(
        redis_client, keys, EventLogConfig(1000, 60_000), session_retention_ms=60_000
    )
    servicer = HealthServicer()
    health = HealthMonitor(
        servicer,
        ["svc"],
        RedisInstance(redis_client, keys).ping,
        interval_s=0.1,
        events_problem=events.readers_problem,
    )

    async def statuses() -> dict[str, int]:
        await health.check_once()
        return {name: servicer._server_status[name] for name in ("", EVENTS_SERVICE)}

    async def append() -> int:
        new = NewJob(new_id(), session_id, "agent-1", Service.QUERY, WorkKind.LLM_QUERY, "", "r")
        started = await jobs.start_job(TENANT, new, LIMITS, if_busy=IfBusy.RUN)
        assert isinstance(started, StartedJob)
        return started.accepted.sequence

    try:
        session_id = new_id()
        await sessions.create_session(TENANT, session_id, NewSession("agent-1", "", {}, 60_000))
        async with streaming(events, session_id) as seen:
            first = await append()
            assert await seen.reach(1) == [first]
            assert await statuses() == {"": SERVING, EVENTS_SERVICE: SERVING}

            proxy.stall()
            missed = [await append(), await append()]
            await eventually(lambda: events.silences == 1)
            assert events.silent_readers() == [SINGLE_NODE]
            assert await statuses() == {"": NOT_SERVING, EVENTS_SERVICE: NOT_SERVING}
            assert servicer._server_status[LIVENESS_SERVICE] == SERVING

            proxy.resume()
            await eventually(lambda: events.silent_readers() == [])
            assert await statuses() == {"": SERVING, EVENTS_SERVICE: SERVING}
            assert await seen.reach(3) == [first, *missed]
            live = await append()
            assert await seen.reach(4) == [first, *missed, live]
    finally:
        await events.aclose()
        await redis_client.aclose()
        await proxy.stop()


def _node_id(port: int) -> str:
    with redis.Redis(port=port, decode_responses=True) as node:
        return str(node.execute_command("CLUSTER", "MYID"))


def move_slot(slot: int, source: int, destination: int, ports: list[int]) -> None:
    """Reshard one slot from the master on ``source`` to the one on ``destination``, keys
    included, as redis-cli --cluster reshard does."""
    source_id, destination_id = _node_id(source), _node_id(destination)
    with (
        redis.Redis(port=source, decode_responses=True) as src,
        redis.Redis(port=destination, decode_responses=True) as dst,
    ):
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", destination_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", destination, "", 0, 5000, "KEYS", *keys)
        for port in [destination, source, *ports]:
            with redis.Redis(port=port) as node:
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", destination_id)


async def test_a_stream_follows_its_session_to_the_master_its_slot_moves_to(
    redis_cluster: RedisClusterProcess,
) -> None:
    redis_cluster.flush()
    ports = redis_cluster.ports
    async with opened(redis_cluster.url) as backend:
        events = event_log(backend)
        session_id = await new_session(backend)
        channel = events._keys.session_channel(TENANT, session_id)
        async with streaming(events, session_id) as seen:
            first = await append_event(backend, session_id)
            assert await seen.reach(1) == [first]
            source = node_port(events, session_id, 0)
            destination = next(port for port in ports if port != source)
            slot = redis.crc.key_slot(channel.encode())
            move_slot(slot, source, destination, ports)
            try:
                # The source told the reader it dropped the channel; the reader re-routed it.
                await eventually(lambda: events._route.get(channel) == f"127.0.0.1:{destination}")
                later = [await append_event(backend, session_id) for _ in range(2)]
                assert await seen.reach(3) == [first, *later]
            finally:
                move_slot(slot, destination, source, ports)
            await eventually(lambda: events._route.get(channel) == f"127.0.0.1:{source}")
            back = await append_event(backend, session_id)
            assert await seen.reach(4) == [first, *later, back]
            assert events.silent_readers() == []


def add_replica(master_port: int, ports: list[int]) -> RedisProcess:
    """A new cluster node made a replica of the master on ``master_port``, in sync with it and
    known as its replica to every node on ``ports`` (the masters vote for its promotion only
    once they know it)."""
    replica = cluster_node()
    replica.start()
    master_id = _node_id(master_port)
    deadline = time.monotonic() + BOUND_S
    with redis.Redis(port=replica.port, decode_responses=True) as node:
        node.execute_command("CLUSTER", "MEET", "127.0.0.1", master_port)
        while True:  # it must know the master before it can follow it
            try:
                node.execute_command("CLUSTER", "REPLICATE", master_id)
                break
            except redis.ResponseError:
                assert time.monotonic() < deadline, "the new node never met the master"
                time.sleep(0.05)
        while node.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never synced"
            time.sleep(0.05)
        replica_id = str(node.execute_command("CLUSTER", "MYID"))
    for port in ports:
        with redis.Redis(port=port, decode_responses=True) as other:
            while not any(
                view.node_id == replica_id and view.master_id == master_id
                for view in parse_cluster_nodes(other.execute_command("CLUSTER", "NODES"))
            ):
                assert time.monotonic() < deadline, f"node {port} never learnt of the replica"
                time.sleep(0.05)
    return replica


async def test_a_stream_follows_its_session_to_the_replica_promoted_after_its_master_dies() -> None:
    """A private cluster (three masters, a replica for the session's master): the master is
    killed, the cluster promotes the replica, and the reader finds the new owner of the slot."""
    with RedisClusterProcess() as cluster:
        async with opened(cluster.url) as backend:
            events = event_log(backend)
            session_id = await new_session(backend)
            channel = events._keys.session_channel(TENANT, session_id)
            async with streaming(events, session_id) as seen:
                first = await append_event(backend, session_id)
                assert await seen.reach(1) == [first]
                master = node_port(events, session_id, 0)
                replica = add_replica(master, cluster.ports)
                try:
                    with redis.Redis(port=master) as node:
                        node.execute_command("WAIT", 1, 5000)  # the replica has the event
                    next(n for n in cluster.nodes if n.port == master).kill()
                    await eventually(
                        lambda: events._route.get(channel) == f"127.0.0.1:{replica.port}"
                    )
                    later = [await append_event(backend, session_id) for _ in range(2)]
                    assert await seen.reach(3) == [first, *later]
                    await eventually(lambda: events.silent_readers() == [])
                finally:
                    replica.close()


async def test_during_an_upgrade_old_and_new_processes_hear_each_others_events(
    target: Target,
) -> None:
    """ORCH_EVENT_PUBSUB_LEGACY: this release publishes on the classic channel too (an older
    process's SUBSCRIBE hears it) and subscribes to it too (an older process's PUBLISH reaches
    its streams); its streams yield each event once."""
    backend = open_backend(
        BackendConfig(
            redis_url=target.url,
            key_prefix="test",
            session_retention_ms=60_000,
            event_pubsub_legacy=True,
        )
    )
    old_reader = create_redis(target.url, socket_timeout_s=5.0, connect_timeout_s=1.0)
    old_pubsub = old_reader.pubsub()
    try:
        keys = KeySpace("test")
        session_id = await new_session(backend)
        classic = keys.legacy_session_channel(TENANT, session_id)
        await old_pubsub.subscribe(classic)
        assert (await old_pubsub.get_message(timeout=5))["type"] == "subscribe"
        async with streaming(event_log(backend), session_id) as seen:
            new = await append_event(backend, session_id)
            heard = await old_pubsub.get_message(timeout=BOUND_S)
            assert heard is not None and heard["data"].startswith(f"{new} ")
            # An older process's job script: the log entry, then PUBLISH on the classic channel.
            old = int(await old_reader.incr(keys.session_event_seq(TENANT, session_id)))
            envelope = '{"j":"job-1","r":"req-1","k":"accepted","d":{}}'
            await old_reader.xadd(
                keys.session_events(TENANT, session_id), {"t": "1", "e": envelope}, id=f"{old}-0"
            )
            await old_reader.publish(classic, f"{old} 1 {envelope}")
            assert await seen.reach(2) == [new, old]
            last = await append_event(backend, session_id)
            assert await seen.reach(3) == [new, old, last]
    finally:
        await old_pubsub.aclose()  # type: ignore[no-untyped-call]
        await old_reader.aclose()
        await backend.aclose()
