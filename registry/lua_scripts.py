"""The Lua scripts of the Redis stores, and the one way they are run.

Every script is a file under ``registry/lua/`` (``<area>/<name>.lua``), opening with a header
comment (what it does, its KEYS and ARGV by name, what it returns) and unpacking KEYS and ARGV
into named locals at its top. A script names the shared preludes (``registry/lua/prelude/``) it
needs in its first lines (``--! include: prelude/time``, ``--! include: prelude/jobs``); a prelude
may include others, and each is included once, before the script, in the same chunk: its locals
(keys, arguments every such script takes, helper functions) are the script's. A file is read
once per process (``lua_script``).

``ScriptRunner`` runs the scripts of one area (a store's folder) by name on one client, every
one of them read when the runner is made: EVALSHA straight away, and only on a NOSCRIPT reply
(a Redis that restarted) SCRIPT LOAD and again, so a script costs one round trip, alone or in a
pipeline (redis-py's own pipelines ask SCRIPT EXISTS first: one more round trip every time).
``make lint`` loads every script into a real redis-server (``scripts/check_lua.py``).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError
from redis.typing import EncodableT, KeyT

from domain.errors import Unavailable

LUA_ROOT = Path(__file__).parent / "lua"
_INCLUDE = re.compile(r"--! include: (\S+)\s*$")


@dataclass(frozen=True, slots=True)
class LuaScript:
    """One script as Redis runs it: its preludes, then its own text."""

    name: str
    source: str
    sha: str


PRELUDES = "prelude"
# Every script opens with a Redis 7 shebang (no flags): unlike a script without one, it may not
# touch keys of two slots. On a cluster that is refused whether or not the slots sit on the
# same node, so a key outside its script's slot fails every test on the cluster, not one run in
# three. (It also refuses a writing script as a whole while Redis is out of memory, instead of
# failing at its first write.)
SHEBANG = "#!lua\n"


def script_path(name: str) -> Path:
    return LUA_ROOT / f"{name}.lua"


def lua_files() -> list[str]:
    """The name of every .lua file under registry/lua/ (``<area>/<name>``), preludes included."""
    return sorted(
        str(path.relative_to(LUA_ROOT).with_suffix("")) for path in LUA_ROOT.rglob("*.lua")
    )


def script_names() -> list[str]:
    """Every script a store runs (every file but the preludes)."""
    return [name for name in lua_files() if not name.startswith(f"{PRELUDES}/")]


def _includes(text: str) -> list[str]:
    """The preludes a file names in its leading ``--! include:`` lines."""
    names: list[str] = []
    for line in text.splitlines():
        found = _INCLUDE.match(line)
        if found is None:
            break
        names.append(found.group(1))
    return names


def _expand(name: str, seen: set[str], stack: tuple[str, ...] = ()) -> Iterator[str]:
    if name in stack:
        raise ValueError(f"Lua include cycle: {' -> '.join((*stack, name))}")
    text = script_path(name).read_text(encoding="utf-8")
    for included in _includes(text):
        if included not in seen:
            seen.add(included)
            yield from _expand(included, seen, (*stack, name))
    yield text


@functools.cache
def lua_script(name: str) -> LuaScript:
    """The script ``registry/lua/<name>.lua`` with its preludes (read once per process)."""
    source = SHEBANG + "".join(_expand(name, set()))
    return LuaScript(name, source, hashlib.sha1(source.encode()).hexdigest())


def included_files(name: str) -> list[str]:
    """Every prelude ``name`` pulls in, in order (for checks)."""
    seen: set[str] = set()
    list(_expand(name, seen))
    return sorted(seen)


def area_scripts(area: str) -> dict[str, LuaScript]:
    """Every script of ``registry/lua/<area>/``, by its name in the area."""
    scripts = {
        name.removeprefix(f"{area}/"): lua_script(name)
        for name in script_names()
        if name.startswith(f"{area}/")
    }
    if not scripts:
        raise ValueError(f"no Lua scripts in registry/lua/{area}/")
    return scripts


class ScriptPipeline:
    """A pipeline being built: ``run`` queues a script of the runner's area (EVALSHA),
    ``commands`` is the pipeline for any other command."""

    def __init__(
        self, commands: Pipeline, scripts: dict[str, LuaScript], route: str | None = None
    ) -> None:
        self.commands = commands
        self.scripts: list[LuaScript] = []
        self._known = scripts
        self._route = route

    def run(self, name: str, keys: Sequence[KeyT] = (), args: Sequence[EncodableT] = ()) -> None:
        script = self._known[name]
        if not keys and self._route is not None:
            keys = (self._route,)
        self.scripts.append(script)
        # Not ``evalsha``: a cluster pipeline refuses that method, not the command (routed by
        # the slot of its keys, like any other).
        self.commands.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)


class ScriptRunner:
    """Runs the scripts of ``registry/lua/<area>/`` on one client in one round trip each (see
    the module's doc); ``run("start")`` runs ``<area>/start.lua``.

    On a Redis Cluster a script runs on the master of its KEYS' slot (every key of a script is
    in one slot: registry.keys). Scripts that build their key names from an ARGV prefix with
    one hash tag (the work queue's) take no KEYS: ``route``, a key in that slot, is then passed
    as their only KEYS entry, so the call reaches the node holding their keys."""

    def __init__(self, redis: Redis, area: str, *, route: str | None = None) -> None:
        self._redis = redis
        self._scripts = area_scripts(area)
        self._route = route

    async def run(
        self, name: str, keys: Sequence[KeyT] = (), args: Sequence[EncodableT] = ()
    ) -> Any:
        script = self._scripts[name]
        if not keys and self._route is not None:
            keys = (self._route,)
        try:
            return await self._redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self._redis.script_load(script.source)
        try:
            return await self._redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError as exc:
            raise scripts_lost(exc) from exc

    async def in_one_round_trip(self, build: Callable[[ScriptPipeline], None]) -> list[Any]:
        """Execute the pipeline ``build`` makes (scripts and other commands) in one round trip.
        Only a Redis that lost a script costs loading it and sending the pipeline again: the
        script did not run, and the other commands of such pipelines must be idempotent."""
        for attempt in (1, 2):
            pipe = ScriptPipeline(
                self._redis.pipeline(transaction=False), self._scripts, self._route
            )
            build(pipe)
            try:
                return list(await pipe.commands.execute())
            except NoScriptError as exc:
                if attempt == 2:
                    raise scripts_lost(exc) from exc
                for script in pipe.scripts:
                    await self._redis.script_load(script.source)
        raise AssertionError("unreachable")

    async def each_in_one_round_trip(self, build: Callable[[ScriptPipeline], None]) -> list[Any]:
        """Execute the pipeline ``build`` makes in one round trip, each command's error (a
        script's ResponseError, NoScriptError included) in its place among the replies instead
        of raised: the commands after it ran. When a script was missing (a Redis that
        restarted), the pipeline's scripts are loaded before this returns, so the caller can
        send again the commands that met NOSCRIPT (they did not run). A connection failure
        raises (no command's outcome is known)."""
        pipe = ScriptPipeline(self._redis.pipeline(transaction=False), self._scripts)
        build(pipe)
        replies = list(await pipe.commands.execute(raise_on_error=False))
        if any(isinstance(reply, NoScriptError) for reply in replies):
            for script in {script.sha: script for script in pipe.scripts}.values():
                await self._redis.script_load(script.source)
        return replies


def scripts_lost(exc: NoScriptError) -> Unavailable:
    """A script loaded just now was gone again: Redis restarted (or was flushed) in between.
    The caller sees UNAVAILABLE and retries, like any other moment Redis is away."""
    return Unavailable(f"redis lost its scripts while they were being loaded (restarted?): {exc}")
