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

    def rate_limit(self, tenant_id: str, key_id: str = "") -> str:
        """String with a GCRA theoretical arrival time (microseconds, Redis clock): the
        tenant's bucket, or with ``key_id`` the bucket of one of its API keys."""
        suffix = f":key:{key_id}" if key_id else ""
        return f"{self.tenant_tag(tenant_id)}:ratelimit{suffix}"

    def session(self, tenant_id: str, session_id: str) -> str:
        """Hash with the session's fields."""
        return f"{self.tenant_tag(tenant_id)}:session:{session_id}"

    def session_pending(self, tenant_id: str, session_id: str) -> str:
        """Set of the session's job ids in flight."""
        return f"{self.tenant_tag(tenant_id)}:session:{session_id}:pending"

    def session_index(self, tenant_id: str) -> str:
        """Sorted set (all scores 0) of the tenant's session ids; ids sort by creation time."""
        return f"{self.tenant_tag(tenant_id)}:sessions"
