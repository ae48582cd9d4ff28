"""The Lua scripts of registry/lua/ read like code: every file is used (a store runs every
script, a script includes every prelude), every script's header names its KEYS and ARGV, and
the bodies use named locals, never ``KEYS[3]`` or ``ARGV[17]``. The locals are declared at the
top, one a line or several grouped by meaning in one assignment
(``local id, stream, entry = ARGV[2], ARGV[3], ARGV[4]``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from registry.lua_scripts import (
    LUA_ROOT,
    PRELUDES,
    included_files,
    lua_files,
    lua_script,
    script_names,
)

REGISTRY = Path(__file__).resolve().parents[2] / "registry"
# `local job_key = KEYS[1]`, `local deadline_ms = tonumber(ARGV[9])`, or several at once:
# `local id, base_ms = ARGV[2], tonumber(ARGV[9])`; with an optional comment.
VALUE = r"(?:tonumber\()?(?:KEYS|ARGV)\[\d+\]\)?"
DECLARATION = re.compile(rf"^local (\w+(?:, \w+)*) = ({VALUE}(?:, {VALUE})*)\s*(?:--.*)?$")
SOURCE = re.compile(r"\b(KEYS|ARGV)\[")
NUMBERED = re.compile(r"\b(KEYS|ARGV)\[\d+\]")


def text(name: str) -> str:
    return (LUA_ROOT / f"{name}.lua").read_text(encoding="utf-8")


def header(name: str) -> dict[str, str]:
    """The script's leading comment, split at ``-- KEYS:``, ``-- ARGV:`` and ``-- Returns:``."""
    lines = [line for line in text(name).splitlines() if not line.startswith("--!")]
    comment: list[str] = []
    for line in lines:
        if not line.startswith("--"):
            break
        comment.append(line.removeprefix("--").strip())
    parts: dict[str, str] = {"doc": ""}
    part = "doc"
    for line in comment:
        label, _, rest = line.partition(":")
        if label in ("KEYS", "ARGV", "Returns"):
            part, line = label, rest
        parts[part] = f"{parts.get(part, '')} {line}".strip()
    return parts


def declarations(name: str) -> list[tuple[str, str]]:
    """(local name, KEYS | ARGV) of every named local the script (with its preludes) unpacks."""
    found: list[tuple[str, str]] = []
    for source in [*included_files(name), name]:
        for line in text(source).splitlines():
            match = DECLARATION.match(line)
            if match:
                names = match.group(1).split(", ")
                sources = SOURCE.findall(match.group(2))
                assert len(names) == len(sources), f"{source}.lua: one value a name: {line}"
                found.extend(zip(names, sources, strict=True))
    return found


def run_by_stores() -> set[str]:
    """``<area>/<name>`` of every script a store runs: the area its class names (``SCRIPTS``)
    with every name its module passes to ``run`` (or to the queue's ``_per_delivery``, which
    runs the script it is given)."""
    run: set[str] = set()
    for module in REGISTRY.glob("*.py"):
        source = module.read_text(encoding="utf-8")
        areas = re.findall(r'^    SCRIPTS = "(\w+)"$', source, re.MULTILINE)
        assert len(areas) <= 1, f"{module.name}: one store with scripts per module"
        names = re.findall(r'\b(?:run|_per_delivery)\(\s*"(\w+)"', source)
        run.update(f"{area}/{name}" for area in areas for name in names)
    return run


def test_every_script_is_loaded_by_a_store_and_every_store_script_exists() -> None:
    assert run_by_stores() == set(script_names())


def test_every_prelude_is_included_by_a_script() -> None:
    preludes = {name for name in lua_files() if name.startswith(f"{PRELUDES}/")}
    included = {prelude for name in script_names() for prelude in included_files(name)}
    assert preludes == included


@pytest.mark.parametrize("name", script_names())
def test_a_script_header_says_what_it_does_takes_and_returns(name: str) -> None:
    parts = header(name)
    assert parts["doc"], f"{name}: no description"
    for part in ("KEYS", "ARGV", "Returns"):
        assert parts.get(part), f"{name}: its header has no '-- {part}:' line"


@pytest.mark.parametrize("name", script_names())
def test_a_script_header_names_every_key_and_argument_it_unpacks(name: str) -> None:
    parts = header(name)
    for local, source in declarations(name):
        assert re.search(rf"\b{local}\b", parts[source]), (
            f"{name}: {local} (from {source}) is not named in its header's {source} line"
        )


@pytest.mark.parametrize("name", lua_files())
def test_a_body_reads_keys_and_arguments_by_name_not_by_number(name: str) -> None:
    for number, line in enumerate(text(name).splitlines(), 1):
        if line.lstrip().startswith("--") or DECLARATION.match(line):
            continue
        assert not NUMBERED.search(line), f"registry/lua/{name}.lua:{number}: {line.strip()}"


def test_a_prelude_is_included_once_before_the_script() -> None:
    source = lua_script("jobs/notice").source
    time_prelude = text("prelude/time")
    assert source.count(time_prelude) == 1  # included by prelude/jobs only, once
    assert source.index(time_prelude) < source.index(text("prelude/jobs"))
    assert source.endswith(text("jobs/notice"))
