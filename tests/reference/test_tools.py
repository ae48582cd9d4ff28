"""The reference tools: the calculator's grammar and bounds, the clock, the catalogue."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from reference import tools
from reference.tools import ToolBox, ToolError, calculate


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2", "3"),
        ("2 + 3 * 4", "14"),
        ("(2 + 3) * 4", "20"),
        ("10 / 4", "2.5"),
        ("1 / 3", "0.3333333333"),
        ("2 / 3", "0.6666666667"),
        ("-1 / 3", "-0.3333333333"),
        ("-(2 + 3)", "-5"),
        ("--4", "4"),
        ("+4 - -4", "8"),
        ("0.1 + 0.2", "0.3"),
        (".5 * 4", "2"),
        ("7 - 10", "-3"),
        ("  ( ( 1 ) )  ", "1"),
        ("8 / 2 / 2", "2"),
        ("8 - 2 - 2", "4"),
    ],
)
def test_calculator_evaluates_exactly_with_precedence(expression: str, expected: str) -> None:
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("", "empty"),
        ("1 +", "ends too early"),
        ("(1 + 2", "missing ')'"),
        ("1 + 2)", "unexpected ')'"),
        ("2 ** 3", "unexpected '*'"),
        ("1 / 0", "division by zero"),
        ("1 / (2 - 2)", "division by zero"),
        ("__import__('os')", "unexpected character '_'"),
        ("1 + x", "unexpected character 'x'"),
        ("1e5", "unexpected character 'e'"),
        ("1 2", "unexpected '2'"),
        ("(" * 40 + "1" + ")" * 40, "nests deeper"),
        ("-" * 40 + "1", "nests deeper"),
        ("1" * 300, "exceeds 256 characters"),
        ("99999999999999999999 * 99999999999999999999", "too large"),
    ],
)
def test_calculator_refuses_what_is_not_a_bounded_expression(expression: str, reason: str) -> None:
    with pytest.raises(ToolError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        calculate(expression)


def test_clock_reads_the_injected_clock_in_utc() -> None:
    fixed = datetime(2026, 3, 4, 5, 6, 7, 890, tzinfo=timezone(timedelta(hours=2)))
    box = ToolBox(clock=lambda: fixed)
    assert box.call("clock", {}) == "2026-03-04T03:06:07Z"
    naive = ToolBox(clock=lambda: datetime(2026, 1, 1, 0, 0, 0))
    assert naive.call("clock", {}) == "2026-01-01T00:00:00Z"
    with pytest.raises(ToolError, match="no arguments"):
        box.call("clock", {"zone": "x"})


def test_the_system_clock_is_aware() -> None:
    assert tools.system_clock().tzinfo is UTC


def test_toolbox_calls_and_resolves_by_name() -> None:
    box = ToolBox()
    assert box.call("calculator", {"expression": "6 * 7"}) == "42"
    for bad in ({}, {"expression": 5}, {"expression": "1", "extra": True}):
        with pytest.raises(ToolError, match="exactly one string argument"):
            box.call("calculator", bad)
    with pytest.raises(KeyError):
        box.call("shell", {})
    assert [t.name for t in box.resolve(["clock", "calculator"])] == ["clock", "calculator"]
    with pytest.raises(KeyError, match="nope"):
        box.resolve(["calculator", "nope", "other"])


def test_definitions_carry_json_schemas() -> None:
    for spec in tools.TOOLS.values():
        schema = json.loads(spec.parameters_json_schema)
        assert schema["type"] == "object"
        assert spec.description
    calculator = json.loads(tools.CALCULATOR.parameters_json_schema)
    assert calculator["required"] == ["expression"]
