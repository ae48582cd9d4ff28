"""domain.ports.platform.AgentCache on Redis: shared by every replica on the same Redis.

Per (tenant, agent), under the tenant's hash tag (registry.keys): a hash with the cached
configuration (``v`` its version, ``c`` the configuration as JSON) expiring after the TTL, and
the agent's invalidation generation, a counter. A lookup reads both in one MULTI; a put is one
script (registry/lua/agents/put.lua) that stores only if the generation is still the one the
lookup read and no newer version is cached; an invalidation deletes the configuration and
advances the generation in one MULTI. Nothing is kept in process memory, so once
``invalidate`` returns no replica reads the old configuration.
"""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from domain.agents import AgentConfig, AgentKind, AgentLimits
from registry.keys import KeySpace
from registry.lua_scripts import ScriptRunner, lua_script
from registry.redis_client import as_str, redis_errors_as_unavailable

# How long an agent's generation outlives its last invalidation. A lookup's generation must
# still be there when its put runs (a counter that expired would read 0 again and let a put
# that raced the invalidation through), so this is far longer than any fetch can take.
GENERATION_RETENTION_MS = 7 * 24 * 3600 * 1000


def config_to_json(config: AgentConfig) -> str:
    limits = config.limits
    return json.dumps(
        {
            "tenant_id": config.tenant_id,
            "agent_id": config.agent_id,
            "kind": config.kind.value,
            "version": config.version,
            "model": config.model,
            "system_prompt": config.system_prompt,
            "tool_names": list(config.tool_names),
            "workflow_id": config.workflow_id,
            "limits": [limits.max_history_turns, limits.max_history_tokens, limits.max_tool_calls],
        },
        separators=(",", ":"),
    )


def config_from_json(raw: str) -> AgentConfig | None:
    """The configuration ``config_to_json`` wrote; None for anything else (an entry written by
    another release reads as a miss and is fetched again)."""
    try:
        data: Any = json.loads(raw)
        turns, tokens, tool_calls = data["limits"]
        return AgentConfig(
            tenant_id=str(data["tenant_id"]),
            agent_id=str(data["agent_id"]),
            kind=AgentKind(data["kind"]),
            version=int(data["version"]),
            model=str(data["model"]),
            system_prompt=str(data["system_prompt"]),
            tool_names=tuple(str(name) for name in data["tool_names"]),
            workflow_id=str(data["workflow_id"]),
            limits=AgentLimits(int(turns), int(tokens), int(tool_calls)),
        )
    except (ValueError, KeyError, TypeError):
        return None


class RedisAgentCache:
    """domain.ports.platform.AgentCache on Redis (see the module's doc)."""

    def __init__(self, redis: Redis, keys: KeySpace) -> None:
        self._redis = redis
        self._keys = keys
        self._scripts = ScriptRunner(redis)
        self._put = lua_script("agents/put")

    async def lookup(self, tenant_id: str, agent_id: str) -> tuple[AgentConfig | None, int]:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hget(self._keys.agent_config(tenant_id, agent_id), "c")
        pipe.get(self._keys.agent_generation(tenant_id, agent_id))
        with redis_errors_as_unavailable():
            raw, generation = await pipe.execute()
        config = None if raw is None else config_from_json(as_str(raw))
        if config is not None and (config.tenant_id, config.agent_id) != (tenant_id, agent_id):
            config = None
        return config, 0 if generation is None else int(as_str(generation))

    async def put(self, config: AgentConfig, ttl_ms: int, *, generation: int) -> None:
        keys = [
            self._keys.agent_config(config.tenant_id, config.agent_id),
            self._keys.agent_generation(config.tenant_id, config.agent_id),
        ]
        args = [str(generation), str(config.version), config_to_json(config), str(max(1, ttl_ms))]
        with redis_errors_as_unavailable():
            await self._scripts.run(self._put, keys=keys, args=args)

    async def invalidate(self, tenant_id: str, agent_id: str) -> None:
        generation_key = self._keys.agent_generation(tenant_id, agent_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._keys.agent_config(tenant_id, agent_id))
        pipe.incr(generation_key)
        pipe.pexpire(generation_key, GENERATION_RETENTION_MS)
        with redis_errors_as_unavailable():
            await pipe.execute()
