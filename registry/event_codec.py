"""How session events are written to Redis (stream entries and pub/sub messages).

An event is stored as its envelope, a compact JSON object ``{"j": job, "r": request id,
"k": kind, "d": data}``; the sequence (the stream entry id) and the time are assigned by the
Lua script that appends it. Pub/sub messages are ``"<sequence> <time_ms> <envelope>"``, and
``"0 <time_ms> closed"`` tells followers that the session was closed.
"""

from __future__ import annotations

import json
from typing import Any

from domain.jobs import EventKind, SessionEvent


def decode_envelope(session_id: str, sequence: int, time_ms: int, raw: str) -> SessionEvent:
    envelope: dict[str, Any] = json.loads(raw)
    return SessionEvent(
        session_id=session_id,
        job_id=envelope["j"],
        sequence=sequence,
        time_ms=time_ms,
        kind=EventKind(envelope["k"]),
        request_id=envelope.get("r", ""),
        data=envelope.get("d") or {},
    )


def decode_stream_entry(session_id: str, entry_id: str, fields: dict[str, str]) -> SessionEvent:
    return decode_envelope(
        session_id, int(entry_id.split("-", 1)[0]), int(fields["t"]), fields["e"]
    )


def decode_message(session_id: str, payload: str) -> SessionEvent | None:
    """A pub/sub payload as an event; None for the session-closed marker."""
    sequence, time_ms, rest = payload.split(" ", 2)
    if sequence == "0":
        return None
    return decode_envelope(session_id, int(sequence), int(time_ms), rest)
