"""Start and stop a private redis-server on a free loopback port (never the shared 6379)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux: 32768 by default)."""
    try:
        low = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
        return int(low)
    except (OSError, ValueError, IndexError):
        return 32768


_FIRST_PORT = 10_000
_EPHEMERAL_FLOOR = _ephemeral_floor()
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now, for a server a test starts a little later.

    Taken below the kernel's ephemeral range: a port the kernel picks for binding to port 0 is
    one it may also give to the next outgoing connection (a client, a Redis connection), which
    then holds it when the server binds (seen as "Address already in use" under load). A port
    is handed out once per test process, so two servers of one test never get the same one."""
    if _EPHEMERAL_FLOOR - _FIRST_PORT > 1000:
        for _ in range(200):
            port = random.randint(_FIRST_PORT, _EPHEMERAL_FLOOR - 1)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_DIR_PREFIX = "orch-redis-"
_OWNER_FILE = "owner.pid"
_SERVER_FILE = "server.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False  # a zombie: ended, not yet reaped by its parent
    return True


def sweep_orphans(root: Path | None = None) -> int:
    """Stop the redis-servers of test and bench processes that are gone, and remove their
    directories; how many servers were stopped.

    A process killed (or ended by the hard per-test bound) runs no teardown, so its servers
    would outlive it. A server is only stopped when its directory's owner process is gone and
    the process recorded for it is a redis-server working in that directory (Redis changes
    into its ``--dir``), so a reused pid is never hit."""
    stopped = 0
    for directory in Path(root or tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*"):
        try:
            owner = int((directory / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or still being made
        if _alive(owner):
            continue
        with contextlib.suppress(OSError, ValueError):
            server = int((directory / _SERVER_FILE).read_text())
            if os.readlink(f"/proc/{server}/cwd") == os.path.realpath(directory) and _alive(server):
                os.kill(server, 9)
                stopped += 1
        shutil.rmtree(directory, ignore_errors=True)
    return stopped


class RedisProcess:
    """A redis-server child process, without persistence unless ``appendonly`` (AOF, fsync on
    every write); can be stopped (or killed) and started again on the same port, keeping its
    data directory (to simulate an outage, or a restart with or without its data)."""

    def __init__(
        self,
        port: int | None = None,
        *,
        appendonly: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: run `make tools` (installs it via apt)")
        self.binary = binary
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = extra_args
        self._dir = tempfile.TemporaryDirectory(prefix=_DIR_PREFIX)
        (self.directory / _OWNER_FILE).write_text(str(os.getpid()))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def directory(self) -> Path:
        return Path(self._dir.name)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self._proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                "always",
                "--dir",
                self._dir.name,
                "--logfile",
                str(Path(self._dir.name) / "redis.log"),
                "--protected-mode",
                "yes",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        (self.directory / _SERVER_FILE).write_text(str(self._proc.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log = Path(self._dir.name) / "redis.log"
                tail = log.read_text(errors="replace")[-400:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {tail}")
            if self.ping():
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def ping(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock,
        ):
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        return False

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def restart(self, timeout_s: float = 10.0) -> None:
        """Stop with a snapshot of the data (SHUTDOWN SAVE) and start again on the same port and
        directory (a cluster node keeps its nodes.conf): a restart that loses nothing."""
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s) as sock,
        ):
            sock.sendall(b"SHUTDOWN SAVE\r\n")
            sock.recv(64)  # the server closes the connection once it has saved
        if self._proc is not None:
            self._proc.wait(timeout=timeout_s)
        self._proc = None
        self.start(timeout_s)

    def pause(self) -> None:
        """SIGSTOP: the server stops answering but keeps every connection open (a hung or
        partitioned node, as its clients see it)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no shutdown save, only what the AOF already holds survives."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the running server (SIGSTOP / SIGCONT: pause and resume it)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signum)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.signal(signal.SIGCONT)  # a paused server cannot be stopped
        self.stop()
        self._dir.cleanup()
