"""The synchronous facade: ``Client`` runs an ``AsyncClient`` on an event loop in a private
thread and turns its coroutines into calls and its async iterators into iterators."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from aorkestra import events as ev
from aorkestra._proto.orchestrator.admin.v1 import admin_pb2
from aorkestra._proto.orchestrator.v1 import batch_pb2, session_pb2
from aorkestra._transport import OnTruncated
from aorkestra.client import Admin, AsyncClient, Batches, BatchProgress, Chat, Keys, Sessions

T = TypeVar("T")
A = TypeVar("A")


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


class SyncSessions(_Sync[Sessions]):
    def create(
        self,
        agent_id: str,
        *,
        user_id: str = "",
        metadata: Mapping[str, str] | None = None,
        ttl: float | timedelta | None = None,
    ) -> session_pb2.Session:
        return self._loop.run(self._a.create(agent_id, user_id=user_id, metadata=metadata, ttl=ttl))

    def get(self, session_id: str) -> session_pb2.Session:
        return self._loop.run(self._a.get(session_id))

    def list(self, **options: Any) -> session_pb2.ListSessionsResponse:
        return self._loop.run(self._a.list(**options))

    def close(self, session_id: str) -> session_pb2.Session:
        return self._loop.run(self._a.close(session_id))

    def follow(
        self, session_id: str, *, after: int = 0, on_truncated: OnTruncated = "raise"
    ) -> Generator[ev.Event, None, None]:
        return self._loop.iterate(
            self._a.follow(session_id, after=after, on_truncated=on_truncated)
        )


class SyncChat(_Sync[Chat]):
    def send(
        self, session_id: str, content: str, **options: Any
    ) -> Generator[ev.Event, None, None]:
        return self._loop.iterate(self._a.send(session_id, content, **options))

    def reply(self, session_id: str, content: str, **options: Any) -> str:
        return self._loop.run(self._a.reply(session_id, content, **options))

    def cancel(self, session_id: str, job_id: str) -> ev.Event:
        return self._loop.run(self._a.cancel(session_id, job_id))


class SyncBatches(_Sync[Batches]):
    def submit(
        self, items: Iterable[Mapping[str, Any] | batch_pb2.BatchItem], **options: Any
    ) -> batch_pb2.Batch:
        return self._loop.run(self._a.submit(list(items), **options))

    def submit_jsonl(self, path: str | Path, **options: Any) -> batch_pb2.Batch:
        return self._loop.run(self._a.submit_jsonl(path, **options))

    def get(self, batch_id: str) -> batch_pb2.Batch:
        return self._loop.run(self._a.get(batch_id))

    def cancel(self, batch_id: str) -> batch_pb2.Batch:
        return self._loop.run(self._a.cancel(batch_id))

    def wait(
        self,
        batch_id: str,
        *,
        progress: Callable[[BatchProgress], None] | None = None,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
    ) -> batch_pb2.Batch:
        return self._loop.run(
            self._a.wait(batch_id, progress=progress, poll_s=poll_s, timeout_s=timeout_s)
        )

    def results(
        self, batch_id: str, *, after: int = 0
    ) -> Generator[batch_pb2.BatchItemResult, None, None]:
        return self._loop.iterate(self._a.results(batch_id, after=after))


class SyncKeys(_Sync[Keys]):
    def create(
        self,
        tenant_id: str,
        role: Literal["client", "service", "admin"],
        description: str = "",
        *,
        services: Iterable[str] = (),
    ) -> admin_pb2.CreateApiKeyResponse:
        return self._loop.run(self._a.create(tenant_id, role, description, services=services))

    def list(self, tenant_id: str = "", **options: Any) -> admin_pb2.ListApiKeysResponse:
        return self._loop.run(self._a.list(tenant_id, **options))

    def revoke(self, key_id: str) -> admin_pb2.ApiKey:
        return self._loop.run(self._a.revoke(key_id))


class SyncAdmin(_Sync[Admin]):
    def task(self, tenant_id: str, job_id: str) -> admin_pb2.Task:
        return self._loop.run(self._a.task(tenant_id, job_id))

    def usage(self, tenant_id: str, **options: Any) -> admin_pb2.GetTenantUsageResponse:
        return self._loop.run(self._a.usage(tenant_id, **options))


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
