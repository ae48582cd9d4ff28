"""The reference tool catalogue: a calculator and a clock, pure functions the reference Agent
Execution calls and Tool Registry describes.

The calculator parses ``+ - * / ( )`` over decimal numbers with a recursive-descent parser (no
``eval``), in exact rational arithmetic, with bounded length and nesting. The clock reads an
injectable clock, fixed in tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

# Longest expression the calculator reads, and deepest nesting of parentheses.
MAX_EXPRESSION_CHARS = 256
MAX_NESTING = 32
# Digits shown after the decimal point of a result that is not an integer.
RESULT_DECIMALS = 10
# Results beyond this magnitude are refused rather than printed with thousands of digits.
MAX_RESULT = Fraction(10) ** 30

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


class ToolError(ValueError):
    """A tool could not produce a result from its arguments (the message says why)."""


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool as Tool Registry describes it."""

    name: str
    description: str
    # The JSON schema of the arguments, as JSON text.
    parameters_json_schema: str


CALCULATOR = ToolSpec(
    name="calculator",
    description="Evaluates an arithmetic expression of numbers, + - * / and parentheses.",
    parameters_json_schema=json.dumps(
        {
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "maxLength": MAX_EXPRESSION_CHARS,
                    "description": "for example (2 + 3) * 4",
                }
            },
            "required": ["expression"],
            "additionalProperties": False,
        },
        sort_keys=True,
    ),
)
CLOCK = ToolSpec(
    name="clock",
    description="Returns the current date and time in UTC (ISO 8601).",
    parameters_json_schema=json.dumps(
        {"type": "object", "properties": {}, "additionalProperties": False}, sort_keys=True
    ),
)
TOOLS: dict[str, ToolSpec] = {tool.name: tool for tool in (CALCULATOR, CLOCK)}


# ---------------------------------------------------------------------------------------------
# Calculator

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|([-+*/()]))")


def _tokens(expression: str) -> list[str]:
    tokens: list[str] = []
    position = 0
    rest = expression.rstrip()
    while position < len(rest):
        match = _TOKEN.match(rest, position)
        if match is None:
            raise ToolError(f"unexpected character {rest[position:].lstrip()[:1]!r}")
        tokens.append(match.group(1) or match.group(2))
        position = match.end()
    return tokens


class _Parser:
    """expression := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*;
    factor := ('+'|'-') factor | number | '(' expression ')'."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.position = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ToolError("the expression ends too early")
        self.position += 1
        return token

    def parse(self) -> Fraction:
        if not self.tokens:
            raise ToolError("the expression is empty")
        value = self.expression()
        if self.peek() is not None:
            raise ToolError(f"unexpected {self.peek()!r}")
        return value

    def expression(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
            _check_size(value)
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            operator, right = self.take(), self.factor()
            if operator == "*":
                value *= right
            elif right == 0:
                raise ToolError("division by zero")
            else:
                value /= right
            _check_size(value)
        return value

    def factor(self) -> Fraction:
        token = self.take()
        if token in ("+", "-"):
            self._enter()
            value = self.factor()
            self.depth -= 1
            return value if token == "+" else -value
        if token == "(":
            self._enter()
            value = self.expression()
            if self.peek() != ")":
                raise ToolError("missing ')'")
            self.position += 1
            self.depth -= 1
            return value
        if token in ("*", "/", ")"):
            raise ToolError(f"unexpected {token!r}")
        return Fraction(token)

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise ToolError(f"the expression nests deeper than {MAX_NESTING} levels")


def _check_size(value: Fraction) -> None:
    if abs(value) > MAX_RESULT:
        raise ToolError("the result is too large")


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression; ToolError when it is not one."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression exceeds {MAX_EXPRESSION_CHARS} characters")
    value = _Parser(_tokens(expression)).parse()
    _check_size(value)
    return value


def format_number(value: Fraction) -> str:
    """An integer as such, anything else rounded to RESULT_DECIMALS places without trailing
    zeros."""
    if value.denominator == 1:
        return str(value.numerator)
    scale = 10**RESULT_DECIMALS
    rounded = round(value * scale)
    sign = "-" if rounded < 0 else ""
    whole, fraction = divmod(abs(rounded), scale)
    digits = str(fraction).rjust(RESULT_DECIMALS, "0").rstrip("0")
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def calculate(expression: str) -> str:
    return format_number(evaluate(expression))


# ---------------------------------------------------------------------------------------------
# The catalogue


class ToolBox:
    """Runs the catalogue's tools by name with JSON-like arguments; the clock is injectable."""

    def __init__(self, clock: Clock = system_clock) -> None:
        self._clock = clock

    def resolve(self, names: Sequence[str]) -> list[ToolSpec]:
        """The specs of ``names`` in order; KeyError naming the first unknown one."""
        unknown = next((name for name in names if name not in TOOLS), None)
        if unknown is not None:
            raise KeyError(unknown)
        return [TOOLS[name] for name in names]

    def call(self, name: str, arguments: Mapping[str, Any]) -> str:
        """The tool's result as text; ToolError for bad arguments, KeyError for unknown tools."""
        if name == CALCULATOR.name:
            expression = arguments.get("expression")
            if not isinstance(expression, str) or set(arguments) != {"expression"}:
                raise ToolError("calculator takes exactly one string argument, expression")
            return calculate(expression)
        if name == CLOCK.name:
            if arguments:
                raise ToolError("clock takes no arguments")
            now = self._clock()
            if now.tzinfo is None:
                now = now.replace(tzinfo=UTC)
            return now.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        raise KeyError(name)
