"""``orchestrator serve --processes N``: N server processes sharing one port and one Redis.

A single Python process uses one core. With ``--processes N`` this process starts N children,
each an ordinary ``orchestrator serve`` with ``ORCH_SO_REUSEPORT`` on, so they all bind the
same gRPC port and the kernel spreads new connections over them; their state is in the shared
Redis, so a chat accepted by one is followed, reported on and cancelled through any other.

What is per process: the gRPC health service answers for the process a connection reached;
``/metrics`` of child i is served on the configured metrics port + i (each scraped on its own);
the WebSocket bridge binds its port with SO_REUSEPORT too. The supervisor itself serves nothing.

Stopping: SIGTERM or SIGINT is passed to every child, which stops gracefully
(``ORCH_SHUTDOWN_GRACE``); a child still running ``ORCH_SHUTDOWN_GRACE`` + 10 s later is
killed. A child that exits on its own stops the others and the supervisor exits non-zero, so
the container (or systemd) restarts the whole set; another process resumes its jobs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from server.config import Settings
from server.metrics import split_address

log = logging.getLogger(__name__)

# Time a child gets beyond the shutdown grace before it is killed.
KILL_AFTER_GRACE_S = 10.0


def refusal(settings: Settings, processes: int, tracemalloc: bool) -> str | None:
    """Why ``--processes`` cannot run with these settings (None when it can)."""
    if processes < 1:
        return "--processes must be at least 1"
    if processes == 1:
        return None
    if not settings.redis_url:
        return (
            f"--processes {processes} needs REDIS_URL: the in-memory registry keeps its state "
            "in one process, so processes would not see each other's sessions and jobs"
        )
    if settings.embedded_reference:
        return "--processes > 1 cannot embed the reference services (ORCH_EMBEDDED_REFERENCE)"
    try:
        port = split_address(settings.listen_address)[1]
    except ValueError as exc:
        return f"ORCH_LISTEN_ADDRESS: {exc}"
    if port == 0:
        return "--processes > 1 needs a fixed port in ORCH_LISTEN_ADDRESS (not 0)"
    if tracemalloc:
        return "--tracemalloc traces one process: use it without --processes"
    return None


def child_environment(settings: Settings, index: int, environ: Mapping[str, str]) -> dict[str, str]:
    """Child ``index``'s environment: this one's, with port reuse on and its own metrics port
    (the configured one + index; a configured port 0 stays 0: any free port)."""
    env = dict(environ)
    env["ORCH_SO_REUSEPORT"] = "true"
    if settings.metrics_address:
        host, port = split_address(settings.metrics_address)
        if port:
            bracketed = f"[{host}]" if ":" in host else host
            env["ORCH_METRICS_ADDRESS"] = f"{bracketed}:{port + index}"
    return env


async def supervise(settings: Settings, processes: int, command: Sequence[str]) -> int:
    """Run ``processes`` children of ``command`` until SIGTERM/SIGINT (exit 0 once all have
    stopped) or until one exits on its own (the others are stopped; exit 1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    children = [
        await asyncio.create_subprocess_exec(
            *command,
            env=child_environment(settings, index, os.environ),
            preexec_fn=_stop_with_parent,
        )
        for index in range(processes)
    ]
    log.info(
        "started %d server processes on %s (pids %s)",
        processes,
        settings.listen_address,
        ", ".join(str(child.pid) for child in children),
    )
    stopping = asyncio.ensure_future(stop.wait())
    exits = {asyncio.ensure_future(child.wait()): child for child in children}
    done, _ = await asyncio.wait({stopping, *exits}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if stopping not in done:
        ended = next(exits[task] for task in done if task in exits)
        log.error(
            "server process %d exited (status %s): stopping the others", ended.pid, ended.returncode
        )
        status = 1
    stopping.cancel()
    for child in children:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
    _, late = await asyncio.wait(exits, timeout=settings.shutdown_grace + KILL_AFTER_GRACE_S)
    for task in late:
        child = exits[task]
        log.error("server process %d did not stop in time: killed", child.pid)
        child.kill()
    if late:
        await asyncio.wait(late)
    log.info("all %d server processes stopped", processes)
    return status


def _stop_with_parent() -> None:
    """In a child before exec (Linux): SIGTERM it when the supervisor dies, even by SIGKILL,
    so no server process outlives its supervisor."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def serve_command(argv: Sequence[str]) -> list[str]:
    """The command a child runs: this interpreter's ``orchestrator serve`` with ``argv``."""
    return [sys.executable, "-m", "server", "serve", *argv]
