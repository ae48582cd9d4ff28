"""A private Redis Cluster: three masters on free loopback ports (with ``replicas=1``, a replica
for each, six nodes), each in its own directory, joined with ``redis-cli --cluster create``.

A failover test finds the master owning a key (``master_of``), kills it with SIGKILL
(``kill``), and waits until its replica has taken over its slots and every surviving node says
``cluster_state:ok`` (``wait_failed_over``): polled, with a bound, never a fixed sleep.

No pytest here: the test fixtures (tests/conftest.py) and the benchmarks (bench.processes) both
start their clusters with :class:`RedisClusterProcess`."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from types import TracebackType

import redis

from tests.support import redis_process
from tests.support.redis_process import RedisProcess

MASTERS = 3
# Short, so a node that goes away is noticed quickly. A failover takes about this long plus the
# replica's election delay (0.5 to 1 s, more for a lower-ranked replica).
NODE_TIMEOUT_MS = 2000
# The failover tests' clusters: a killed master is replaced within about 2 s.
FAILOVER_NODE_TIMEOUT_MS = 1000


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


def cluster_node(node_timeout_ms: int = NODE_TIMEOUT_MS) -> RedisProcess:
    """A cluster-enabled redis-server (not started yet) on a port whose bus port is free too;
    it syncs a new replica without delay."""
    return RedisProcess(
        free_node_port(),
        extra_args=(
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--repl-diskless-sync-delay",
            "0",
            "--cluster-node-timeout",
            str(node_timeout_ms),
        ),
    )


def _node(port: int, timeout_s: float = 1.0) -> redis.Redis:
    """A plain client of one node (commands to its own slots or the node itself)."""
    return redis.Redis(port=port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


@dataclass(frozen=True, slots=True)
class NodeView:
    """One line of CLUSTER NODES, as one node sees it."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str  # "-" for a master
    connected: bool
    slots: tuple[tuple[int, int], ...]  # inclusive ranges

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return "fail" in self.flags or "fail?" in self.flags

    def owns(self, slot: int) -> bool:
        return any(low <= slot <= high for low, high in self.slots)


def parse_cluster_nodes(text: str) -> list[NodeView]:
    """CLUSTER NODES output (without slots being migrated, which a test cluster never has)."""
    views = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split()
        address = fields[1].split("@", 1)[0]
        slots = []
        for spec in fields[8:]:
            if spec.startswith("["):
                continue
            low, _, high = spec.partition("-")
            slots.append((int(low), int(high or low)))
        views.append(
            NodeView(
                node_id=fields[0],
                port=int(address.rpartition(":")[2]),
                flags=frozenset(fields[2].split(",")),
                master_id=fields[3],
                connected=fields[7] == "connected",
                slots=tuple(slots),
            )
        )
    return views


