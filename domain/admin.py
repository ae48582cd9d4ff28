"""Operator reads for the admin API: any tenant's task by id, and a tenant's token usage."""

from __future__ import annotations

from dataclasses import dataclass

from domain.chat import require_job_id
from domain.errors import NotFound
from domain.ids import require_tenant_id
from domain.jobs import Job
from domain.ports.jobs import JobStore
from domain.ports.usage import UsageStore
from domain.usage import BudgetRules, UsageReader, UsageReport


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """A usage report with the tenant's budget state."""

    report: UsageReport
    daily_budget: int
    tokens_today: int


class AdminQueries:
    """Reads across tenants; only the admin service (admin role) uses it."""

    def __init__(self, jobs: JobStore, usage: UsageStore, budgets: BudgetRules) -> None:
        self._jobs = jobs
        self._usage = usage
        self._reader = UsageReader(usage)
        self._budgets = budgets

    async def get_task(self, tenant_id: str, job_id: str) -> Job:
        require_tenant_id(tenant_id)
        require_job_id(job_id)
        job = await self._jobs.get_job(tenant_id, job_id)
        if job is None:
            raise NotFound(f"task {job_id} not found for tenant {tenant_id}")
        return job

    async def internal_calls(self, job: Job) -> list[Job]:
        """The jobs of the internal calls made for ``job`` (domain.internal_calls) that are
        still recorded, oldest first (at most JobLimits.max_internal_calls)."""
        found = [await self._jobs.get_job(job.tenant_id, i) for i in job.internal_call_ids]
        return [child for child in found if child is not None]

    async def tenant_usage(self, tenant_id: str, start_date: str, end_date: str) -> TenantUsage:
        require_tenant_id(tenant_id)
        report = await self._reader.report(tenant_id, start_date, end_date)
        today = await self._usage.tokens_today(tenant_id)
        return TenantUsage(report, self._budgets.budget_for(tenant_id), today)
