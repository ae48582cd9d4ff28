"""What a Redis in the middle of a failover answers is UNAVAILABLE (domain.errors.Unavailable),
which clients retry, never an unhandled error (INTERNAL): a cluster without a master for some
slots, a write on a connection whose node just died, a master refusing writes because no
replica is in sync (min-replicas-to-write). tests/faults/test_cluster_failover.py kills a
master under load."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Connection

from domain.errors import Unavailable
from registry.redis_client import redis_errors_as_unavailable, unavailable_from
from tests.support.redis_process import RedisProcess
from tests.support.registries import new_session, opened_registry

# uvloop's error for a write on a transport whose peer is gone, as redis-py lets it through.
CLOSED_TRANSPORT = RuntimeError(
    "unable to perform operation on <TCPTransport closed=True reading=False 0x55>; "
    "the handler is closed"
)


@pytest.mark.parametrize(
    "error",
    [
        redis_errors.ClusterDownError("The cluster is down"),
        redis_errors.TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
        redis_errors.SlotNotCoveredError("Slot 123 is not covered by the cluster."),
        CLOSED_TRANSPORT,
        redis_errors.ResponseError("NOREPLICAS Not enough good replicas to write."),
        redis_errors.ConnectionError("Connection closed by server."),
    ],
    ids=["clusterdown", "tryagain", "slot-not-covered", "closed-transport", "noreplicas", "conn"],
)
def test_a_failover_error_is_unavailable(error: Exception) -> None:
    assert isinstance(unavailable_from(error), Unavailable)
    with pytest.raises(Unavailable), redis_errors_as_unavailable():
        raise error


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("some other runtime error"),
        redis_errors.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"),
        redis_errors.ReadOnlyError("You can't write against a read only replica."),
    ],
    ids=["runtime", "wrongtype", "readonly"],
)
def test_another_error_is_left_as_it_is(error: Exception) -> None:
    assert unavailable_from(error) is None
    with pytest.raises(type(error)), redis_errors_as_unavailable():
        raise error


async def test_a_command_on_a_connection_torn_down_under_it_is_unavailable() -> None:
    """redis-py raises AttributeError when a concurrent disconnect dropped the connection's
    writer just before a command is sent on it (seen while a cluster master was killed)."""
    connection = Connection(host="127.0.0.1", port=1)  # never connected: no writer
    with pytest.raises(AttributeError) as raised:
        await connection._send_packed_command([b"PING"])
    assert isinstance(unavailable_from(raised.value), Unavailable)
    with pytest.raises(Unavailable), redis_errors_as_unavailable():
        await connection._send_packed_command([b"PING"])


def test_an_attribute_error_of_our_own_code_is_left_as_it_is() -> None:
    def own_bug() -> None:
        none: Any = None
        none.writelines([b"PING"])

    with pytest.raises(AttributeError) as raised:
        own_bug()
    assert unavailable_from(raised.value) is None
    with pytest.raises(AttributeError), redis_errors_as_unavailable():
        own_bug()


@pytest.fixture
def master_without_its_replica() -> Iterator[RedisProcess]:
    """A Redis that takes writes only with a replica in sync, and has none."""
    redis = RedisProcess(extra_args=("--min-replicas-to-write", "1"))
    redis.start()
    yield redis
    redis.close()


async def test_a_write_refused_for_want_of_a_replica_is_unavailable(
    master_without_its_replica: RedisProcess,
) -> None:
    async with opened_registry(master_without_its_replica.url) as registry:
        with pytest.raises(Unavailable, match="NOREPLICAS"):
            await new_session(registry)
