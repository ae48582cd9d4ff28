"""REF_* settings and the deterministic content helpers."""

from __future__ import annotations

import pytest

from reference import content
from reference.config import DEFAULT_PUBLISH_METADATA, ConfigError, ReferenceConfig


def test_defaults() -> None:
    config = ReferenceConfig.from_env({})
    assert config == ReferenceConfig()
    assert config.listen_address == "[::]:50061"
    assert config.orchestrator_address == "localhost:50051"
    assert (config.step_delay_s, config.deltas, config.embedding_dim) == (0.05, 3, 8)
    assert config.publish_metadata == DEFAULT_PUBLISH_METADATA
    assert config.demo_tenants == ("demo", "other")
    assert ReferenceConfig.from_env({"REF_DEMO_TENANTS": ""}).demo_tenants == ()


def test_values_from_env() -> None:
    config = ReferenceConfig.from_env(
        {
            "REF_LISTEN_ADDRESS": "127.0.0.1:7000",
            "REF_ORCHESTRATOR_ADDRESS": "orch:1",
            "REF_STEP_DELAY": "0",
            "REF_DELTAS": "7",
            "REF_FAILURE_RATE": "0.25",
            "REF_SILENT_RATE": "0.5",
            "REF_EMBEDDING_DIM": "16",
            "REF_PUBLISH_API_KEY": "k-123",
            "REF_DEMO_TENANTS": " acme, globex ,",
        }
    )
    assert config.demo_tenants == ("acme", "globex")
    assert config.listen_address == "127.0.0.1:7000"
    assert config.orchestrator_address == "orch:1"
    assert (config.step_delay_s, config.deltas, config.embedding_dim) == (0.0, 7, 16)
    assert (config.failure_rate, config.silent_rate) == (0.25, 0.5)
    assert config.publish_metadata == (("authorization", "Bearer k-123"),)


@pytest.mark.parametrize(
    "env",
    [
        {"REF_FAILURE_RATE": "1.5"},
        {"REF_SILENT_RATE": "-0.1"},
        {"REF_DELTAS": "0"},
        {"REF_DELTAS": "three"},
        {"REF_EMBEDDING_DIM": "0"},
        {"REF_STEP_DELAY": "soon"},
    ],
)
def test_bad_values_are_reported(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        ReferenceConfig.from_env(env)


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 100])
def test_deltas_concatenate_to_the_text(parts: int) -> None:
    text = content.answer_text("a prompt")
    chunks = content.split_deltas(text, parts)
    assert "".join(chunks) == text
    assert len(chunks) == min(parts, len(text))
    assert all(chunks)


def test_failure_choice_is_stable_and_follows_the_rate() -> None:
    jobs = [f"job-{i}" for i in range(1000)]
    assert not any(content.fails(j, 0.0) for j in jobs)
    assert all(content.fails(j, 1.0) for j in jobs)
    picked = [j for j in jobs if content.fails(j, 0.3)]
    assert picked == [j for j in jobs if content.fails(j, 0.3)]
    assert 200 < len(picked) < 400


def test_embedding_vector_is_stable_for_any_dimension() -> None:
    assert content.embedding_vector("x", 20) == content.embedding_vector("x", 20)
    assert content.embedding_vector("x", 20)[:8] == content.embedding_vector("x", 8)
    assert all(-1.0 <= v < 1.0 for v in content.embedding_vector("y", 50))
