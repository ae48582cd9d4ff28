"""The `aorkestra` command line, run as the real binary against a real `orchestrator serve`
(configured like `make run`: reference services embedded, demo keys), the interactive chat in
a pseudo-terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from server.key_seeding import DEMO_KEYS
from tests.support.processes import ServerProcess, make_run_server
from tests.support.redis_process import free_port

BIN = Path(sys.executable).parent / "aorkestra"
CLIENT_KEY = next(k.api_key for k in DEMO_KEYS if k.tenant_id == "demo")
ADMIN_KEY = next(k.api_key for k in DEMO_KEYS if k.role.value == "admin")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module; each reference step takes 0.2 s so deltas come apart."""
    process = make_run_server(tmp_path_factory.mktemp("cli") / "server.log", REF_STEP_DELAY="0.2")
    process.start()
    try:
        yield process
    finally:
        process.kill()


def env_for(server: ServerProcess, api_key: str = CLIENT_KEY) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AORKESTRA_")}
    return {**env, "AORKESTRA_ADDRESS": server.address, "AORKESTRA_API_KEY": api_key}


def run(
    server: ServerProcess, *args: str, api_key: str = CLIENT_KEY, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args],
        env=env_for(server, api_key),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_send_json_prints_one_event_per_line_from_accepted_to_completed(
    server: ServerProcess,
) -> None:
    done = run(server, "send", "--json", "What is an agent?")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert "accepted" in lines[0]
    assert "completed" in lines[-1]
    assert any("delta" in line for line in lines)
    assert [int(line["sequence"]) for line in lines] == sorted(
        {int(line["sequence"]) for line in lines}
    )


def test_send_prints_the_answer_and_the_token_count(server: ServerProcess) -> None:
    done = run(server, "send", "What is an agent?")
    assert done.returncode == 0, done.stderr
    assert "Reference answer to: What is an agent?" in done.stdout
    assert "✓ completed" in done.stdout
    assert "tokens" in done.stdout