class RedisClusterProcess:
    """Cluster-enabled redis-server children joined into one cluster (``MASTERS`` masters, each
    with ``replicas`` replicas); ``url`` is the orchestrator's ``redis+cluster://`` URL with
    every node as a seed."""

    def __init__(self, *, replicas: int = 0, node_timeout_ms: int = NODE_TIMEOUT_MS) -> None:
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes = [cluster_node(node_timeout_ms) for _ in range(MASTERS * (1 + replicas))]
        self.killed: list[RedisProcess] = []

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    @property
    def alive(self) -> list[RedisProcess]:
        return [node for node in self.nodes if node not in self.killed]

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
                    str(self.replicas),
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
        """Until every node reports cluster_state:ok and knows all nodes, and every replica's
        link to its master is up (its initial sync done)."""
        while time.monotonic() < deadline:
            if all(self._ok(port) for port in self.ports):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the cluster on ports {self.ports} did not reach cluster_state:ok")

    def _ok(self, port: int) -> bool:
        with contextlib.suppress(redis.RedisError), _node(port) as node:
            info = node.cluster("INFO")
            if not (
                info.get("cluster_state") == "ok"
                and int(info.get("cluster_known_nodes", 0)) == len(self.nodes)
            ):
                return False
            replication = node.info("replication")
            if replication.get("role") == "slave":
                return bool(replication.get("master_link_status") == "up")
            return int(replication.get("connected_slaves", 0)) == self.replicas
        return False

    # -- finding and killing nodes -------------------------------------------------------

    def view(self) -> list[NodeView]:
        """CLUSTER NODES as the first node still running sees it."""
        for node in self.alive:
            with contextlib.suppress(redis.RedisError), _node(node.port) as client:
                return parse_cluster_nodes(client.execute_command("CLUSTER", "NODES").decode())
        raise RuntimeError("no node of the cluster answers")

    def slot_of(self, key: str) -> int:
        with _node(self.alive[0].port) as client:
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))

    def node(self, port: int) -> RedisProcess:
        return next(node for node in self.nodes if node.port == port)

    def master_of(self, key: str) -> RedisProcess:
        """The node serving ``key``'s slot now."""
        slot = self.slot_of(key)
        owner = next(v for v in self.view() if v.is_master and v.owns(slot) and not v.failed)
        return self.node(owner.port)

    def replicas_of(self, master: RedisProcess) -> list[RedisProcess]:
        views = self.view()
        master_id = next(v.node_id for v in views if v.port == master.port)
        return [self.node(v.port) for v in views if v.master_id == master_id]

    def kill(self, node: RedisProcess) -> None:
        """SIGKILL: the node's replication buffer and anything not yet sent to its replica
        die with it."""
        node.kill()
        self.killed.append(node)

    def kill_in_sync(self, master: RedisProcess, timeout_s: float = 5.0) -> None:
        """SIGKILL ``master`` once its replicas have every write it acknowledged: its writes
        paused first (``CLIENT PAUSE WRITE``: calls arriving meanwhile wait, then fail with
        the kill, unanswered), then its replicas waited for (``wait_in_sync``). A plain
        ``kill`` under load can land between a reply and the replica's copy of that write
        (Redis may answer a client before it writes to the replica, in the same event loop
        pass), losing it (ADR 0016); this kill loses nothing the master answered."""
        with _node(master.port) as client:
            client.execute_command("CLIENT", "PAUSE", int(timeout_s * 1000) * 2, "WRITE")
        self.wait_in_sync(master, timeout_s)
        self.kill(master)

    def wait_in_sync(self, master: RedisProcess, timeout_s: float = 5.0) -> None:
        """Wait until each replica of ``master`` has what ``master`` had written when called
        (its replication offset, polled)."""
        replicas = self.replicas_of(master)
        with _node(master.port) as client:
            target = int(client.info("replication")["master_repl_offset"])
        deadline = time.monotonic() + timeout_s
        for replica in replicas:
            with _node(replica.port) as client:
                while int(client.info("replication")["slave_repl_offset"]) < target:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"replica {replica.port} never reached {target}")
                    time.sleep(0.001)

    def hold_back_replication(self, master: RedisProcess) -> list[RedisProcess]:
        """Stop ``master``'s replicas (SIGSTOP) and close its links to them: until
        ``release`` they receive nothing ``master`` writes from now on (what an asynchronous
        replica may lack when its master dies). Keep it shorter than the node timeout, or the
        stopped replicas are taken for failed too."""
        replicas = self.replicas_of(master)
        for replica in replicas:
            replica.signal(signal.SIGSTOP)
        with _node(master.port) as client:
            client.execute_command("CLIENT", "KILL", "TYPE", "replica")
        return replicas

    @staticmethod
    def release(replicas: list[RedisProcess]) -> None:
        """Let replicas stopped by ``hold_back_replication`` run again."""
        for replica in replicas:
            replica.signal(signal.SIGCONT)

    def wait_failed_over(self, key: str, timeout_s: float = 20.0) -> RedisProcess:
        """The node serving ``key``'s slot once a running replica was promoted in place of its
        killed master and every running node says cluster_state:ok (polled, up to
        ``timeout_s``)."""
        slot = self.slot_of(key)
        dead = {node.port for node in self.killed}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, StopIteration):
                owner = next(
                    v for v in self.view() if v.is_master and v.owns(slot) and not v.failed
                )
                if owner.port not in dead and all(self._state_ok(n.port) for n in self.alive):
                    return self.node(owner.port)
            time.sleep(0.05)
        raise RuntimeError(f"no replica took over slot {slot} within {timeout_s} s")

    def _state_ok(self, port: int) -> bool:
        with contextlib.suppress(redis.RedisError), _node(port) as node:
            return bool(node.cluster("INFO").get("cluster_state") == "ok")
        return False

    # -- data and lifetime ----------------------------------------------------------------

    def flush(self) -> None:
        """Empty every master (a test's data; the cluster layout stays)."""
        for view in self.view():
            if view.is_master and not view.failed:
                with _node(view.port, timeout_s=5.0) as node:
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
