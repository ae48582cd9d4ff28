"""Sampled log lines: a condition that can last (a backend down, a flood of bad calls) logs
once every few seconds, not once per call."""

from __future__ import annotations


class Sampler:
    """Says whether a line is due: the first time, then at most once every ``every_s``."""

    def __init__(self, every_s: float) -> None:
        self._every_s = every_s
        self._last: float | None = None

    def due(self, now: float) -> bool:
        """Whether to log at ``now`` (monotonic seconds); if so, counts it as logged."""
        if self._last is not None and now - self._last < self._every_s:
            return False
        self._last = now
        return True
