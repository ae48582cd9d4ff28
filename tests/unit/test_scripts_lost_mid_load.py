"""A script that Redis loses again right after it was loaded (Redis restarted in between) is
UNAVAILABLE for the caller, never an unhandled NoScriptError (a traceback and UNKNOWN)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import NoScriptError

from domain.errors import Unavailable
from registry.lua_scripts import ScriptRunner


class _Pipeline:
    def execute_command(self, *args: Any) -> None:
        pass

    async def execute(self) -> list[Any]:
        raise NoScriptError("No matching script. Please use EVAL.")


class _ForgetfulRedis:
    """Every script it is asked to run is unknown, however often it is loaded."""

    def __init__(self) -> None:
        self.loads = 0

    async def evalsha(self, *args: Any) -> Any:
        raise NoScriptError("No matching script. Please use EVAL.")

    async def script_load(self, source: str) -> str:
        self.loads += 1
        return "sha"

    def pipeline(self, transaction: bool = False) -> _Pipeline:
        return _Pipeline()


async def test_a_script_lost_again_after_loading_is_unavailable() -> None:
    redis = _ForgetfulRedis()
    runner = ScriptRunner(redis, "jobs")  # type: ignore[arg-type]
    with pytest.raises(Unavailable, match="lost its scripts"):
        await runner.run("finish", keys=["k"], args=["a"])
    assert redis.loads == 1


async def test_a_pipeline_whose_scripts_are_lost_again_is_unavailable() -> None:
    redis = _ForgetfulRedis()
    runner = ScriptRunner(redis, "jobs")  # type: ignore[arg-type]
    with pytest.raises(Unavailable, match="lost its scripts"):
        await runner.in_one_round_trip(lambda pipe: pipe.run("finish", keys=["k"], args=["a"]))
    assert redis.loads == 1
