"""Where a shard channel lives: slots as Redis computes them, the layout's owner of a slot, a
hash tag for any slot (the readers' heartbeat channels), a node's URL from the cluster URL."""

from __future__ import annotations

from redis.crc import key_slot

from registry.keys import KeySpace
from registry.shard_nodes import Layout, node_url, slot_of, tag_in_slot


def test_a_channel_slot_is_the_one_redis_computes() -> None:
    keys = KeySpace("ao")
    for name in (keys.session_channel("acme", "s-1"), "no-tag", "a{}b", "x{t:acme}y{z}"):
        assert slot_of(name) == key_slot(name.encode())


def test_a_sessions_channel_shares_the_slot_of_its_tenants_keys() -> None:
    keys = KeySpace("ao")
    channel = keys.session_channel("acme", "s-1")
    assert slot_of(channel) == slot_of(keys.session_events("acme", "s-1"))


def test_a_tag_is_found_for_any_slot() -> None:
    for slot in (0, 1, 5461, 10923, 16383):
        assert key_slot(f"hb:{{{tag_in_slot(slot)}}}:p".encode()) == slot


def test_the_layout_names_the_owner_of_each_slot_and_none_for_a_gap() -> None:
    layout = Layout(((0, 5460, "a:1"), (5461, 10922, "b:2"), (10924, 16383, "c:3")))
    assert layout.node_of(0) == "a:1"
    assert layout.node_of(5461) == "b:2"
    assert layout.node_of(10923) is None
    assert layout.node_of(16383) == "c:3"
    assert layout.first_slot("c:3") == 10924
    assert layout.first_slot("d:4") is None


def test_a_nodes_url_keeps_credentials_database_and_options() -> None:
    url = "rediss://user:secret@seed:7000/0?ssl_cert_reqs=none"
    assert node_url(url, "10.0.0.5", 7001) == (
        "rediss://user:secret@10.0.0.5:7001/0?ssl_cert_reqs=none"
    )
    assert node_url("redis://seed:7000/0", "::1", 7002) == "redis://[::1]:7002/0"


def test_both_channel_forms_of_a_session_are_parsed() -> None:
    keys = KeySpace("ao")
    assert keys.parse_session_channel(keys.session_channel("acme", "s-1")) == ("acme", "s-1")
    assert keys.parse_session_channel(keys.legacy_session_channel("acme", "s-1")) == (
        "acme",
        "s-1",
    )
    assert keys.parse_session_channel("ao:{t:acme}:other") is None
    assert keys.parse_session_channel("ao:evhb:{1}:p") is None
