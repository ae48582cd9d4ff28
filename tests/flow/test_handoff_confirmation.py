"""The service's first notice confirms a chat's hand-off (docs/adr/0007, amendment of issue
16): when it reaches this process before the confirmation is due, no confirmation is written,
not even at a graceful stop; without a notice the confirmation is written."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from tests.support.flow import Flow, completed, notice, read_to_end


@pytest.fixture
def flow_settings() -> dict[str, Any]:
    # A confirmation is due a sixth of the grace after the submit: 5 s here, so the notices
    # published just after the submit always come first, however loaded the machine.
    return {"handoff_grace": 30.0}


@pytest.fixture
def confirmed(flow: Flow, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The (tenant, job) of every hand-off confirmation the server writes."""
    jobs = flow.running.server.backend.jobs
    written: list[tuple[str, str]] = []
    original = jobs.handoffs_done

    async def recording(done: Sequence[tuple[str, str]]) -> None:
        written.extend(done)
        await original(done)

    monkeypatch.setattr(jobs, "handoffs_done", recording)
    return written


async def test_a_chat_whose_first_notice_came_first_writes_no_confirmation(
    flow: Flow, confirmed: list[tuple[str, str]]
) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    await flow.publish(
        [notice(accepted.job_id, 1, "progress", progress=0.5), completed(accepted.job_id, 2, "hi")]
    )
    await read_to_end(call)

    await flow.running.server.services.chat.drain(5.0)  # writes every confirmation left
    assert confirmed == []


async def test_a_chat_whose_service_sent_nothing_yet_is_confirmed(
    flow: Flow, confirmed: list[tuple[str, str]]
) -> None:
    session_id = await flow.new_session()
    _, accepted = await flow.start_job(session_id)

    await flow.running.server.services.chat.drain(5.0)
    assert confirmed == [("acme", accepted.job_id)]
