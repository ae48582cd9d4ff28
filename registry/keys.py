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

    def api_key(self, key_id: str) -> str:
        """Hash with one API key's record (tenant, role, secret hash, times). Looked up by key
        id alone, so it carries its own hash tag rather than the tenant's."""
        return f"{self.prefix}:apikey:{{k:{key_id}}}"

    def api_key_index(self, tenant_id: str) -> str:
        """Sorted set (all scores 0) of the tenant's key ids, for listing."""
        return f"{self.tenant_tag(tenant_id)}:apikeys"
