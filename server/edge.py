"""The edge: request context, metrics, identity and rate limits in one wrapper per method.

The four edge concerns used to be four grpc interceptors, each with its own coroutine in
``intercept_service`` and its own wrapper around every call, each reading the call's metadata.
Now one wrapper per method does all four, and it is applied when the services are registered
(``EdgeRegistrar``), not by an interceptor, so no per-call handler lookup through an
interceptor chain happens either. grpc interceptors still work on top (OpenTelemetry's, when
enabled, is the outermost). Per call, the wrapper:

1. reads the metadata once (``x-request-id``, ``traceparent``, ``authorization``), binds the
   request context (handlers.request_context) and returns the request id in the metadata of
   every RPC, health and reflection included (see the end of this docstring); with server
   spans (``server_spans``: OpenTelemetry's interceptor runs outside) the trace context bound
   is the server span's, so the calls and jobs the RPC causes nest under it (server.tracing);
2. counts and times the call (server.metrics; streams are also counted while open), so the
   refusals below are counted like any other outcome;
3. authenticates the bearer API key and checks the role the method needs (server.auth), and
   sets the Caller (domain.identity) on the request context of step 1 (one binding per call);
4. charges the tenant's (and key's) request rate and takes a stream slot for server streams
   (server.edge_limits).

Only then is the request parsed (server.decoding, applied by the registrar inside the edge):
bytes that are not a valid message are INVALID_ARGUMENT, counted like any outcome, and a caller
without a key never gets its bytes parsed.

A key's record is read from the store on its first call in the process; from then on the
Authenticator remembers its Caller and the rate limiter checks the key's standing (in its
tenant's key index, not in its revoked set) in the same step as the rate: one Redis round trip
per call, and a revoked key is refused on its next call by every replica (ADR 0013). What
depends only on the method (its role, its metrics recorder, the wrapped handler) is computed
once per method.

Echoing the request id in the initial metadata costs grpc.aio a send-initial-metadata batch of
its own on unary-response calls (its final batch carries only empty initial metadata; grpc.aio
has no way to put ours in it): in the bench (bench.interceptor_bench) that batch alone cost more
than the rest of the chain. So with ``trailing_request_ids`` (the default;
ORCH_UNARY_REQUEST_ID=initial turns it off) unary calls return the id in their trailing
metadata, which goes out in the final batch at no extra cost; streams of every direction send it
in their initial metadata, before their first message. Refused and failed calls carry it in
their trailers in both modes (handlers.errors).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from time import perf_counter
from typing import Any, cast

import grpc

from domain.errors import DomainError, Unauthenticated
from domain.identity import Caller, Role
from handlers.errors import abort_internal, abort_with, call_gone_is_cancellation
from handlers.request_context import (
    REQUEST_ID_HEADER,
    TRACEPARENT_HEADER,
    bind_request_context,
    new_request_id,
    parse_traceparent,
    valid_request_id,
)
from server import metrics as metrics_module
from server.auth import AUTHORIZATION_HEADER, Authenticator, required_role, wrong_role
from server.auth_failures import AuthFailures
from server.decoding import Decode, decode_in_handler, split_decoding
from server.edge_limits import EdgeLimits
from server.metrics import Metrics
from server.revocation import OpenStream, OpenStreams, revoked_error
from server.rpc_metrics import RPC_TYPES
from server.tracing import current_traceparent
from server.wrapping import Ctx, HandlerCache, StreamBehavior, UnaryBehavior, wrap_handler

_OK = grpc.StatusCode.OK
_UNKNOWN = grpc.StatusCode.UNKNOWN
_CANCELLED = grpc.StatusCode.CANCELLED


def _final_code(context: Ctx, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else default


def read_metadata(context: Ctx) -> tuple[str, str | None, str | None]:
    """(request id, traceparent or None, authorization or None) in one pass over the call's
    metadata; an invalid or missing request id is replaced by a new one."""
    request_id = ""
    traceparent: str | None = None
    authorization: str | None = None
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION_HEADER:
            if authorization is None and isinstance(value, str):
                authorization = value
        elif key == REQUEST_ID_HEADER:
            if isinstance(value, str):
                request_id = value
        elif key == TRACEPARENT_HEADER and isinstance(value, str):
            traceparent = value
    if not valid_request_id(request_id):
        request_id = new_request_id()
    return request_id, parse_traceparent(traceparent), authorization


class _Plan:
    """What the edge does for one method, decided once: the role it needs (None for public
    methods, which are neither authenticated nor limited) and where its metrics go."""

    __slots__ = ("method", "needed", "recorder")

    def __init__(self, method: str, metrics: Metrics, rpc_type: str = "unary") -> None:
        self.method = method
        self.needed: Role | None = required_role(method)
        self.recorder = metrics.recorder(method, rpc_type)


class Edge:
    """The whole edge chain as one wrapper per method (see the module docstring)."""

    def __init__(
        self,
        metrics: Metrics,
        authenticator: Authenticator,
        limits: EdgeLimits,
        *,
        trailing_request_ids: bool = True,
        open_streams: OpenStreams | None = None,
        auth_failures: AuthFailures | None = None,
        server_spans: bool = False,
    ) -> None:
        self._metrics = metrics
        # Whether each call runs in a server span (its traceparent is the call's context).
        self._server_spans = server_spans
        # Streaming calls by key id, so a revoked key's streams can be ended (server.revocation).
        self._open_streams = open_streams or OpenStreams()
        # Failed authentications: logged (sampled) and throttled per client address.
        self._auth_failures = auth_failures or AuthFailures(0, 1.0)
        self._authenticator = authenticator
        self._limits = limits
        self._trailing_request_ids = trailing_request_ids

    def wrap(self, method: str, handler: Any) -> Any:
        """``handler`` (a grpc.RpcMethodHandler of ``method``) run behind the edge, parsing
        its requests itself (server.decoding): an async-generator behavior's request is
        parsed in the edge's own wrapper after the checks, so no second wrapper re-yields
        every response."""
        handler, decode = split_decoding(handler)
        rpc_type = RPC_TYPES[bool(handler.request_streaming), bool(handler.response_streaming)]
        plan = _Plan(method, self._metrics, rpc_type)
        client_stream = handler.stream_unary is not None
        return wrap_handler(
            handler,
            lambda b: self._unary(b, plan, stream=False, client_stream=client_stream),
            lambda b: self._streaming(b, plan, decode),
            lambda b: self._unary(b, plan, stream=True),
        )

    async def _begin(self, context: Ctx, plan: _Plan, *, trailing_id: bool) -> Caller | None:
        """Steps 1, 3 and 4 (step 2 wraps them): bind the request context, echo the request
        id (in the trailers when ``trailing_id``), authenticate and authorize, charge the rate.
        Ends the call on refusal.

        A header whose key verified before in this process (Authenticator.known) is not read
        from the store again: the key's standing is checked with the rate, in one step (one
        Redis round trip). A key found revoked or gone there is forgotten and authenticated
        again from the store, which refuses it."""
        request_id, traceparent, authorization = read_metadata(context)
        if self._server_spans:
            traceparent = current_traceparent() or traceparent
        scope = bind_request_context(request_id, traceparent, plan.method)
        if trailing_id:
            context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        else:
            with call_gone_is_cancellation():
                await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
        needed = plan.needed
        if needed is None:
            return None
        failures = self._auth_failures
        if failures.tracking:  # some address failed lately: is this one throttled?
            refusal = failures.refusal(context.peer())
            if refusal is not None:
                await abort_with(context, refusal)
        limits = self._limits
        authenticator = self._authenticator
        caller = authenticator.known(authorization)
        if caller is not None and limits.checks_keys:
            if caller.role is not needed:
                await abort_with(context, wrong_role(caller, needed))
            if await limits.check_rate(caller, context, check_key=True):
                scope.caller = caller
                return caller
            authenticator.forget(cast(str, authorization))
        try:
            caller = await authenticator.authenticate_header(authorization, needed)
        except Unauthenticated as error:
            failures.failed(context.peer(), authorization, plan.method, error.message)
            await abort_with(context, error)
            raise AssertionError("unreachable: abort raises") from None
        except DomainError as error:
            await abort_with(context, error)
            raise AssertionError("unreachable: abort raises") from None
        except Exception as exc:
            await abort_internal(context, exc)
            raise AssertionError("unreachable: abort raises") from None
        scope.caller = caller
        await limits.check_rate(caller, context)
        return caller

    def _unary(
        self, behavior: UnaryBehavior, plan: _Plan, *, stream: bool, client_stream: bool = False
    ) -> UnaryBehavior:
        """Unary-response calls, and (``stream``) server streams written with context.write.
        Streams of either direction are registered by key id while open (server.revocation)."""
        limits = self._limits
        begin = self._begin
        # Only unary calls return the id last: a stream of either direction may stay open for
        # long, and its caller gets the id with the headers, at once.
        trailing_id = self._trailing_request_ids and not (stream or client_stream)
        open_streams = self._open_streams
        tracked = stream or client_stream
        edge = self

        async def run(request: Any, context: Ctx) -> Any:
            async with _Call(edge, plan, stream, context) as call:
                caller = await begin(context, plan, trailing_id=trailing_id)
                if stream and caller is not None:
                    call.slot = await limits.take_stream_slot(caller, context)
                if tracked and caller is not None:
                    call.entry = open_streams.open(caller.key_id)
                    call.entry.inside = True
                with call_gone_is_cancellation():  # a stream written with context.write
                    return await behavior(request, context)

        return run

    def _streaming(
        self, behavior: StreamBehavior, plan: _Plan, decode: Decode | None
    ) -> StreamBehavior:
        """Server streams written by an async generator. The wrapper writes each response
        itself (``context.write``) instead of yielding it for grpc to write: a write that fails
        because the client went away (while blocked by flow control, when a client stops
        reading) then surfaces here, where it becomes the cancellation it is
        (handlers.errors.call_gone_is_cancellation); failing in grpc's own loop, it would be
        logged as an ERROR with a traceback. The wrapper stays an async generator (yielding
        nothing), so interceptors that iterate server streams (OpenTelemetry's) still can."""
        limits = self._limits
        open_streams = self._open_streams
        edge = self

        async def run(request: Any, context: Ctx) -> AsyncIterator[Any]:
            async with _Call(edge, plan, True, context) as call:
                caller = await edge._begin(context, plan, trailing_id=False)
                if caller is not None:
                    call.slot = await limits.take_stream_slot(caller, context)
                    call.entry = open_streams.open(caller.key_id)
                entry = call.entry
                entry.inside = True
                if decode is not None:
                    request = await decode(request, context)
                async with aclosing(
                    cast(AsyncGenerator[Any, None], behavior(request, context))
                ) as responses:
                    async for response in responses:
                        entry.inside = False
                        with call_gone_is_cancellation():
                            await context.write(response)
                        if entry.revoked:
                            await abort_with(context, revoked_error())
                        entry.inside = True
            if False:  # an async generator that yields nothing: see the docstring
                yield None  # type: ignore[unreachable]

        return run


# Stands in for the registry entry of a stream that is not tracked (public methods).
_UNTRACKED = OpenStream("", None)


class _Call:
    """One call's bookkeeping, the same for both wrappers, which run the call inside it
    (``async with``): made when the call starts (binds the metrics, counts a ``stream`` as
    open), finished with its final code on the way out (the method's recorder gets its
    duration and code, the tenant's stream ``slot`` is released and the call's ``entry`` in
    the open-streams registry closed). A call cancelled because its key was revoked ends
    UNAUTHENTICATED (_end_revoked)."""

    __slots__ = ("_context", "_edge", "_plan", "_start", "_stream", "entry", "slot")

    def __init__(self, edge: Edge, plan: _Plan, stream: bool, context: Ctx) -> None:
        self._edge = edge
        self._plan = plan
        self._stream = stream
        self._context = context
        self.slot: str | None = None
        self.entry = _UNTRACKED
        metrics = edge._metrics
        metrics_module.bind(metrics)
        if stream:
            metrics.stream_opened(plan.method)
        self._start = perf_counter()

    async def __aenter__(self) -> _Call:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: object
    ) -> None:
        code = _UNKNOWN
        try:
            if kind is None:
                code = _final_code(self._context, _OK)
            elif issubclass(kind, asyncio.CancelledError):
                code = _CANCELLED
                if self.entry.revoked:
                    await _end_revoked(self._context)
            else:
                code = _final_code(self._context, _UNKNOWN)
        finally:
            self._finish(code)

    def _finish(self, code: grpc.StatusCode) -> None:
        edge = self._edge
        if self.entry is not _UNTRACKED:
            edge._open_streams.close(self.entry)
        if self.slot is not None:
            edge._limits.release(self.slot)
        if self._stream:
            edge._metrics.stream_closed(self._plan.method)
        self._plan.recorder.observe(code, perf_counter() - self._start)


