"""The README's examples that a new user found broken, run as written (marked
``<!-- example: NAME -->`` above their code block) against `orchestrator serve` configured as
`make run` starts it: only the address is replaced by the test server's."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from tests.e2e.test_grpcurl import DEMO
from tests.e2e.test_grpcurl_with_reference import messages
from tests.support.processes import BIN, ServerProcess, make_run_server
from tests.support.redis_process import free_port

README = Path(__file__).resolve().parents[2] / "README.md"
DEMO_CLIENT = next(key for (tenant, _), key in DEMO.items() if tenant == "demo")


def example(name: str) -> str:
    """The code block under ``<!-- example: name -->``."""
    found = re.search(
        rf"<!-- example: {re.escape(name)} -->\n```\w*\n(.*?)\n```", README.read_text(), re.S
    )
    assert found, f"no example {name} in the README"
    return found.group(1)


def run_sh(server: ServerProcess, script: str, cwd: Path, **env: str) -> str:
    script = script.replace("localhost:50051", server.address)
    done = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=cwd,
        env={
            **os.environ,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "DEMO": f"authorization: Bearer {DEMO_CLIENT}",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def create_session(server: ServerProcess, cwd: Path) -> str:
    created = run_sh(
        server,
        """grpcurl -plaintext -H "$DEMO" -d '{"agent_id": "support-bot"}' \\
          localhost:50051 orchestrator.v1.SessionService/CreateSession""",
        cwd,
    )
    session_id: str = json.loads(created)["session"]["session_id"]
    return session_id


def events(path: Path) -> list[dict[str, Any]]:
    return [m["event"] for m in messages(path.read_text())]


def test_the_cancel_example_cancels_a_job_of_a_slow_reference(tmp_path: Path) -> None:
    server = make_run_server(tmp_path / "server.log", REF_STEP_DELAY="2")
    server.start()
    try:
        session_id = create_session(server, tmp_path)
        out = run_sh(server, example("cancel-job"), tmp_path, S=session_id)
    finally:
        server.kill()
    assert out.strip().splitlines()[-1] == "1"
    sent = events(tmp_path / "events.json")
    assert "accepted" in sent[0]
    assert "cancelled" in sent[-1]


def test_the_embedding_cache_example_misses_first_then_hits(tmp_path: Path) -> None:
    server = make_run_server(tmp_path / "server.log")
    server.start()
    try:
        # What the batch example embeds, as a new user following the README would have.
        run_sh(
            server,
            """grpcurl -plaintext -H "$DEMO" -d "$BODY" \\
              localhost:50051 orchestrator.v1.ChatService/SendMessage""",
            tmp_path,
            BODY=json.dumps(
                {
                    "session_id": create_session(server, tmp_path),
                    "content": "embed me",
                    "kind": "WORK_KIND_EMBEDDING",
                }
            ),
        )
        run_sh(server, example("embedding-cache"), tmp_path)
    finally:
        server.kill()
    first, second = events(tmp_path / "first.json"), events(tmp_path / "second.json")
    assert first[-1]["completed"].get("usage"), first[-1]
    assert not second[-1]["completed"].get("usage"), second[-1]
    assert first[-1]["completed"]["result"] == second[-1]["completed"]["result"]
    assert len(second) == 2  # accepted, completed: the service was not called


def test_the_websocket_example_authenticates_with_the_authorization_header(
    tmp_path: Path,
) -> None:
    ws_address = f"127.0.0.1:{free_port()}"
    server = make_run_server(tmp_path / "server.log", ORCH_WS_ADDRESS=ws_address)
    server.start()
    try:
        script = example("websocket").replace("localhost:8000", ws_address)
        done = subprocess.run(
            [str(BIN / "python"), "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        server.kill()
    assert done.returncode == 0, done.stderr
    assert "'verdict': 'unknown_job'" in done.stdout
