"""A hard bound on every test, so a hung run fails fast instead of hanging CI (pytest plugin,
loaded by tests/conftest.py).

pytest-timeout (``timeout`` in pyproject.toml, or a test's ``timeout`` mark) raises in the main
thread from SIGALRM. That cannot end every hang:

- its timer is cancelled as soon as a test fails (its ``pytest_exception_interact`` hook runs
  for every failure, not only under --pdb), so the teardown after a failure (fixtures, the
  event loop's close) runs with no timeout at all;
- a signal handler runs only when the main thread returns to the interpreter: a wait inside C
  (grpc core, a lock or thread join that retries on EINTR) does not see it.

This watchdog is faulthandler's C thread: ``hard_timeout_margin`` seconds after a test's own
timeout has passed (counted from the start of its setup), it writes every thread's stack to
stderr and ends the process with exit code 1. pytest's faulthandler plugin also cancels
faulthandler's timer on every failure, so it is set again for the time left."""

from __future__ import annotations

import faulthandler
import sys
import time
from collections.abc import Generator

import pytest
from _pytest.faulthandler import fault_handler_stderr_fd_key

DEFAULT_MARGIN_S = 60.0
_deadline_key = pytest.StashKey[float]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "hard_timeout_margin",
        "seconds past a test's timeout after which the run ends with every thread's stack "
        "(tests.support.watchdog; 0 turns it off)",
        default=str(DEFAULT_MARGIN_S),
    )


def item_timeout(item: pytest.Item) -> float:
    """The test's pytest-timeout limit: its ``timeout`` mark, else --timeout, else the ini."""
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("timeout")
        if value is not None:
            return float(value)
    option = item.config.getoption("timeout", None)
    if option is not None:
        return float(option)
    return float(item.config.getini("timeout") or 0)


def _stderr_fd(config: pytest.Config) -> int:
    """The process's real stderr (a copy taken before output capturing), as faulthandler's
    own plugin writes to."""
    fd = config.stash.get(fault_handler_stderr_fd_key, None)
    if fd is None:
        assert sys.__stderr__ is not None
        fd = sys.__stderr__.fileno()
    return fd


def _arm(item: pytest.Item) -> None:
    left = item.stash[_deadline_key] - time.monotonic()
    faulthandler.dump_traceback_later(max(left, 0.1), exit=True, file=_stderr_fd(item.config))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    margin = float(item.config.getini("hard_timeout_margin") or 0)
    limit = item_timeout(item)
    if margin <= 0 or limit <= 0 or item.config.getoption("usepdb", False):
        return (yield)
    item.stash[_deadline_key] = time.monotonic() + limit + margin
    _arm(item)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()
        del item.stash[_deadline_key]


@pytest.hookimpl(trylast=True)
def pytest_exception_interact(node: pytest.Item | pytest.Collector) -> None:
    """A failure cancelled faulthandler's timer (pytest's faulthandler plugin): the teardown
    still to come is bounded again, by the time left."""
    if isinstance(node, pytest.Item) and _deadline_key in node.stash:
        _arm(node)


@pytest.hookimpl(tryfirst=True)
def pytest_enter_pdb(config: pytest.Config) -> None:
    """Someone is debugging: no hard exit."""
    faulthandler.cancel_dump_traceback_later()
