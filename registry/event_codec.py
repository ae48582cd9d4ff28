"""How session events are written to Redis (stream entries and pub/sub messages).

An event is stored as its envelope, a compact JSON object ``{"j": job, "r": request id,
"k": kind, "d": data}``; the sequence (the stream entry id) and the time are assigned by the
Lua script that appends it. Pub/sub messages are ``"<sequence> <time_ms> <envelope>"``, and
``"0 <time_ms> closed"`` tells followers that the session was closed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from domain.jobs import EventKind, SessionEvent, unreadable_event

log = logging.getLogger(__name__)


def decode_envelope(session_id: str, sequence: int, time_ms: int, raw: str) -> SessionEvent:
    """The stored event; one that cannot be read (not an envelope, an unknown kind, ...) is
    logged and read as domain.jobs.unreadable_event, so it never breaks a reader."""
    job_id = kind = ""
    try:
        envelope: Any = json.loads(raw)
        if not isinstance(envelope, Mapping):
            raise ValueError("not a JSON object")
        found_job, found_kind = envelope.get("j"), envelope.get("k")
        job_id = found_job if isinstance(found_job, str) else ""
        kind = found_kind if isinstance(found_kind, str) else ""
        request_id = envelope.get("r", "")
        data = envelope.get("d") or {}
        if not isinstance(data, Mapping) or not isinstance(request_id, str) or not job_id:
            raise ValueError("not an event envelope")
        return SessionEvent(
            session_id=session_id,
            job_id=job_id,
            sequence=sequence,
            time_ms=time_ms,
            kind=EventKind(kind),
            request_id=request_id,
            data=data,
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an unknown kind
        reason = str(exc)[:200]
    log.warning(
        "session %s event %d cannot be read (%s): %s",
        session_id,
        sequence,
        kind or "unknown kind",
        reason,
    )
    return unreadable_event(session_id, sequence, time_ms, job_id, kind, reason)


def decode_stream_entry(session_id: str, entry_id: str, fields: dict[str, str]) -> SessionEvent:
    sequence = int(entry_id.split("-", 1)[0])
    try:
        time_ms = int(fields.get("t", "0"))
    except ValueError:
        time_ms = 0
    return decode_envelope(session_id, sequence, time_ms, fields.get("e", ""))


def decode_message(session_id: str, payload: str) -> SessionEvent | None:
    """A pub/sub payload as an event; None for the session-closed marker. Raises ValueError
    when the payload has no sequence (the reader then re-reads the log)."""
    sequence, time_ms, rest = payload.split(" ", 2)
    if sequence == "0":
        return None
    return decode_envelope(session_id, int(sequence), int(time_ms), rest)