async def _end_revoked(context: Ctx) -> None:
    """The call's task was cancelled because its key was revoked (server.revocation): take
    the cancellation back and end the call with UNAUTHENTICATED, unless the client has gone
    already (then the cancellation stands)."""
    if context.done():
        return
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    await abort_with(context, revoked_error())


class _RegisteringGenericHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A generic handler whose method handlers are prepared by the registrar."""

    def __init__(self, inner: grpc.GenericRpcHandler[Any, Any], registrar: EdgeRegistrar) -> None:
        self._inner = inner
        self._registrar = registrar

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self._inner.service(handler_call_details)
        return self._registrar.prepare(handler_call_details.method, handler)


class EdgeRegistrar:
    """Stands in for a grpc.aio.Server when services are added (the generated
    ``add_*Servicer_to_server`` functions, health, reflection): every method handler they
    register decodes its requests itself (server.decoding: undecodable bytes are
    INVALID_ARGUMENT) and runs behind the edge (none: ``edge`` None, for benchmarks). Pass it
    where those functions expect the server."""

    def __init__(self, server: grpc.aio.Server, edge: Edge | None) -> None:
        self._server = server
        self._edge = edge
        self._cache = HandlerCache()

    def prepare(self, method: str, handler: Any) -> Any:
        """The handler grpc is given for ``handler`` of ``method``; None stays None (an unknown
        method: UNIMPLEMENTED). Built once per method."""
        if handler is None:
            return None
        return self._cache.get(method, handler, lambda: self._prepare(method, handler))

    def _prepare(self, method: str, handler: Any) -> Any:
        if self._edge is None:
            return decode_in_handler(handler)
        return self._edge.wrap(method, handler)

    def add_generic_rpc_handlers(
        self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_RegisteringGenericHandler(handler, self) for handler in handlers)
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service_name,
            {
                name: self.prepare(f"/{service_name}/{name}", handler)
                for name, handler in method_handlers.items()
            },
        )
