"""A hung test ends the run with every thread's stack (tests.support.watchdog) where
pytest-timeout cannot end it: in the teardown after a failure, and in a wait that never returns
to the interpreter. Each case runs pytest in a child process on a test that would hang for
10 minutes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HANG_S = 600

CONFTEST = """
import pytest
pytest_plugins = ["tests.support.watchdog"]
"""

TEARDOWN_AFTER_A_FAILURE = f"""
import time
import pytest

@pytest.fixture
def hangs_in_teardown():
    yield
    time.sleep({HANG_S})

def test_fails_then_its_teardown_hangs(hangs_in_teardown):
    assert False
"""

SIGNAL_NEVER_SEEN = f"""
import signal
import time

def test_waits_with_sigalrm_blocked():
    # As a wait inside C code: pytest-timeout's SIGALRM never reaches the interpreter.
    signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGALRM}})
    time.sleep({HANG_S})
"""


def run_pytest(tmp_path: Path, test_source: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_hang.py").write_text(test_source)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["-p", "no:cacheprovider", "-p", "no:randomly", "-o", "timeout=1"]
    args += ["-o", "hard_timeout_margin=1", "--rootdir", str(tmp_path), str(tmp_path)]
    return subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_S / 4,  # far before the hang would end by itself
        check=False,
    )


def test_a_teardown_hanging_after_a_failure_ends_the_run_with_its_stack(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, TEARDOWN_AFTER_A_FAILURE)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "Timeout (" in done.stderr
    assert "in hangs_in_teardown" in done.stderr, done.stderr


def test_a_hang_that_sigalrm_cannot_interrupt_ends_the_run_with_its_stack(
    tmp_path: Path,
) -> None:
    done = run_pytest(tmp_path, SIGNAL_NEVER_SEEN)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "Timeout (" in done.stderr
    assert "in test_waits_with_sigalrm_blocked" in done.stderr, done.stderr
