"""Deadline budget, retry with backoff and status -> DownstreamError mapping for unary calls."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from domain.dispatch import DownstreamError

T = TypeVar("T")

# Codes that mean "the service looked at the request and said no": retrying cannot help.
REJECTED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
# Other codes the caller may try again later (the service is overloaded or raced).
RETRYABLE_ERROR_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one logical call is split into attempts."""

    attempt_timeout_s: float = 5.0
    max_attempts: int = 3
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 1.0

    def backoff(self, retry: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, capped."""
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * 2.0 ** min(retry, 30))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def _error(what: str, exc: grpc.aio.AioRpcError, attempts: int) -> DownstreamError:
    code = exc.code()
    details = exc.details() or code.name
    if code is grpc.StatusCode.UNAVAILABLE:
        return DownstreamError(
            "downstream_unavailable",
            f"{what} is unavailable after {attempts} attempt(s): {details}",
            retryable=True,
        )
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DownstreamError(
            "downstream_timeout", f"{what} did not answer in time: {details}", retryable=True
        )
    if code in REJECTED_CODES:
        return DownstreamError(
            "downstream_rejected",
            f"{what} rejected the request ({code.name}): {details}",
            retryable=False,
        )
    return DownstreamError(
        "downstream_error",
        f"{what} failed ({code.name}): {details}",
        retryable=code in RETRYABLE_ERROR_CODES,
    )


async def call_with_retries(
    attempt: Callable[[float], Awaitable[T]],
    *,
    what: str,
    policy: RetryPolicy,
    budget_s: float | None,
) -> T:
    """Run ``attempt(timeout_s)`` until it succeeds, retrying on UNAVAILABLE only.

    Each attempt gets min(attempt_timeout_s, time left of ``budget_s``); the whole call, backoff
    included, never outlives ``budget_s``. ``what`` names the service and method in messages.
    """
    deadline = None if budget_s is None else time.monotonic() + budget_s
    attempts = 0
    while True:
        timeout = policy.attempt_timeout_s
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DownstreamError(
                    "downstream_timeout",
                    f"{what}: the caller's deadline passed before an answer",
                    retryable=True,
                )
            timeout = min(timeout, left)
        attempts += 1
        try:
            return await attempt(timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.UNAVAILABLE or attempts >= policy.max_attempts:
                raise _error(what, exc, attempts) from exc
            pause = policy.backoff(attempts - 1)
            if deadline is not None and time.monotonic() + pause >= deadline:
                raise _error(what, exc, attempts) from exc
            await asyncio.sleep(pause)
