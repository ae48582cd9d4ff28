"""The per-address throttle of failed authentications: limit, forgiveness, bounded table."""

from __future__ import annotations

from domain.rate_limits import FailureThrottle, Rate
from server.auth_failures import peer_address, presented_key_id


def test_an_address_is_throttled_after_its_limit_and_forgiven_at_the_rate() -> None:
    throttle = FailureThrottle(Rate(per_second=1.0, burst=3))
    for _ in range(3):
        assert throttle.retry_after_s("ipv4:10.0.0.1", 100.0) == 0
        throttle.record_failure("ipv4:10.0.0.1", 100.0)
    assert throttle.retry_after_s("ipv4:10.0.0.1", 100.0) == 1.0
    assert throttle.retry_after_s("ipv4:10.0.0.2", 100.0) == 0  # others are not affected
    assert throttle.retry_after_s("ipv4:10.0.0.1", 101.0) == 0  # one failure forgiven


def test_the_table_keeps_at_most_max_peers_addresses() -> None:
    throttle = FailureThrottle(Rate(per_second=0.01, burst=1), max_peers=100)
    for n in range(10_000):
        throttle.record_failure(f"ipv4:10.0.{n // 256}.{n % 256}", 1.0)
    assert len(throttle) == 100


def test_the_address_drops_the_port_and_the_key_id_never_shows_the_secret() -> None:
    assert peer_address("ipv4:127.0.0.1:5123") == "ipv4:127.0.0.1"
    assert peer_address("ipv6:[::1]:5123") == "ipv6:[::1]"
    assert presented_key_id("Bearer ao_abcd1234_secretsecretsecret") == "abcd1234"
    assert presented_key_id("Bearer nope") == "(malformed key)"
    assert presented_key_id(None) == "(no key)"
