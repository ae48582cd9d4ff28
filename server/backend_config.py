"""The storage backend's configuration (registry.backends.RegistryConfig) from the server
settings: one mapping for every process that opens the registry (servers, ``orchestrator
worker``, test servers)."""

from __future__ import annotations

from registry.backends import RegistryConfig
from server.config import Settings


def registry_config(settings: Settings) -> RegistryConfig:
    return RegistryConfig(
        redis_url=settings.redis_url,
        key_prefix=settings.redis_key_prefix,
        session_retention_ms=int(settings.session_retention * 1000),
        socket_timeout_s=settings.redis_socket_timeout,
        connect_timeout_s=settings.redis_connect_timeout,
        max_connections=settings.redis_max_connections,
        event_log_max_events=settings.event_log_max_events,
        event_log_ttl_ms=int(settings.event_log_ttl * 1000),
        batch_retention_ms=int(settings.batch_retention * 1000),
    )
