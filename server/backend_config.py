"""The storage backend's configuration (registry.backend.BackendConfig) from the server
settings: one mapping for every process that opens the backend (servers, ``orchestrator
worker``, test servers)."""

from __future__ import annotations

from registry.backend import BackendConfig
from server.config import Settings


def backend_config(settings: Settings) -> BackendConfig:
    return BackendConfig(
        redis_url=settings.redis_url,
        key_prefix=settings.redis_key_prefix,
        session_retention_ms=int(settings.session_retention * 1000),
        socket_timeout_s=settings.redis_socket_timeout,
        connect_timeout_s=settings.redis_connect_timeout,
        max_connections=settings.redis_max_connections,
        event_log_max_events=settings.event_log_max_events,
        event_log_ttl_ms=int(settings.event_log_ttl * 1000),
        batch_retention_ms=int(settings.batch_retention * 1000),
        queue_shards=settings.queue_shards or None,
        event_heartbeat_interval_s=settings.event_heartbeat_interval,
        event_heartbeat_timeout_s=settings.event_heartbeat_timeout,
        event_pubsub_legacy=settings.event_pubsub_legacy,
    )
