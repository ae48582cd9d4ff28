"""Who is calling: the identity the edge establishes for each RPC (server.auth).

Handlers read it from the call's context (handlers.request_context.current_caller) and pass the
tenant explicitly to the domain services.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    """What a caller may do: clients use Chat/Session/Batch, services publish task updates,
    admins use the internal APIs."""

    CLIENT = "client"
    SERVICE = "service"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller of the current RPC: its tenant, role and the API key it
    authenticated with (its public id, never the secret; empty for test callers)."""

    tenant_id: str
    role: Role
    key_id: str = ""
