"""Servicer methods that parse their own request frames.

Every method is registered to receive its request as bytes and parse it in front of the handler
(server.decoding), so bytes that are not a valid message are INVALID_ARGUMENT. A stream-request
method marked ``@raw_request_frames`` gets the raw frames instead and parses each itself: a
frame that does not parse is then judged on its own (TaskUpdateService/PublishUpdates counts it
as a malformed notice) instead of ending the stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

_RAW_FRAMES = "__orchestrator_raw_request_frames__"

F = TypeVar("F", bound=Callable[..., Any])


def raw_request_frames(method: F) -> F:
    """Mark a stream-request servicer method that is called with an async iterator of the
    request frames as ``bytes``."""
    setattr(method, _RAW_FRAMES, True)
    return method


def wants_raw_frames(behavior: Any) -> bool:
    """Whether a (bound) servicer method was marked ``@raw_request_frames``."""
    return bool(getattr(behavior, _RAW_FRAMES, False))
