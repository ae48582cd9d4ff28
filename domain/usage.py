"""Token usage per tenant, day (UTC) and agent, and the daily token budgets it is checked against.

Usage is recorded by the job store in the same atomic step that applies a completed notice
(domain.ports.jobs.JobStore.apply_notice), so a notice counts exactly once. Days are UTC calendar
days, identified in storage by their number since the Unix epoch (domain.ports.usage numbers
them and converts them to dates).

Budgets: a tenant whose total tokens of today (UTC) reached its daily budget gets
RESOURCE_EXHAUSTED (with a google.rpc.QuotaFailure naming ``tokens:<tenant>``) when it asks for
new work. The check happens before the work is recorded or dispatched; work already in flight
may still finish and push the day's total past the budget (the budget bounds starting work,
not tokens in flight).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field

from domain.errors import InvalidArgument, ResourceExhausted
from domain.ids import is_tenant_id, tenant_entries
from domain.models import TokenUsage
from domain.ports.usage import DAY_MS, DayUsage, UsageStore, date_to_day

# How long a day's usage record is kept in the registry.
USAGE_RETENTION_DAYS = 400
USAGE_RETENTION_MS = USAGE_RETENTION_DAYS * DAY_MS
# Longest date range GetTenantUsage answers in one call.
MAX_USAGE_RANGE_DAYS = 400


@dataclass(frozen=True, slots=True)
class UsageReport:
    """A tenant's usage over a date range: one entry per day with usage, and the totals."""

    tenant_id: str
    first: dt.date
    last: dt.date
    days: list[DayUsage]
    total: TokenUsage
    agents: Mapping[str, int]
    jobs: int


def parse_budget_overrides(raw: str) -> dict[str, int]:
    """``tenantA=100000,tenantB=0`` -> {tenant: daily token budget}; 0 means unlimited."""
    budgets: dict[str, int] = {}
    for tenant, value, _ in tenant_entries(raw, "tenant=tokens"):
        try:
            budget = int(value.strip())
        except ValueError:
            raise ValueError(f"budget of {tenant} must be a whole number of tokens") from None
        if budget < 0:
            raise ValueError(f"budget of {tenant} must not be negative")
        budgets[tenant] = budget
    return budgets


@dataclass(frozen=True, slots=True)
class BudgetRules:
    """Daily token budgets: ``default`` for every tenant, ``overrides`` per tenant; 0 means
    unlimited."""

    default: int = 0
    overrides: Mapping[str, int] = field(default_factory=dict)

    def budget_for(self, tenant_id: str) -> int:
        return self.overrides.get(tenant_id, self.default)


class TokenBudget:
    """Refuses new work for tenants whose tokens of today reached their budget. Every path
    that starts work (SendMessage today, batches later) calls ``check`` first."""

    def __init__(self, store: UsageStore, rules: BudgetRules) -> None:
        self._store = store
        self._rules = rules

    def applies(self, tenant_id: str) -> bool:
        """Whether the tenant has a budget (``check`` reads its usage only then)."""
        return self._rules.budget_for(tenant_id) > 0

    async def check(self, tenant_id: str) -> None:
        budget = self._rules.budget_for(tenant_id)
        if budget <= 0:
            return
        used = await self._store.tokens_today(tenant_id)
        if used >= budget:
            raise ResourceExhausted(
                f"tenant {tenant_id} used {used} tokens today (UTC), its daily budget is "
                f"{budget}; new work is refused until the next UTC day",
                quota_subject=f"tokens:{tenant_id}",
                quota_description=f"at most {budget} tokens per UTC day",
            )


def parse_date(value: str, field_name: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise InvalidArgument.field(field_name, "must be a date as YYYY-MM-DD") from None


class UsageReader:
    """Reads usage for the admin API."""

    def __init__(self, store: UsageStore) -> None:
        self._store = store

    async def report(self, tenant_id: str, start: str, end: str) -> UsageReport:
        """Usage of ``tenant_id`` from ``start`` to ``end`` (YYYY-MM-DD, inclusive, UTC);
        either may be empty: ``end`` defaults to today, ``start`` to ``end``."""
        if not tenant_id:
            raise InvalidArgument.field("tenant_id", "is required")
        if not is_tenant_id(tenant_id):
            raise InvalidArgument.field("tenant_id", "is not a valid tenant id")
        last = parse_date(end, "end_date") if end else dt.datetime.now(dt.UTC).date()
        first = parse_date(start, "start_date") if start else last
        if first > last:
            raise InvalidArgument.field("start_date", "must not be after end_date")
        if (last - first).days + 1 > MAX_USAGE_RANGE_DAYS:
            raise InvalidArgument.field(
                "start_date", f"the range must be at most {MAX_USAGE_RANGE_DAYS} days"
            )
        days = await self._store.usage_days(tenant_id, date_to_day(first), date_to_day(last))
        total = TokenUsage()
        agents: dict[str, int] = {}
        jobs = 0
        for day in days:
            total = total + day.usage
            jobs += day.jobs
            for agent, tokens in day.agents.items():
                agents[agent] = agents.get(agent, 0) + tokens
        return UsageReport(tenant_id, first, last, days, total, agents, jobs)
