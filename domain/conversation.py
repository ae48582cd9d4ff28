"""Conversation history: the turns of a session as Conversation keeps them."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class TurnRole(enum.StrEnum):
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn of a conversation. ``job_id`` is the job that added it (a job adds its user and
    assistant turns once, whatever the retries: the job id is the idempotency key)."""

    role: TurnRole
    content: str
    job_id: str = ""
    time_ms: int = 0
    tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        """The turn as plain JSON values (a plan's recorded history window)."""
        return {
            "role": self.role.value,
            "content": self.content,
            "job_id": self.job_id,
            "time_ms": self.time_ms,
            "tokens": self.tokens,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Turn:
        return cls(
            role=TurnRole(data["role"]),
            content=str(data["content"]),
            job_id=str(data.get("job_id", "")),
            time_ms=int(data.get("time_ms", 0)),
            tokens=int(data.get("tokens", 0)),
        )


@dataclass(frozen=True, slots=True)
class HistoryWindow:
    """Which turns a plan loads before the work: at most ``last_turns`` (0: no count limit) of
    the newest turns, and no more than ``token_budget`` tokens in all (0: no token limit)."""

    last_turns: int = 0
    token_budget: int = 0


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One page of a session's history, oldest first; ``next_page_token`` empty on the last."""

    turns: list[Turn]
    next_page_token: str = ""
