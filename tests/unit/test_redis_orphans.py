"""tests.support.redis_process.sweep_orphans: a redis-server whose test process was killed is
stopped by the next run; one whose owner still runs is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.redis_process import RedisProcess, sweep_orphans

ROOT = Path(__file__).resolve().parents[2]
STARTER = (
    "from tests.support.redis_process import RedisProcess\n"
    "r = RedisProcess(); r.start()\n"
    "print(r.port, r.directory, flush=True)\n"
    "import time; time.sleep(120)\n"
)


def test_the_server_of_a_killed_test_process_is_stopped_and_its_directory_removed() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", STARTER], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None
    port_text, directory_text = owner.stdout.readline().split()
    directory = Path(directory_text)
    orphan = RedisProcess(int(port_text))
    try:
        os.kill(owner.pid, signal.SIGKILL)  # no teardown runs
        owner.wait(10)
        assert orphan.ping()
        assert sweep_orphans(directory.parent) >= 1
        assert not directory.exists()
        assert gone(orphan)
    finally:
        orphan.close()


def test_the_server_of_a_running_process_is_left_alone() -> None:
    mine = RedisProcess()
    mine.start()
    try:
        sweep_orphans(mine.directory.parent)
        assert mine.ping() and mine.directory.exists()
    finally:
        mine.close()


def gone(server: RedisProcess, within_s: float = 10.0) -> bool:
    """Whether the server stops answering within ``within_s`` (SIGKILL is not synchronous)."""
    deadline = time.monotonic() + within_s
    while server.ping():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
