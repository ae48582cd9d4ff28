"""domain.ports.platform.AgentCache in process memory, for the single-process embedded mode:
the same rules as the Redis cache (registry.agent_cache_redis), in dicts. Every method runs
without awaiting, so each is atomic."""

from __future__ import annotations

from collections.abc import Callable

from domain.agents import AgentConfig
from registry.agent_codec import GENERATION_RETENTION_MS
from registry.memory_sessions import wall_clock_ms

_Key = tuple[str, str]


class MemoryAgentCache:
    """Configurations with expiry times and per-agent invalidation generations (each kept
    ``GENERATION_RETENTION_MS`` after its last invalidation, as on Redis). At most
    ``max_entries`` configurations: past that, expired ones go first, then the oldest."""

    def __init__(
        self, *, clock: Callable[[], int] = wall_clock_ms, max_entries: int = 100_000
    ) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._configs: dict[_Key, tuple[AgentConfig, int]] = {}
        # Generation and when it may be forgotten.
        self._generations: dict[_Key, tuple[int, int]] = {}

    def _generation(self, key: _Key, now: int) -> int:
        entry = self._generations.get(key)
        if entry is None:
            return 0
        if now >= entry[1]:
            del self._generations[key]
            return 0
        return entry[0]

    async def lookup(self, tenant_id: str, agent_id: str) -> tuple[AgentConfig | None, int]:
        key = (tenant_id, agent_id)
        now = self._clock()
        entry = self._configs.get(key)
        if entry is not None and now >= entry[1]:
            del self._configs[key]
            entry = None
        if entry is not None:
            return entry[0], 0  # a hit: no put follows (as on Redis)
        return None, self._generation(key, now)

    async def put(self, config: AgentConfig, ttl_ms: int, *, generation: int) -> None:
        key = (config.tenant_id, config.agent_id)
        now = self._clock()
        if self._generation(key, now) != generation:
            return
        cached = self._configs.get(key)
        if cached is not None and now < cached[1] and cached[0].version > config.version:
            return
        self._configs.pop(key, None)
        self._make_room(now)
        self._configs[key] = (config, now + max(1, ttl_ms))

    async def invalidate(self, tenant_id: str, agent_id: str) -> None:
        key = (tenant_id, agent_id)
        now = self._clock()
        self._configs.pop(key, None)
        self._generations[key] = (self._generation(key, now) + 1, now + GENERATION_RETENTION_MS)
        if len(self._generations) > self._max_entries:
            self._generations = {k: g for k, g in self._generations.items() if now < g[1]}

    def _make_room(self, now: int) -> None:
        if len(self._configs) < self._max_entries:
            return
        for stale in [k for k, (_, expires) in self._configs.items() if expires <= now]:
            del self._configs[stale]
        while len(self._configs) >= self._max_entries:  # oldest inserted first
            del self._configs[next(iter(self._configs))]
