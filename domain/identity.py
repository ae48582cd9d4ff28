"""Who is calling: the identity the edge establishes for each RPC (server.auth).

Handlers read it from the call's context (handlers.request_context.current_caller) and pass the
tenant explicitly to the domain services.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from domain.models import Service


class Role(enum.StrEnum):
    """What a caller may do: clients use Chat/Session/Batch, services publish task updates,
    admins use the internal APIs."""

    CLIENT = "client"
    SERVICE = "service"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller of the current RPC: its tenant, role and the API key it
    authenticated with (its public id, never the secret; empty for test callers).

    ``services`` are the downstream services a service key speaks for; empty on a legacy
    service key, which speaks for all of them."""

    tenant_id: str
    role: Role
    key_id: str = ""
    services: frozenset[Service] = frozenset()

    def speaks_for(self, service: Service) -> bool:
        """Whether this caller may report on (and call the internal API for) jobs of
        ``service``: a service key that lists it, or a legacy service key with no list."""
        return self.role is Role.SERVICE and (not self.services or service in self.services)
