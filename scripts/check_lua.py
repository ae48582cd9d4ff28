"""Load every Lua script of registry/lua/ (its preludes expanded) into a private redis-server
with SCRIPT LOAD, so a script that does not compile fails `make lint`. Run as
``python -m scripts.check_lua`` from the repository root."""

from __future__ import annotations

import sys

import redis
from redis.exceptions import ResponseError

from registry.lua_scripts import lua_script, script_names
from tests.support.redis_process import RedisProcess


def check(client: redis.Redis) -> list[str]:
    """The errors of every script that Redis refuses, one line each."""
    errors: list[str] = []
    for name in script_names():
        script = lua_script(name)
        try:
            sha = client.script_load(script.source)
        except ResponseError as exc:
            errors.append(f"registry/lua/{name}.lua: {exc}")
            continue
        if sha != script.sha:
            errors.append(f"registry/lua/{name}.lua: Redis hashed it {sha}, not {script.sha}")
    return errors


def main() -> int:
    server = RedisProcess()
    server.start()
    try:
        client = redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
        try:
            errors = check(client)
        finally:
            client.close()
    finally:
        server.close()
    for error in errors:
        print(error, file=sys.stderr)
    if not errors:
        print(f"{len(script_names())} Lua scripts load into redis-server")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
