"""REDIS_URL names one Redis or a Redis Cluster by its seed nodes; a bad one is a clear error
at startup (before any connection)."""

from __future__ import annotations

import pytest

from registry.redis_client import create_redis, is_cluster
from registry.redis_url import parse_redis_url
from server.config import Settings, SettingsError


def test_a_single_redis_url_is_read_as_redis_py_reads_it() -> None:
    target = parse_redis_url("redis://:secret@10.0.0.5:6380/2")
    assert not target.cluster
    assert target.options["host"] == "10.0.0.5"
    assert target.options["port"] == 6380
    assert target.options["db"] == 2


def test_a_cluster_url_lists_its_seed_nodes() -> None:
    target = parse_redis_url("redis+cluster://user:pw@a.example:7000,b.example:7001,[::1]:7002")
    assert target.cluster and not target.tls
    assert target.seeds == (("a.example", 7000), ("b.example", 7001), ("::1", 7002))
    assert target.options["username"] == "user"
    assert target.options["password"] == "pw"


def test_a_tls_cluster_url_keeps_its_options() -> None:
    target = parse_redis_url("rediss+cluster://n1:7000/?ssl_cert_reqs=none")
    assert target.cluster and target.tls
    assert target.seeds == (("n1", 7000),)
    assert target.options["ssl_cert_reqs"] == "none"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("localhost:6379", "must look like"),
        ("http://localhost:6379", "scheme 'http'"),
        ("redis+cluster://", "must look like"),
        ("redis+cluster://n1", "must be host:port"),
        ("redis+cluster://n1:7000,n2", "must be host:port"),
        ("redis+cluster://n1:port", "no numeric port"),
        ("redis+cluster://n1:70000", "out of range"),
        ("redis+cluster://n1:7000/3", "only database 0"),
        ("redis+cluster://n1:7000/?socket_timeout=soon", "socket_timeout"),
    ],
)
def test_a_bad_url_says_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_redis_url(url)


def test_a_bad_url_stops_the_settings_at_startup() -> None:
    with pytest.raises(SettingsError, match="seed node 'n2' must be host:port"):
        Settings.from_env({"REDIS_URL": "redis+cluster://n1:7000,n2"})


def test_the_password_of_a_bad_url_is_not_shown() -> None:
    with pytest.raises(ValueError, match="only database 0") as caught:
        parse_redis_url("redis+cluster://user:hunter2@n1:7000/5")
    assert "hunter2" not in str(caught.value)


async def test_a_cluster_url_makes_a_cluster_client_without_io() -> None:
    client = create_redis(
        "redis+cluster://127.0.0.1:1,127.0.0.1:2", socket_timeout_s=1, connect_timeout_s=1
    )
    try:
        assert is_cluster(client)
    finally:
        await client.aclose()
    single = create_redis("redis://127.0.0.1:1/0", socket_timeout_s=1, connect_timeout_s=1)
    try:
        assert not is_cluster(single)
    finally:
        await single.aclose()


async def test_a_cluster_urls_options_win_over_the_defaults() -> None:
    client = create_redis(
        "redis+cluster://127.0.0.1:1/?socket_timeout=7&client_name=mine",
        socket_timeout_s=1,
        connect_timeout_s=1,
    )
    try:
        kwargs = client.get_connection_kwargs()  # type: ignore[no-untyped-call]
        assert kwargs["socket_timeout"] == 7
        assert kwargs["client_name"] == "mine"
    finally:
        await client.aclose()
