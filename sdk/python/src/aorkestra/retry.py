"""When to retry and how long to wait: exponential backoff with full jitter, and the server's
advertised delay (google.rpc.RetryInfo or the ``retry-after`` trailer) when it gives one."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` counts the first try (unary calls). Streams reconnect up to
    ``max_reconnects`` times in a row without receiving an event (None: for ever)."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    multiplier: float = 2.0
    # A server asking for a longer pause than this is not waited for: the error is raised.
    max_retry_delay_s: float = 60.0
    max_reconnects: int | None = 20

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """The pause before retry number ``attempt`` (1-based): full jitter over an
        exponentially growing ceiling."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return (rng or random).uniform(0, ceiling)

    def delay(self, attempt: int, advertised_s: float | None) -> float | None:
        """The pause before retry ``attempt``: the server's delay (plus a little jitter so
        clients do not return in lock step) when it advertised one, else the backoff. None when
        the advertised delay is beyond ``max_retry_delay_s``."""
        if advertised_s is not None:
            if advertised_s > self.max_retry_delay_s:
                return None
            return advertised_s + random.uniform(0, min(0.25, advertised_s * 0.1))
        return self.backoff(attempt)
