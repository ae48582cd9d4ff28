"""`orchestrator serve --processes N` refuses settings it cannot serve with, and gives each
server process its own metrics port."""

from __future__ import annotations

import pytest

from server.config import Settings
from server.supervisor import child_environment, refusal

REDIS = "redis://127.0.0.1:7000/0"


def test_one_process_is_always_allowed() -> None:
    assert refusal(Settings.from_env({}), 1, tracemalloc=True) is None


@pytest.mark.parametrize(
    ("env", "tracemalloc", "reason"),
    [
        ({}, False, "needs REDIS_URL"),
        ({"REDIS_URL": REDIS, "ORCH_EMBEDDED_REFERENCE": "true"}, False, "reference services"),
        ({"REDIS_URL": REDIS, "ORCH_LISTEN_ADDRESS": "127.0.0.1:0"}, False, "fixed port"),
        ({"REDIS_URL": REDIS}, True, "--tracemalloc"),
    ],
)
def test_more_than_one_process_is_refused_with_the_reason(
    env: dict[str, str], tracemalloc: bool, reason: str
) -> None:
    refused = refusal(Settings.from_env(env), 2, tracemalloc)
    assert refused is not None
    assert reason in refused


def test_each_child_reuses_the_port_and_gets_the_next_metrics_port() -> None:
    settings = Settings.from_env({"REDIS_URL": REDIS, "ORCH_METRICS_ADDRESS": "[::]:9464"})
    envs = [child_environment(settings, index, {"KEEP": "1"}) for index in range(3)]
    assert [env["ORCH_METRICS_ADDRESS"] for env in envs] == ["[::]:9464", "[::]:9465", "[::]:9466"]
    assert all(env["ORCH_SO_REUSEPORT"] == "true" and env["KEEP"] == "1" for env in envs)


def test_a_metrics_port_of_zero_stays_zero_in_every_child() -> None:
    environ = {"REDIS_URL": REDIS, "ORCH_METRICS_ADDRESS": "127.0.0.1:0"}
    settings = Settings.from_env(environ)
    assert child_environment(settings, 1, environ)["ORCH_METRICS_ADDRESS"] == "127.0.0.1:0"
