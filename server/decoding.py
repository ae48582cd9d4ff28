"""Request decoding for every RPC: bytes that are not a valid request message are the caller's
error (INVALID_ARGUMENT), never the server's.

grpc.aio deserializes a request with the method handler's ``request_deserializer`` before the
handler runs (unary requests) or inside ``request_iterator`` (streamed requests); a
deserializer that raises (protobuf's DecodeError: truncated bytes, invalid UTF-8 in a string
field, ...) is "fatal" there: grpc logs an ERROR with a traceback and answers UNKNOWN, or, for a
streamed request, the exception surfaces in the handler's loop. So every method is registered
with no request deserializer (grpc then hands over the raw bytes) and its behavior is wrapped to
parse them itself: a request that does not parse ends the call with INVALID_ARGUMENT naming the
message type, without a log line (anyone can send bytes).

A servicer method marked ``@raw_request_frames`` (handlers.framing; PublishUpdates) gets the raw
frames of its request stream and parses each one itself, so a frame that does not decode is
judged on its own instead of ending the stream.

``server.edge.EdgeRegistrar`` applies this to every method it registers, so every service, health
and reflection included, and any RPC added later get it without further code. Behind the edge,
an async-generator behavior's request is parsed in the edge's own wrapper (``split_decoding``),
so no second wrapper re-yields every response.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from domain.errors import InvalidArgument
from handlers.errors import abort_with
from handlers.framing import wants_raw_frames
from server.wrapping import Ctx


def message_name(deserializer: Callable[[bytes], Any]) -> str:
    """The full name of the message type a deserializer (``Message.FromString``) parses."""
    cls = getattr(deserializer, "__self__", None)
    descriptor = getattr(cls, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) else "request message"


def undecodable(name: str) -> InvalidArgument:
    return InvalidArgument.field("request", f"not a valid {name}")


class _Decoder:
    """Parses one method's request bytes; aborts the call when they do not parse."""

    __slots__ = ("_deserialize", "_name")

    def __init__(self, deserializer: Callable[[bytes], Any]) -> None:
        self._deserialize = deserializer
        self._name = message_name(deserializer)

    async def decode(self, raw: Any, context: Ctx) -> Any:
        if not isinstance(raw, bytes):  # already a message (a caller that bypassed grpc)
            return raw
        try:
            return self._deserialize(raw)
        except Exception:  # DecodeError and whatever else a deserializer raises on bad input
            await abort_with(context, undecodable(self._name))
            raise AssertionError("unreachable: abort raises") from None

    async def frames(self, raw_frames: AsyncIterator[Any], context: Ctx) -> AsyncIterator[Any]:
        async for raw in raw_frames:
            yield await self.decode(raw, context)

    async def stream(self, raw_frames: AsyncIterator[Any], context: Ctx) -> AsyncIterator[Any]:
        """A request stream's decoded messages (decoded as the behavior reads them)."""
        return self.frames(raw_frames, context)


Decode = Callable[[Any, Ctx], Awaitable[Any]]


def _decoding_stream(behavior: Any, decode: Decode) -> Any:
    """An async-generator ``behavior`` behind ``decode``: it re-yields every response, so the
    edge applies ``decode`` itself instead (``split_decoding``); this is for the no-edge case."""

    async def stream(raw: Any, context: Ctx) -> AsyncIterator[Any]:
        async with aclosing(behavior(await decode(raw, context), context)) as responses:
            async for response in responses:
                yield response

    return stream


def _decoding_call(behavior: Any, decode: Decode) -> Any:
    async def call(raw: Any, context: Ctx) -> Any:
        result = behavior(await decode(raw, context), context)
        return await result if inspect.isawaitable(result) else result

    return call


def split_decoding(handler: Any) -> tuple[Any, Decode | None]:
    """``handler`` (a grpc.RpcMethodHandler) registered with no request deserializer, and the
    decode the caller must apply to the request before calling its async-generator behavior
    (None: the handler parses its requests itself, or has nothing to parse). A caller that
    iterates the responses anyway (server.edge) applies it there, so no second wrapper
    re-yields every message. Other behaviors are wrapped to parse the request bytes
    themselves (see the module docstring); a synchronous unary-response behavior (an
    unimplemented method of a generated base class) is called on the loop, as the edge calls
    it."""
    deserializer = handler.request_deserializer
    if deserializer is None:
        return handler, None
    for field in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, field)
        if behavior is not None:
            break
    else:
        return handler, None
    if inspect.isgeneratorfunction(behavior):  # a synchronous stream: none is registered
        return handler, None
    raw = handler._replace(request_deserializer=None)
    if handler.request_streaming and wants_raw_frames(behavior):
        return raw, None
    decoder = _Decoder(deserializer)
    decode = decoder.stream if handler.request_streaming else decoder.decode
    if inspect.isasyncgenfunction(behavior):
        return raw, decode
    return raw._replace(**{field: _decoding_call(behavior, decode)}), None


def decode_in_handler(handler: Any) -> Any:
    """``handler`` parsing its request bytes itself (see the module docstring), for a server
    without the edge; handlers without a deserializer are returned as they are."""
    prepared, decode = split_decoding(handler)
    if decode is None:
        return prepared
    field = "unary_stream" if prepared.unary_stream is not None else "stream_stream"
    return prepared._replace(**{field: _decoding_stream(getattr(prepared, field), decode)})
