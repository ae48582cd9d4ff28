"""The WebSocket bridge: ``/ws/task_updates`` takes the seed's JSON task notices and feeds them
to the same notice processor as TaskUpdateService/PublishUpdates, answering each message with a
JSON verdict. Malformed JSON, or JSON nested deeper than MAX_JSON_DEPTH, is answered with an
error message; the socket stays open."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from domain.errors import DomainError, PermissionDenied, Unavailable
from domain.identity import Caller
from domain.notices import NoticeProcessor
from handlers.ws_notices import (
    NoticeShapeError,
    nested_deeper_than,
    notice_from_json,
    verdict_to_json,
)

log = logging.getLogger(__name__)

PATH = "/ws/task_updates"
# Deeper JSON is answered as malformed_json before it is looked at (a notice's result is
# bounded more tightly: domain.notices.MAX_RESULT_DEPTH).
MAX_JSON_DEPTH = 128

# Identifies the caller of an upgrade request from its headers and checks it has the service
# role; raises DomainError (PermissionDenied for the wrong role) to refuse.
Authenticator = Callable[[dict[str, str]], Awaitable[Caller]]


class WebSocketBridge:
    """An aiohttp server with the one WebSocket route."""

    def __init__(
        self,
        notices: NoticeProcessor,
        authenticate: Authenticator,
        *,
        max_message_bytes: int,
    ) -> None:
        self._notices = notices
        self._authenticate = authenticate
        self._max_message_bytes = max_message_bytes
        self._runner: web.AppRunner | None = None
        self.port = 0
        # Sockets being served now.
        self.open_sockets = 0

    async def start(self, address: str, *, reuse_port: bool = False) -> None:
        """Serve on ``address``; ``reuse_port`` lets other processes bind it too."""
        host, _, port = address.rpartition(":")
        app = web.Application()
        app.router.add_get(PATH, self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, host.strip("[]") or None, int(port), reuse_port=reuse_port or None
        )
        await site.start()
        bound = self._runner.addresses
        self.port = int(bound[0][1]) if bound else int(port)
        log.info("WebSocket bridge on %s%s (port %d)", address, PATH, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            caller = await self._authenticate(headers)
        except PermissionDenied as exc:
            return web.json_response({"error": exc.message}, status=403)
        except Unavailable as exc:
            return web.json_response({"error": exc.message}, status=503)
        except DomainError as exc:
            return web.json_response({"error": exc.message}, status=401)
        socket = web.WebSocketResponse(max_msg_size=self._max_message_bytes, heartbeat=30.0)
        await socket.prepare(request)
        index = 0
        self.open_sockets += 1
        try:
            async for message in socket:
                if message.type is not WSMsgType.TEXT:
                    if message.type is WSMsgType.BINARY:
                        await socket.send_json({"error": "malformed", "detail": "send JSON text"})
                    continue
                await socket.send_json(await self._answer(index, message.data, caller))
                index += 1
        except ConnectionResetError as exc:
            # The client went away with answers still to send (aiohttp: "Cannot write to
            # closing transport"): not an error; the notices it sent were applied.
            log.debug("WebSocket client went away after %d notice(s): %s", index, exc)
        finally:
            self.open_sockets -= 1
        return socket

    async def _answer(self, index: int, text: str, caller: Caller) -> dict[str, Any]:
        too_deep = {
            "index": index,
            "error": "malformed_json",
            "detail": f"nested deeper than {MAX_JSON_DEPTH} levels",
        }
        try:
            payload = json.loads(text)
        except RecursionError:  # far deeper than the limit: the parser gave up
            return too_deep
        except ValueError as exc:
            return {"index": index, "error": "malformed_json", "detail": str(exc)}
        if nested_deeper_than(payload, MAX_JSON_DEPTH):
            return too_deep
        job_id = payload.get("job_id", "") if isinstance(payload, dict) else ""
        try:
            raw = notice_from_json(payload)
        except (NoticeShapeError, TypeError, ValueError, ArithmeticError) as exc:
            return {
                "index": index,
                "job_id": job_id if isinstance(job_id, str) else "",
                "verdict": "malformed",
                "detail": str(exc),
            }
        try:
            outcome = await self._notices.process(raw, caller)
        except DomainError as exc:  # e.g. Redis down: answer, keep the socket
            return {
                "index": index,
                "job_id": raw.job_id,
                "error": "unavailable",
                "detail": exc.message,
            }
        return verdict_to_json(index, raw.job_id, outcome)