def test_follow_prints_a_sessions_events_until_it_closes(server: ServerProcess) -> None:
    created = run(server, "sessions", "create")
    session_id = json.loads(created.stdout)["session_id"]
    sent = run(server, "send", "--json", "--session", session_id, "remember this")
    sequences = [int(json.loads(line)["sequence"]) for line in sent.stdout.splitlines()]
    follower = subprocess.Popen(
        [str(BIN), "follow", session_id, "--json", "--after", "1"],
        env=env_for(server),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        seen = [int(json.loads(follower.stdout.readline())["sequence"]) for _ in sequences[1:]]
        closed = run(server, "sessions", "close", session_id)
        assert closed.returncode == 0, closed.stderr
        assert follower.wait(timeout=30) == 0
    finally:
        follower.kill()
    assert seen == sequences[1:]


def test_batch_submit_wait_shows_progress_and_writes_the_results_as_jsonl(
    server: ServerProcess, tmp_path: Path
) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text(
        "".join(
            json.dumps({"custom_id": f"q{n}", "content": f"question {n}"}) + "\n" for n in range(4)
        )
    )
    results = tmp_path / "results.jsonl"
    done = run(server, "batch", "submit", str(items), "--wait", "--output", str(results))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == ["q0", "q1", "q2", "q3"]
    assert {line["state"] for line in lines} == {"BATCH_ITEM_STATE_COMPLETED"}
    assert "4/4" in done.stderr  # the progress bar's counts
    assert "/s" in done.stderr  # ... and its rate
    assert "4 completed, 0 failed" in done.stderr


def test_keys_are_created_listed_and_revoked_and_a_revoked_key_is_refused(
    server: ServerProcess,
) -> None:
    created = run(server, "keys", "create", "--tenant", "clitenant", "--json", api_key=ADMIN_KEY)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert run(server, "sessions", "list", api_key=key["api_key"]).returncode == 0
    listed = run(server, "keys", "list", "--tenant", "clitenant", api_key=ADMIN_KEY)
    assert key["key_id"] in listed.stdout
    revoked = run(server, "keys", "revoke", key["key_id"], api_key=ADMIN_KEY)
    assert revoked.returncode == 0, revoked.stderr
    refused = run(server, "sessions", "list", api_key=key["api_key"])
    assert refused.returncode == 3
    assert "UNAUTHENTICATED" in refused.stderr


def test_a_service_key_is_created_for_the_services_it_speaks_for(server: ServerProcess) -> None:
    created = run(
        server,
        "keys", "create", "--tenant", "platform", "--role", "service",
        "--service", "query", "--service", "embedding", "--json",
        api_key=ADMIN_KEY,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["key"]["services"] == ["SERVICE_QUERY", "SERVICE_EMBEDDING"]


def test_tasks_get_and_usage_read_what_a_message_did(server: ServerProcess) -> None:
    sent = run(server, "send", "--json", "count my tokens")
    job_id = json.loads(sent.stdout.splitlines()[0])["job_id"]
    task = run(server, "tasks", "get", job_id, "--tenant", "demo", api_key=ADMIN_KEY)
    assert task.returncode == 0, task.stderr
    assert json.loads(task.stdout)["state"] == "TASK_STATE_COMPLETED"
    usage = run(server, "usage", "--tenant", "demo", "--json", api_key=ADMIN_KEY)
    assert usage.returncode == 0, usage.stderr
    assert int(json.loads(usage.stdout)["total"]["total_tokens"]) > 0


def test_health_says_serving(server: ServerProcess) -> None:
    done = run(server, "health")
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING")


def test_an_admin_command_with_a_client_key_explains_the_refusal(server: ServerProcess) -> None:
    done = run(server, "keys", "list")
    assert done.returncode == 3
    assert "PERMISSION_DENIED" in done.stderr
    assert "admin key" in done.stderr
    assert "request id:" in done.stderr


def test_a_missing_session_exits_4_with_the_request_id(server: ServerProcess) -> None:
    done = run(server, "sessions", "close", "01a22f98-0000-7000-8000-000000000000")
    assert done.returncode == 4, done.stderr
    assert "NOT_FOUND" in done.stderr
    assert "request id:" in done.stderr


def test_no_api_key_exits_3_and_says_how_to_give_one(server: ServerProcess) -> None:
    done = run(server, "sessions", "list", api_key="")
    assert done.returncode == 3
    assert "AORKESTRA_API_KEY" in done.stderr


def test_an_unreachable_server_exits_6_and_names_the_address(server: ServerProcess) -> None:
    address = f"127.0.0.1:{free_port()}"
    done = run(server, "--address", address, "--timeout", "2", "sessions", "create")
    assert done.returncode == 6
    assert f"is the server running at {address}" in done.stderr


def test_a_half_mtls_pair_is_a_usage_error(server: ServerProcess, tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    done = run(server, "--cert-file", str(cert), "health")
    assert done.returncode == 2
    assert "both a client certificate and its key" in done.stderr


def test_interactive_chat_streams_deltas_and_tool_calls_as_they_happen(
    server: ServerProcess,
) -> None:
    child = pexpect.spawn(
        str(BIN),
        ["chat", "--agent", "tool-bot"],
        env=env_for(server),
        encoding="utf-8",
        timeout=30,
        dimensions=(40, 160),
    )
    try:
        child.expect("you> ")
        child.sendline("What is 6*7?")
        child.expect("tool calculator started")
        child.expect("tool calculator finished")
        child.expect("Reference agent answer")  # the first delta
        # Printed live: the first delta is on the terminal before the job has completed.
        assert "completed" not in child.before + child.after + child.buffer
        child.expect("✓ completed")
        child.expect("you> ")  # the conversation goes on in the same session
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_interactive_chat_ends_on_ctrl_d(server: ServerProcess) -> None:
    child = pexpect.spawn(str(BIN), ["chat"], env=env_for(server), encoding="utf-8", timeout=30)
    try:
        child.expect("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def readme_python_snippet() -> str:
    """The ```python block of the README's "Talk to it" section."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Talk to it", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readmes_sdk_snippet_runs_as_written(server: ServerProcess) -> None:
    snippet = readme_python_snippet().replace("localhost:50051", server.address)
    body = "\n".join(f"    {line}" for line in snippet.splitlines() if line.strip())
    program = f"import asyncio\n\nasync def main() -> None:\n{body}\n\nasyncio.run(main())\n"
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    kinds = [line.split()[0] for line in done.stdout.splitlines()]
    assert kinds[0] == "accepted"
    assert kinds[-1] == "completed"
