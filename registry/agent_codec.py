"""What both agent caches share (registry.agent_cache_redis, registry.agent_cache_memory): the
lifetime of an invalidation generation, and the JSON form of a cached configuration."""

from __future__ import annotations

import json
from typing import Any

from domain.agents import AgentConfig, AgentKind, AgentLimits

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
