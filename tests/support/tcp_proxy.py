"""A loopback TCP proxy that can cut every connection through it at once, as a network path
that drops (the client sees its streams fail with UNAVAILABLE and must reconnect)."""

from __future__ import annotations

import asyncio
import contextlib


class DroppingProxy:
    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0
        # Cleared while stalled: nothing is forwarded, no connection is closed.
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> str:
        """Returns the address to give the client."""
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def stall(self) -> None:
        """Stop forwarding in both directions and keep every connection open: a path that
        goes silent (no reset, no FIN); what was sent meanwhile is held until ``resume``."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def drop_all(self) -> None:
        """Resets every open connection (new ones are accepted as before)."""
        for writer in self._writers:
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        self.drop_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
