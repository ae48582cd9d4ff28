"""Ids sort by creation; page tokens are opaque, validated and bound to their filters."""

from __future__ import annotations

import pytest

from domain.errors import InvalidArgument
from domain.ids import derived_id, is_resource_id, is_tenant_id, new_id
from domain.models import SessionFilter, SessionState
from domain.sessions import decode_page_token, encode_page_token


def test_ids_are_uuid7_and_sort_in_creation_order() -> None:
    ids = [new_id() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(is_resource_id(i) for i in ids)


def test_derived_ids_are_valid_ids_fixed_by_their_parent_and_name() -> None:
    parent = new_id()
    ids = [derived_id(parent, f"item/{n}") for n in range(5000)]
    assert all(is_resource_id(i) for i in ids)  # so they pass job id validation
    assert len(set(ids)) == len(ids)
    assert ids == [derived_id(parent, f"item/{n}") for n in range(5000)]  # the same every time
    assert derived_id(new_id(), "item/0") != ids[0]
    assert all(i[:13] == parent[:13] for i in ids)  # they sort with their parent's time


def test_tenant_ids_cannot_break_redis_hash_tags() -> None:
    assert is_tenant_id("acme-corp_1.eu")
    for bad in ("", "{acme}", "a}b", "a b", "x" * 65):
        assert not is_tenant_id(bad)


def test_page_token_round_trips_for_the_same_filter() -> None:
    cursor = new_id()
    f = SessionFilter(state=SessionState.ACTIVE, agent_id="a")
    assert decode_page_token(encode_page_token(cursor, f), f) == cursor


def test_page_token_from_other_filters_is_rejected() -> None:
    token = encode_page_token(new_id(), SessionFilter(agent_id="a"))
    with pytest.raises(InvalidArgument, match="different filters"):
        decode_page_token(token, SessionFilter(agent_id="b"))


@pytest.mark.parametrize("token", ["garbage", "e30", "eyJ2IjoxfQ"])
def test_malformed_page_tokens_are_rejected(token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        decode_page_token(token, SessionFilter())
