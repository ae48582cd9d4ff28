"""What both agent caches share (registry.agent_cache_redis, registry.agent_cache_memory): the
lifetime of an invalidation generation, and the JSON form of a cached configuration
(AgentConfig's own, as a job's agent snapshot is stored)."""

from __future__ import annotations

import json

from domain.agents import AgentConfig

# How long an agent's generation outlives its last invalidation. A lookup's generation must
# still be there when its put runs (a counter that expired would read 0 again and let a put
# that raced the invalidation through), so this is far longer than any fetch can take.
GENERATION_RETENTION_MS = 7 * 24 * 3600 * 1000


def config_to_json(config: AgentConfig) -> str:
    return json.dumps(config.to_json(), separators=(",", ":"))


def config_from_json(raw: str) -> AgentConfig | None:
    """The configuration ``config_to_json`` wrote; None for anything else (an entry written by
    another release reads as a miss and is fetched again)."""
    try:
        return AgentConfig.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
