"""Settings of the reference services, read from REF_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from reference.reporter import split_targets

T = TypeVar("T")

# The orchestrator's documented local demo service key (`make run` only); set
# REF_PUBLISH_API_KEY to a real service key anywhere else.
DEMO_SERVICE_KEY = "ao_demoservice_local-demo-service-key-0001"
DEFAULT_PUBLISH_METADATA: tuple[tuple[str, str], ...] = (
    ("authorization", f"Bearer {DEMO_SERVICE_KEY}"),
)

# The platform services these reference services stand in for (orchestrator.v1.Service values):
# the services a key they report with must speak for. `make run` mints its key with this list.
REFERENCE_SERVICES: tuple[str, ...] = (
    "query",
    "embedding",
    "conversation",
    "agent_management",
    "tool_registry",
    "agent_execution",
    "workflow_engine",
)


class ConfigError(ValueError):
    """An environment variable has a value that cannot be used."""


@dataclass(frozen=True, slots=True)
class ReferenceConfig:
    """What the reference services listen on, where they report and how jobs behave.

    Rates are fractions of jobs from 0 to 1, chosen deterministically from the job id.
    """

    listen_address: str = "[::]:50061"
    # One orchestrator, several replicas comma-separated, or a dns:/// name (round_robin).
    orchestrator_address: str = "localhost:50051"
    step_delay_s: float = 0.05
    deltas: int = 3
    failure_rate: float = 0.0
    silent_rate: float = 0.0
    embedding_dim: int = 8
    # Tenants whose demo agents (support-bot, tool-bot, research-flow) Agent Management seeds.
    demo_tenants: tuple[str, ...] = ("demo", "other")
    publish_metadata: tuple[tuple[str, str], ...] = DEFAULT_PUBLISH_METADATA
    log_level: str = "INFO"
    # Reporter reconnect backoff (seconds) and how long stop() may take to flush notices.
    reconnect_base_s: float = 0.1
    reconnect_cap_s: float = 2.0
    stop_timeout_s: float = 5.0

    def validate(self) -> None:
        try:
            split_targets(self.orchestrator_address)
        except ValueError as exc:
            raise ConfigError(f"orchestrator_address: {exc}") from None
        for name in ("failure_rate", "silent_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, got {value}")
        if self.deltas < 1:
            raise ConfigError(f"deltas must be at least 1, got {self.deltas}")
        if self.embedding_dim < 1:
            raise ConfigError(f"embedding_dim must be at least 1, got {self.embedding_dim}")
        if not all(self.demo_tenants):
            raise ConfigError("demo_tenants must not contain an empty tenant")
        if self.step_delay_s < 0:
            raise ConfigError(f"step_delay_s must not be negative, got {self.step_delay_s}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ReferenceConfig:
        """Read REF_* variables (unset ones keep their defaults) and validate."""
        env = os.environ if env is None else env
        default = cls()

        def parsed(name: str, fallback: T, parse: Callable[[str], T], expected: str) -> T:
            raw = env.get(name)
            try:
                return fallback if raw is None or raw == "" else parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{name}: expected {expected}, got {raw!r}") from exc

        def number(name: str, fallback: float) -> float:
            return parsed(name, fallback, float, "a number")

        def integer(name: str, fallback: int) -> int:
            return parsed(name, fallback, int, "an integer")

        api_key = env.get("REF_PUBLISH_API_KEY", "")
        metadata = (
            (("authorization", f"Bearer {api_key}"),) if api_key else DEFAULT_PUBLISH_METADATA
        )
        raw_tenants = env.get("REF_DEMO_TENANTS")
        tenants = (
            default.demo_tenants
            if raw_tenants is None
            else tuple(t.strip() for t in raw_tenants.split(",") if t.strip())
        )
        config = cls(
            listen_address=env.get("REF_LISTEN_ADDRESS") or default.listen_address,
            orchestrator_address=env.get("REF_ORCHESTRATOR_ADDRESS")
            or default.orchestrator_address,
            step_delay_s=number("REF_STEP_DELAY", default.step_delay_s),
            deltas=integer("REF_DELTAS", default.deltas),
            failure_rate=number("REF_FAILURE_RATE", default.failure_rate),
            silent_rate=number("REF_SILENT_RATE", default.silent_rate),
            embedding_dim=integer("REF_EMBEDDING_DIM", default.embedding_dim),
            demo_tenants=tenants,
            publish_metadata=metadata,
            log_level=env.get("REF_LOG_LEVEL") or default.log_level,
        )
        config.validate()
        return config
