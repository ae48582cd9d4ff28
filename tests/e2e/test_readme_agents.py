"""The README's "Agents, tools and workflows" section, run as written: its `sh` blocks go to
bash against `orchestrator serve` configured as `make run` (embedded reference services, plans
and the agent check on, demo keys), and the streams it shows in its `text` blocks are what the
commands print, event for event (times aside)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_grpcurl_with_reference import messages
from tests.support.processes import BIN, ServerProcess, make_run_server

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Agents, tools and workflows"
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
# Fields the README's trimmed events leave out (besides the ChatEvent's envelope).
TRIMMED = ("started", "ended", "deadline")
ENVELOPE = ("session_id", "job_id", "sequence", "time", "request_id")


def section_blocks(language: str) -> list[str]:
    """The ```language blocks of the README's section, in order."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"\n{SECTION}\n")
    end = readme.index("\n## ", start + 1)
    return re.findall(rf"```{language}\n(.*?)```", readme[start:end], flags=re.DOTALL)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`make run`: the embedded reference on the Query address (a free port here)."""
    server = make_run_server(tmp_path_factory.mktemp("readme-agents") / "server.log")
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def printed(served: ServerProcess) -> list[dict[str, Any]]:
    """What the section's commands print, one JSON document per reply or event."""
    script = "\n".join(section_blocks("sh")).replace("localhost:50051", served.address)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env={**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return messages(done.stdout)


def trimmed(event: dict[str, Any]) -> dict[str, Any]:
    """An event as the README shows it: its sequence and its kind without step times."""
    (kind,) = [key for key in event if key not in ENVELOPE]
    body = {k: v for k, v in event[kind].items() if k not in TRIMMED}
    return {"sequence": event["sequence"], kind: body}


def timeless(value: Any) -> str:
    return TIME.sub("<time>", json.dumps(value, sort_keys=True))


def streams(printed: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The events printed, one list per session in the order the sessions first appear."""
    by_session: dict[str, list[dict[str, Any]]] = {}
    for document in printed:
        if "event" in document:
            event = document["event"]
            by_session.setdefault(event["session_id"], []).append(event)
    return list(by_session.values())


def test_the_streams_shown_are_what_the_commands_print(printed: list[dict[str, Any]]) -> None:
    shown = section_blocks("text")
    tool_bot, research_flow = streams(printed)
    assert len(shown) == 2
    for block, events in zip(shown, (tool_bot, research_flow), strict=True):
        lines = [json.loads(line) for line in block.splitlines() if line.startswith("{")]
        assert lines, block
        actual = {event["sequence"]: trimmed(event) for event in events}
        for line in lines:
            assert timeless(actual[line["sequence"]]) == timeless(line)
    # The shown tool-bot stream is the whole stream; the research-flow one its second message.
    assert len(tool_bot) == len(section_blocks("text")[0].strip().splitlines())
    assert research_flow[-1]["sequence"] == "30"


def test_history_lists_the_turns_and_get_task_the_plan(printed: list[dict[str, Any]]) -> None:
    (history,) = [d for d in printed if "turns" in d]
    research = streams(printed)[1]
    jobs = [e["job_id"] for e in research if "completed" in e]
    answers = [e["completed"]["result"]["text"] for e in research if "completed" in e]
    assert [(t["role"], t["job_id"], t["content"]) for t in history["turns"]] == [
        ("TURN_ROLE_USER", jobs[0], "agents plan their tool calls"),
        ("TURN_ROLE_ASSISTANT", jobs[0], answers[0]),
        ("TURN_ROLE_USER", jobs[1], "how do agents plan?"),
        ("TURN_ROLE_ASSISTANT", jobs[1], answers[1]),
    ]

    (task,) = [d["task"] for d in printed if "task" in d]
    tool_bot = streams(printed)[0]
    assert task["job_id"] == tool_bot[0]["job_id"]
    assert (task["agent_id"], task["agent_kind"], task["agent_version"]) == (
        "tool-bot",
        "tool_agent",
        "1",
    )
    assert task["state"] == "TASK_STATE_COMPLETED"
    assert [(step["name"], step["state"]) for step in task["plan"]] == [
        (name, "PLAN_STEP_STATE_DONE")
        for name in (
            "load_agent",
            "load_history",
            "resolve_tools",
            "run",
            "internal_call",
            "append_history",
        )
    ]
