"""domain.ports.platform.AgentCache on Redis: shared by every replica on the same Redis.

Per (tenant, agent), under the tenant's hash tag (registry.keys): a hash with the cached
configuration (``v`` its version, ``c`` the configuration as JSON) expiring after the TTL, and
the agent's invalidation generation, a counter. A lookup reads the configuration, and only when
there is none (a miss) the generation, before the caller asks Agent Management: a hit (every
chat of a plan) costs one HGET. A put is one script (registry/lua/agents/put.lua) that stores
only if the generation is still the one the lookup read and no newer version is cached (an
invalidation after that read advanced it, so a configuration fetched before the invalidation
is never stored after it); an invalidation deletes the configuration and
advances the generation in one MULTI. Nothing is kept in process memory, so once
``invalidate`` returns no replica reads the old configuration.
"""

from __future__ import annotations

from domain.agents import AgentConfig
from registry.agent_codec import GENERATION_RETENTION_MS, config_from_json, config_to_json
from registry.redis_client import RedisStore, as_str, redis_errors_as_unavailable


class RedisAgentCache(RedisStore):
    """domain.ports.platform.AgentCache on Redis (see the module's doc)."""

    SCRIPTS = "agents"

    async def lookup(self, tenant_id: str, agent_id: str) -> tuple[AgentConfig | None, int]:
        with redis_errors_as_unavailable():
            raw = await self._redis.hget(self._keys.agent_config(tenant_id, agent_id), "c")
            config = None if raw is None else config_from_json(as_str(raw))
            if config is not None and (config.tenant_id, config.agent_id) == (tenant_id, agent_id):
                return config, 0  # a hit: no put follows, the generation is not needed
            generation = await self._redis.get(self._keys.agent_generation(tenant_id, agent_id))
        return None, 0 if generation is None else int(as_str(generation))

    async def put(self, config: AgentConfig, ttl_ms: int, *, generation: int) -> None:
        keys = [
            self._keys.agent_config(config.tenant_id, config.agent_id),
            self._keys.agent_generation(config.tenant_id, config.agent_id),
        ]
        args = [str(generation), str(config.version), config_to_json(config), str(max(1, ttl_ms))]
        with redis_errors_as_unavailable():
            await self._scripts.run("put", keys=keys, args=args)

    async def invalidate(self, tenant_id: str, agent_id: str) -> None:
        generation_key = self._keys.agent_generation(tenant_id, agent_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._keys.agent_config(tenant_id, agent_id))
        pipe.incr(generation_key)
        pipe.pexpire(generation_key, GENERATION_RETENTION_MS)
        with redis_errors_as_unavailable():
            await pipe.execute()
