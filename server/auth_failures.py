"""Failed authentications: a sampled warning log, and a per-address throttle.

Every UNAUTHENTICATED call (missing, malformed, unknown, wrong or revoked key) counts against
the client's address (the peer without its port, so new connections do not start afresh). A
WARNING names the key id (never the secret) and the address, sampled: at most one line per
``log_every_s``, saying how many failures were not logged since. Past ``limit`` failures within
``window_s`` an address gets RESOURCE_EXHAUSTED with RetryInfo and a ``retry-after`` trailer on
every call, without its key being looked at, until its failures are forgiven (at ``limit`` per
``window_s``). The table is per process and bounded (domain.rate_limits.FailureThrottle).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from domain.api_keys import KEY_ID_PATTERN, KEY_PREFIX
from domain.errors import ResourceExhausted
from domain.rate_limits import FailureThrottle, Rate
from server.log_sampling import Sampler

log = logging.getLogger(__name__)

_PORT = re.compile(r":\d+$")


def peer_address(peer: str) -> str:
    """``ipv4:10.0.0.1:5432`` -> ``ipv4:10.0.0.1``; ``ipv6:[::1]:5432`` -> ``ipv6:[::1]``;
    anything else (unix sockets) as it is."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return _PORT.sub("", peer)
    return peer


def presented_key_id(authorization: str | None) -> str:
    """The key id of a presented ``Bearer ao_<key_id>_<secret>``, for logs: never the secret,
    and a placeholder when there is no key id to show."""
    if not authorization:
        return "(no key)"
    token = authorization.strip().partition(" ")[2].strip()
    if not token.startswith(KEY_PREFIX):
        return "(malformed key)"
    key_id = token[len(KEY_PREFIX) :].partition("_")[0]
    return key_id if KEY_ID_PATTERN.match(key_id) else "(malformed key)"


class AuthFailures:
    """Throttles and logs failed authentications per client address (see module doc).
    ``limit`` 0 turns the throttle off (failures are still logged)."""

    def __init__(
        self,
        limit: int,
        window_s: float,
        *,
        log_every_s: float = 1.0,
        max_peers: int = 10_000,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._throttle = (
            FailureThrottle(Rate(limit / window_s, limit), max_peers=max_peers) if limit else None
        )
        self._lines = Sampler(log_every_s)
        self._unlogged = 0
        self._clock = clock or time.monotonic

    @property
    def tracking(self) -> bool:
        """Whether any address has failures on record (if not, a call needs no check)."""
        return self._throttle is not None and len(self._throttle) > 0

    def refusal(self, peer: str) -> ResourceExhausted | None:
        """The error for a call from ``peer`` while it is throttled, else None."""
        if self._throttle is None:
            return None
        address = peer_address(peer)
        wait_s = self._throttle.retry_after_s(address, self._clock())
        if wait_s <= 0:
            return None
        return ResourceExhausted(
            f"too many failed authentications from {address}; retry in {wait_s:.1f}s",
            retry_after_s=wait_s,
            quota_subject=f"auth-failures:{address}",
            quota_description=f"at most {self._throttle.rate.burst} failed authentications, "
            f"then {self._throttle.rate}",
        )

    def failed(self, peer: str, authorization: str | None, method: str, reason: str) -> None:
        """Count a failed authentication of ``peer`` and log it (sampled)."""
        address = peer_address(peer)
        now = self._clock()
        if self._throttle is not None:
            self._throttle.record_failure(address, now)
        if not self._lines.due(now):
            self._unlogged += 1
            return
        unlogged, self._unlogged = self._unlogged, 0
        log.warning(
            "authentication failed from %s with key id %s on %s: %s (%d more failures since "
            "the last line of this kind)",
            address,
            presented_key_id(authorization),
            method,
            reason,
            unlogged,
            extra={"peer": address, "key_id": presented_key_id(authorization)},
        )
