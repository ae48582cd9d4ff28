"""The synchronous facade: ``Client`` runs an ``AsyncClient`` on an event loop in a private
thread and turns its coroutines into calls and its async iterators into iterators."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable, Mapping
from pathlib import Path
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from aorkestra._proto.orchestrator.v1 import batch_pb2
from aorkestra.client import Admin, AsyncClient, Batches, Chat, Keys, Sessions

T = TypeVar("T")
A = TypeVar("A")
P = ParamSpec("P")


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="aorkestra", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.loop.is_closed() or not self._thread.is_alive():
            coro.close()
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def iterate(self, source: AsyncIterator[T]) -> Generator[T, None, None]:
        """Pulls ``source`` one item at a time; closing the iterator closes the source."""

        async def step() -> tuple[bool, T | None]:
            try:
                return True, await source.__anext__()
            except StopAsyncIteration:
                return False, None

        try:
            while True:
                more, item = self.run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None and not self.loop.is_closed() and self._thread.is_alive():
                self.run(aclose())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class _Sync(Generic[A]):
    def __init__(self, loop: _Loop, target: A) -> None:
        self._loop = loop
        self._a = target


def _blocking(
    method: Callable[Concatenate[A, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[_Sync[A], P], T]:
    """The synchronous form of an async API method: the same parameters, run on the loop."""

    @functools.wraps(method)
    def call(self: _Sync[A], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._loop.run(method(self._a, *args, **kwargs))

    return call


def _iterating(
    method: Callable[Concatenate[A, P], AsyncIterator[T]],
) -> Callable[Concatenate[_Sync[A], P], Generator[T, None, None]]:
    """The synchronous form of an async API stream: the same parameters, an iterator."""

    @functools.wraps(method)
    def call(self: _Sync[A], /, *args: P.args, **kwargs: P.kwargs) -> Generator[T, None, None]:
        return self._loop.iterate(method(self._a, *args, **kwargs))

    return call


class SyncSessions(_Sync[Sessions]):
    create = _blocking(Sessions.create)
    get = _blocking(Sessions.get)
    list = _blocking(Sessions.list)
    close = _blocking(Sessions.close)
    follow = _iterating(Sessions.follow)


# Methods that take ``**options`` are written out: mypy cannot give _blocking their
# parameters (``self`` could be one of the options).


class SyncChat(_Sync[Chat]):
    send = _iterating(Chat.send)
    cancel = _blocking(Chat.cancel)

    def reply(self, session_id: str, content: str, **options: Any) -> str:
        return self._loop.run(self._a.reply(session_id, content, **options))


class SyncBatches(_Sync[Batches]):
    def submit(
        self, items: Iterable[Mapping[str, Any] | batch_pb2.BatchItem], **options: Any
    ) -> batch_pb2.Batch:
        # The items are read here, in the caller's thread, not on the client's loop.
        return self._loop.run(self._a.submit(list(items), **options))

    def submit_jsonl(self, path: str | Path, **options: Any) -> batch_pb2.Batch:
        return self._loop.run(self._a.submit_jsonl(path, **options))

    get = _blocking(Batches.get)
    cancel = _blocking(Batches.cancel)
    wait = _blocking(Batches.wait)
    results = _iterating(Batches.results)


class SyncKeys(_Sync[Keys]):
    create = _blocking(Keys.create)
    list = _blocking(Keys.list)
    revoke = _blocking(Keys.revoke)


class SyncAdmin(_Sync[Admin]):
    task = _blocking(Admin.task)
    usage = _blocking(Admin.usage)


class Client:
    """The synchronous client; takes AsyncClient's arguments. Use as ``with Client(...)``."""

    def __init__(self, address: str | None = None, **options: Any) -> None:
        self._loop = _Loop()

        async def build() -> AsyncClient:  # the channel belongs to the private loop
            return AsyncClient(address, **options)

        try:
            self._async = self._loop.run(build())
        except BaseException:
            self._loop.stop()
            raise
        self.config = self._async.config
        self.sessions = SyncSessions(self._loop, self._async.sessions)
        self.chat = SyncChat(self._loop, self._async.chat)
        self.batches = SyncBatches(self._loop, self._async.batches)
        self.keys = SyncKeys(self._loop, self._async.keys)
        self.admin = SyncAdmin(self._loop, self._async.admin)

    def health(self, service: str = "") -> str:
        return self._loop.run(self._async.health(service))

    def close(self) -> None:
        self._loop.run(self._async.close())
        self._loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
