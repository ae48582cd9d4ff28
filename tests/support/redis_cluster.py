"""A private Redis Cluster: three masters on free loopback ports, each in its own directory,
joined with ``redis-cli --cluster create`` (no replicas).

No pytest here: the test fixtures (tests/conftest.py) and the benchmarks (bench.processes) both
start their clusters with :class:`RedisClusterProcess`."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from types import TracebackType

import redis

from tests.support import redis_process
from tests.support.redis_process import RedisProcess

MASTERS = 3
# Short, so a node that goes away is noticed quickly (no failover test uses it yet).
NODE_TIMEOUT_MS = 2000


# A cluster node also listens on its port + 10000 (the cluster bus).
_BUS_OFFSET = 10_000


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_node_port() -> int:
    """A free port whose bus port (+10000) is free too and below the kernel's ephemeral range
    (else an outgoing connection may hold it when the node binds it)."""
    for _ in range(200):
        port = redis_process.free_port()
        bus = port + _BUS_OFFSET
        if bus < redis_process._EPHEMERAL_FLOOR and _bindable(bus):
            redis_process._handed_out.add(bus)
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _node(port: int, timeout_s: float = 1.0) -> redis.Redis:
    """A plain client of one node (commands to its own slots or the node itself)."""
    return redis.Redis(port=port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


class RedisClusterProcess:
    """Three cluster-enabled redis-server children joined into one cluster; ``url`` is the
    orchestrator's ``redis+cluster://`` URL with every node as a seed."""

    def __init__(self) -> None:
        self.nodes = [
            RedisProcess(
                free_node_port(),
                extra_args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(NODE_TIMEOUT_MS),
                ),
            )
            for _ in range(MASTERS)
        ]

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self, timeout_s: float = 30.0) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli not found: run `make tools` (installs redis-server)")
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{port}" for port in self.ports),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=timeout_s,
            )
            self._wait_ok(time.monotonic() + timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait_ok(self, deadline: float) -> None:
        """Until every node reports cluster_state:ok and knows all masters."""
        while time.monotonic() < deadline:
            if all(self._ok(port) for port in self.ports):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the cluster on ports {self.ports} did not reach cluster_state:ok")

    def _ok(self, port: int) -> bool:
        with contextlib.suppress(redis.RedisError), _node(port) as node:
            info = node.cluster("INFO")
            return bool(
                info.get("cluster_state") == "ok"
                and int(info.get("cluster_known_nodes", 0)) == MASTERS
            )
        return False

    def flush(self) -> None:
        """Empty every master (a test's data; the cluster layout stays)."""
        for port in self.ports:
            with _node(port, timeout_s=5.0) as node:
                node.flushall()

    def close(self) -> None:
        """Stop every node and remove its directory, each even when another's stop fails."""
        errors: list[BaseException] = []
        for node in self.nodes:
            try:
                node.close()
            except BaseException as exc:  # every node is stopped, then the first re-raised
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> RedisClusterProcess:
        """Started; stopped on the way out of the block."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
