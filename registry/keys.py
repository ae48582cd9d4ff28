"""The Redis key layout, in one place.

Every key of a tenant carries the hash tag ``{t:<tenant>}``, so all of a tenant's keys live in
one Redis Cluster slot and multi-key scripts over them stay atomic on a cluster. Tenant ids are
validated (domain.ids) to contain no braces.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Builds key names under a configurable prefix."""

    prefix: str = "ao"

    def tenant_tag(self, tenant_id: str) -> str:
        return f"{self.prefix}:{{t:{tenant_id}}}"

    def session(self, tenant_id: str, session_id: str) -> str:
        """Hash with the session's fields."""
        return f"{self.tenant_tag(tenant_id)}:session:{session_id}"

    def session_pending(self, tenant_id: str, session_id: str) -> str:
        """Set of the session's job ids in flight."""
        return f"{self.tenant_tag(tenant_id)}:session:{session_id}:pending"

    def session_index(self, tenant_id: str) -> str:
        """Sorted set (all scores 0) of the tenant's session ids; ids sort by creation time."""
        return f"{self.tenant_tag(tenant_id)}:sessions"

    def work_queue(self, queue: str) -> str:
        """Prefix of every key of a work queue (registry.redis_queue_scripts lists them). The
        hash tag is the queue, not a tenant: the per-level tenant rotation and the scripts that
        serve several tenants in one call need every key of the queue in one slot."""
        return f"{self.prefix}:{{q:{queue}}}:"

    def work_item(self, queue: str, item_id: str) -> str:
        """Hash with a work item's metadata, payload, state and result."""
        return f"{self.work_queue(queue)}i:{item_id}"

    def work_stream(self, queue: str, priority: str, tenant_id: str) -> str:
        """Stream of one tenant's ready items at one priority level."""
        return f"{self.work_queue(queue)}s:{priority}:{tenant_id}"
