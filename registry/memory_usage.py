"""Token usage and the embedding cache in process memory: the embedded default's twins of
registry.redis_usage (single process only)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from domain.models import TokenUsage
from domain.ports.usage import DayUsage, day_number
from domain.usage import USAGE_RETENTION_MS
from registry.memory_sessions import wall_clock_ms


@dataclass(slots=True)
class _Day:
    usage: TokenUsage = field(default_factory=TokenUsage)
    agents: dict[str, int] = field(default_factory=dict)
    jobs: int = 0
    expires_ms: int = 0


class MemoryUsageStore:
    """domain.ports.usage.UsageStore in memory; MemoryJobStore calls ``add`` when it applies a
    completed notice (in the same step, so atomically)."""

    def __init__(self, *, clock: Callable[[], int] = wall_clock_ms) -> None:
        self._clock = clock
        self._days: dict[tuple[str, int], _Day] = {}

    def add(self, tenant_id: str, agent_id: str, usage: TokenUsage) -> None:
        now = self._clock()
        key = (tenant_id, day_number(now))
        day = self._days.get(key)
        if day is None:
            day = self._days[key] = _Day()
        day.usage = day.usage + usage
        day.agents[agent_id] = day.agents.get(agent_id, 0) + usage.total_tokens
        day.jobs += 1
        day.expires_ms = now + USAGE_RETENTION_MS

    def _get(self, tenant_id: str, day: int) -> _Day | None:
        found = self._days.get((tenant_id, day))
        if found is not None and self._clock() >= found.expires_ms:
            del self._days[(tenant_id, day)]
            return None
        return found

    async def usage_days(self, tenant_id: str, first_day: int, last_day: int) -> list[DayUsage]:
        days: list[DayUsage] = []
        for number in range(first_day, last_day + 1):
            day = self._get(tenant_id, number)
            if day is not None:
                days.append(DayUsage(number, day.usage, dict(day.agents), day.jobs))
        return days

    async def tokens_today(self, tenant_id: str) -> int:
        day = self._get(tenant_id, day_number(self._clock()))
        return 0 if day is None else day.usage.total_tokens


class MemoryEmbeddingCache:
    """domain.ports.embedding_cache.EmbeddingCache in a dict with expiry times."""

    def __init__(self, *, clock: Callable[[], int] = wall_clock_ms, max_entries: int = 100_000):
        self._clock = clock
        self._max_entries = max_entries
        self._entries: dict[tuple[str, str], tuple[str, int]] = {}

    async def get_result(self, tenant_id: str, key: str) -> str | None:
        entry = self._entries.get((tenant_id, key))
        if entry is None:
            return None
        if self._clock() >= entry[1]:
            del self._entries[(tenant_id, key)]
            return None
        return entry[0]

    async def put_result(self, tenant_id: str, key: str, result_json: str, ttl_ms: int) -> None:
        if len(self._entries) >= self._max_entries:
            now = self._clock()
            for stale in [k for k, (_, expires) in self._entries.items() if expires <= now]:
                del self._entries[stale]
            while len(self._entries) >= self._max_entries:  # oldest inserted first
                del self._entries[next(iter(self._entries))]
        self._entries[(tenant_id, key)] = (result_json, self._clock() + max(1, ttl_ms))
