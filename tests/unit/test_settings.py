"""Settings come from environment variables, typed and validated."""

from __future__ import annotations

import pytest

from domain.models import Service
from server.config import Settings, SettingsError
from server.services import downstream_config


def test_defaults_serve_on_50051_with_the_memory_registry() -> None:
    settings = Settings.from_env({})
    assert settings.listen_address.endswith(":50051")
    assert settings.redis_url is None


def test_values_are_parsed_by_type() -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://127.0.0.1:7000/1",
            "ORCH_SESSION_DEFAULT_TTL": "120",
            "ORCH_MAX_CONCURRENT_RPCS": "50",
            "ORCH_SO_REUSEPORT": "true",
        }
    )
    assert settings.redis_url == "redis://127.0.0.1:7000/1"
    assert settings.session_default_ttl == 120.0
    assert settings.max_concurrent_rpcs == 50
    assert settings.so_reuseport is True


def test_an_unparsable_value_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="ORCH_MAX_CONCURRENT_RPCS"):
        Settings.from_env({"ORCH_MAX_CONCURRENT_RPCS": "many"})


def test_inconsistent_values_are_rejected() -> None:
    with pytest.raises(SettingsError, match="session_default_ttl"):
        Settings.from_env({"ORCH_SESSION_DEFAULT_TTL": "10", "ORCH_SESSION_MAX_TTL": "5"})


def test_the_unary_request_id_goes_in_initial_or_trailing_metadata() -> None:
    assert Settings.from_env({}).unary_request_id == "trailing"
    assert Settings.from_env({"ORCH_UNARY_REQUEST_ID": "initial"}).unary_request_id == "initial"
    assert Settings.from_env({"ORCH_UNARY_REQUEST_ID": "trailing"}).unary_request_id == "trailing"
    with pytest.raises(SettingsError, match="unary_request_id"):
        Settings.from_env({"ORCH_UNARY_REQUEST_ID": "headers"})


def test_every_setting_is_documented() -> None:
    for name, _default, help_text in Settings.documentation():
        assert name.startswith(("ORCH_", "REDIS_URL"))
        assert help_text


def test_platform_addresses_default_to_the_query_address() -> None:
    config = downstream_config(
        Settings.from_env(
            {
                "ORCH_QUERY_SERVICE_ADDRESS": "query:1",
                "ORCH_EMBEDDING_SERVICE_ADDRESS": "embed:2",
                "ORCH_TOOL_REGISTRY_ADDRESS": "tools:3",
                "ORCH_AGENT_EXECUTION_ADDRESS": "",
            }
        )
    )
    assert config.address(Service.TOOL_REGISTRY) == "tools:3"
    assert config.address(Service.EMBEDDING) == "embed:2"
    for service in (
        Service.QUERY,
        Service.AGENT_EXECUTION,
        Service.WORKFLOW_ENGINE,
        Service.CONVERSATION,
        Service.AGENT_MANAGEMENT,
    ):
        assert config.address(service) == "query:1"


def test_each_platform_address_is_its_own_setting() -> None:
    variables = {
        Service.AGENT_EXECUTION: "ORCH_AGENT_EXECUTION_ADDRESS",
        Service.WORKFLOW_ENGINE: "ORCH_WORKFLOW_ENGINE_ADDRESS",
        Service.CONVERSATION: "ORCH_CONVERSATION_ADDRESS",
        Service.AGENT_MANAGEMENT: "ORCH_AGENT_MANAGEMENT_ADDRESS",
        Service.TOOL_REGISTRY: "ORCH_TOOL_REGISTRY_ADDRESS",
    }
    env = {name: f"{service.value}:7" for service, name in variables.items()}
    config = downstream_config(Settings.from_env(env))
    for service in variables:
        assert config.address(service) == f"{service.value}:7"


def test_the_event_loop_is_uvloop_unless_set_to_asyncio() -> None:
    assert Settings.from_env({}).event_loop == "uvloop"
    assert Settings.from_env({"ORCH_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    with pytest.raises(SettingsError, match="event_loop must be uvloop or asyncio"):
        Settings.from_env({"ORCH_EVENT_LOOP": "trio"})
