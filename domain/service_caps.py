"""Limits toward the services: per tenant, a cap on jobs in flight per service and a cap on
tokens per minute, shared by every replica.

Both are checked and counted inside the job store's start path, in the same atomic step that
records a job as started (domain.job_machine.start and .activate; on Redis the start and
activate scripts): a job in flight is one that has been handed, or is about to be handed, to
its service (PENDING or RUNNING); a QUEUED job is not in flight until its turn comes. A job
leaves the count when its service completed it (FINISHING, while the orchestrator appends the
history, counts no more), when it ends (any final state) or when its record expires.

Tokens per minute: the total tokens charged to the tenant (where usage is charged: a completed
notice, domain.job_machine.apply_notice / jobs/notice.lua) within the current minute of the
store's clock (a fixed window: minute = now // 60000). A new job starts only while that total
is below the tenant's limit; work in flight may still push the minute's total past it (the
limit bounds starting work, not tokens in flight, as the daily budget does).

Over a limit an interactive SendMessage is refused RESOURCE_EXHAUSTED with RetryInfo and a
QuotaFailure naming the limit (``in_flight:<tenant>:<service>`` or
``tokens_per_minute:<tenant>``); queued messages and batch items wait in their work queue
(given back for a later delivery that does not count as one) until the tenant is under it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from domain.errors import ResourceExhausted
from domain.ids import tenant_entries
from domain.models import Service

MINUTE_MS = 60_000
# Bounds of the settings (server.config): a cap above these is a configuration mistake.
MAX_IN_FLIGHT_CAP = 1_000_000
MAX_TOKENS_PER_MINUTE = 1_000_000_000


def parse_cap_overrides(raw: str, what: str, maximum: int) -> dict[str, int]:
    """``tenantA=10,tenantB=0`` -> {tenant: cap}; 0 means unlimited."""
    caps: dict[str, int] = {}
    for tenant, value, _ in tenant_entries(raw, f"tenant={what}"):
        try:
            cap = int(value.strip())
        except ValueError:
            raise ValueError(f"{what} of {tenant} must be a whole number") from None
        if not 0 <= cap <= maximum:
            raise ValueError(f"{what} of {tenant} must be from 0 to {maximum}")
        caps[tenant] = cap
    return caps


@dataclass(frozen=True, slots=True)
class ServiceCaps:
    """The limits: defaults for every tenant and per-tenant overrides; 0 means unlimited."""

    # Jobs of one tenant in flight per service (each service counted on its own).
    in_flight: int = 0
    in_flight_overrides: Mapping[str, int] = field(default_factory=dict)
    # Tokens one tenant may be charged per minute before new work waits.
    tokens_per_minute: int = 0
    tokens_per_minute_overrides: Mapping[str, int] = field(default_factory=dict)
    # What RetryInfo says (and how long a queued item waits) over the in-flight cap.
    retry_after_ms: int = 1_000

    def in_flight_for(self, tenant_id: str) -> int:
        return self.in_flight_overrides.get(tenant_id, self.in_flight)

    def tokens_per_minute_for(self, tenant_id: str) -> int:
        return self.tokens_per_minute_overrides.get(tenant_id, self.tokens_per_minute)


NO_CAPS = ServiceCaps()


class LimitKind(enum.StrEnum):
    IN_FLIGHT = "in_flight"
    TOKENS_PER_MINUTE = "tokens_per_minute"


@dataclass(frozen=True, slots=True)
class LimitReached:
    """A job was not started: its tenant is at a limit. ``retry_after_ms``: when trying again
    may succeed (the next minute for tokens per minute)."""

    limit: LimitKind
    service: Service
    cap: int
    retry_after_ms: int

    def error(self, tenant_id: str) -> ResourceExhausted:
        """The refusal of an interactive request (RESOURCE_EXHAUSTED, RetryInfo, QuotaFailure)."""
        retry_after_s = self.retry_after_ms / 1000
        if self.limit is LimitKind.IN_FLIGHT:
            return ResourceExhausted(
                f"tenant {tenant_id} has {self.cap} jobs in flight at {self.service.value}, its "
                f"cap; retry after {retry_after_s:g}s",
                retry_after_s=retry_after_s,
                quota_subject=f"in_flight:{tenant_id}:{self.service.value}",
                quota_description=f"at most {self.cap} jobs in flight per service",
            )
        return ResourceExhausted(
            f"tenant {tenant_id} used its {self.cap} tokens of this minute; retry after "
            f"{retry_after_s:g}s",
            retry_after_s=retry_after_s,
            quota_subject=f"tokens_per_minute:{tenant_id}",
            quota_description=f"at most {self.cap} tokens per minute",
        )


class OverLimit(ResourceExhausted):
    """A job could not start because its tenant is at a limit toward its service (the work
    queue handlers give their item back for later instead of failing it)."""

    def __init__(self, reached: LimitReached, tenant_id: str) -> None:
        error = reached.error(tenant_id)
        super().__init__(
            error.message,
            retry_after_s=error.retry_after_s,
            quota_subject=error.quota_subject,
            quota_description=error.quota_description,
        )
        self.reached = reached


def check(
    caps: ServiceCaps,
    tenant_id: str,
    service: Service,
    *,
    in_flight: int,
    minute_tokens: int,
    now_ms: int,
) -> LimitReached | None:
    """Whether a job of ``tenant_id`` for ``service`` may start now, with ``in_flight`` of
    the tenant's jobs at that service and ``minute_tokens`` charged this minute (the Lua
    scripts make the same check: registry/lua/prelude/jobs.lua ``over_limit``)."""
    cap = caps.in_flight_for(tenant_id)
    if cap > 0 and in_flight >= cap:
        return LimitReached(LimitKind.IN_FLIGHT, service, cap, caps.retry_after_ms)
    tpm = caps.tokens_per_minute_for(tenant_id)
    if tpm > 0 and minute_tokens >= tpm:
        return LimitReached(
            LimitKind.TOKENS_PER_MINUTE, service, tpm, MINUTE_MS - now_ms % MINUTE_MS
        )
    return None
