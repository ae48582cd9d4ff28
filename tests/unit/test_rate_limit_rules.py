"""Rate-limit rules: GCRA arithmetic, overrides, settings and the stream cap."""

from __future__ import annotations

import pytest

from domain.rate_limits import Rate, RateLimitRules, StreamSlots, gcra, parse_overrides
from server.config import Settings, SettingsError


def test_gcra_allows_a_burst_then_spaces_requests_by_the_interval() -> None:
    rate = Rate(per_second=10, burst=3)  # one request per 100 ms
    tat: float | None = None
    for _ in range(3):
        tat, wait = gcra(tat, 0, rate)
        assert wait == 0
    _, wait = gcra(tat, 0, rate)
    assert wait == pytest.approx(100_000)
    _, wait = gcra(tat, 100_000, rate)
    assert wait == 0


@pytest.mark.parametrize("now_us", [512_345_678.123, 987_654_321.987, 1.1e9 + 0.3])
def test_gcra_allows_the_first_call_of_a_slow_bucket_at_any_clock_reading(now_us: float) -> None:
    # One call per 1,000 s: adding the interval to a fractional clock and taking it off again
    # used to leave a wait of a fraction of a microsecond, a refused first call.
    assert gcra(None, now_us, Rate(per_second=0.001, burst=1))[1] == 0


def test_overrides_parse_rate_and_burst() -> None:
    assert parse_overrides("tenantA=5:10, tenantB=1000:2000,c=2.5") == {
        "tenantA": Rate(5, 10),
        "tenantB": Rate(1000, 2000),
        "c": Rate(2.5, 3),
    }
    assert parse_overrides("") == {}
    for bad in ("tenantA", "tenantA=x:1", "tenantA=0:1", "tenantA=1:0", "{bad}=1:1"):
        with pytest.raises(ValueError, match=r"override|expected"):
            parse_overrides(bad)


def test_rules_add_a_key_bucket_only_for_keyed_callers() -> None:
    rules = RateLimitRules(Rate(50, 100), key=Rate(5, 10), overrides={"big": Rate(1000, 2000)})
    assert [b.subject for b in rules.buckets("acme")] == ["tenant:acme"]
    tenant_bucket, key_bucket = rules.buckets("big", "k1")
    assert tenant_bucket.rate == Rate(1000, 2000) and tenant_bucket.kind == "tenant"
    assert key_bucket.rate == Rate(5, 10) and key_bucket.subject == "key:k1"


def test_settings_build_the_rules_and_reject_bad_overrides() -> None:
    settings = Settings.from_env(
        {
            "ORCH_RATE_LIMIT_RPS": "7",
            "ORCH_RATE_LIMIT_BURST": "9",
            "ORCH_RATE_LIMIT_KEY_RPS": "2",
            "ORCH_RATE_LIMIT_OVERRIDES": "tenantA=5:10",
            "ORCH_METRICS_ADDRESS": "",
        }
    )
    rules = settings.rate_limit_rules()
    assert rules.default == Rate(7, 9)
    assert rules.key == Rate(2, 4)
    assert rules.tenant_rate("tenantA") == Rate(5, 10)
    assert settings.metrics_address == ""
    with pytest.raises(SettingsError, match="rate limits"):
        Settings.from_env({"ORCH_RATE_LIMIT_OVERRIDES": "tenantA=five"})


def test_stream_slots_cap_each_tenant_separately() -> None:
    slots = StreamSlots(limit=2)
    assert slots.try_acquire("a") and slots.try_acquire("a")
    assert not slots.try_acquire("a")
    assert slots.try_acquire("b")
    slots.release("a")
    assert slots.open_streams("a") == 1
    assert slots.try_acquire("a")
