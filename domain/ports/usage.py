"""Token usage as stores keep it: per tenant and UTC day, a day being its number since the Unix
epoch (the Redis scripts compute it from the Redis clock), with per-agent totals; and the usage
store that reads it (registry.redis_usage on Redis, registry.memory_usage in memory). Budgets and
reports over it live in domain.usage."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from domain.models import TokenUsage

DAY_MS = 86_400_000
_EPOCH = dt.date(1970, 1, 1)


def day_number(time_ms: int) -> int:
    """The UTC day (days since 1970-01-01) a Unix millisecond time falls on."""
    return time_ms // DAY_MS


def day_to_date(day: int) -> dt.date:
    return _EPOCH + dt.timedelta(days=day)


def date_to_day(date: dt.date) -> int:
    return (date - _EPOCH).days


@dataclass(frozen=True, slots=True)
class DayUsage:
    """One tenant's tokens of one UTC day: totals, and total tokens per agent."""

    day: int
    usage: TokenUsage = field(default_factory=TokenUsage)
    agents: Mapping[str, int] = field(default_factory=dict)
    # Completed jobs that reported usage that day.
    jobs: int = 0

    @property
    def date(self) -> dt.date:
        return day_to_date(self.day)


class UsageStore(Protocol):
    """Token usage per tenant and UTC day (days since the epoch), with per-agent totals. The
    job store adds to it atomically with each completed notice; this interface reads it."""

    async def usage_days(self, tenant_id: str, first_day: int, last_day: int) -> list[DayUsage]:
        """The days from ``first_day`` to ``last_day`` (inclusive) that have usage, oldest
        first."""
        ...

    async def tokens_today(self, tenant_id: str) -> int:
        """The tenant's total tokens of the current UTC day (by the backend's clock)."""
        ...
