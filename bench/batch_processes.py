"""The processes of the batch benchmark, each in its own OS process so its memory is its own:

- the orchestrator (``python -m bench.batch_processes REDIS_URL QUERY_ADDRESS PORT
  CONCURRENCY``): a real OrchestratorServer on a private Redis with the batch worker embedded,
  accepting the deterministic test keys (tests.support.keys); prints ``PORT <n>`` once serving
  and stops on SIGTERM;
- optionally ``orchestrator worker`` processes sharing the batch queue;
- the reference Query/Embedding services (``orchestrator-reference``, REF_* settings), reporting
  to that orchestrator with the test service key.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from bench import machine
from bench.processes import BIN, ROOT, Child, bench_settings, serve_until_sigterm, start_serving
from domain.identity import Role
from server.config import Settings
from tests.support.keys import api_key_for


def orchestrator_settings(
    redis_url: str, query_address: str, port: int, concurrency: int
) -> Settings:
    """A server with the batch worker on and nothing that would throttle the benchmark."""
    return bench_settings(
        redis_url,
        listen_address=f"127.0.0.1:{port}",
        query_service_address=query_address,
        embedding_service_address=query_address,
        batch_worker_enabled=True,
        batch_worker_concurrency=concurrency,
        batch_worker_poll=0.2,
    )


async def serve(redis_url: str, query_address: str, port: int, concurrency: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("server.app").setLevel(logging.ERROR)
    await serve_until_sigterm(orchestrator_settings(redis_url, query_address, port, concurrency))


def start_orchestrator(redis_url: str, query_address: str, port: int, concurrency: int) -> Child:
    args = ["bench.batch_processes", redis_url, query_address, str(port), str(concurrency)]
    child, _ = start_serving(args, "orchestrator")
    return child


def start_reference(
    listen_port: int,
    orchestrator_address: str,
    *,
    step_delay_s: float,
    deltas: int,
    failure_rate: float,
) -> Child:
    """``orchestrator-reference`` publishing with the test service key (then
    ``await wait_serving(child, address)``)."""
    env = {
        **os.environ,
        "REF_LISTEN_ADDRESS": f"127.0.0.1:{listen_port}",
        "REF_ORCHESTRATOR_ADDRESS": orchestrator_address,
        "REF_STEP_DELAY": str(step_delay_s),
        "REF_DELTAS": str(deltas),
        "REF_FAILURE_RATE": str(failure_rate),
        "REF_SILENT_RATE": "0",
        "REF_PUBLISH_API_KEY": api_key_for("platform", Role.SERVICE),
        "REF_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen([str(BIN / "orchestrator-reference")], env=env, cwd=ROOT)
    return Child(proc, "reference services")


def start_worker(redis_url: str, query_address: str, concurrency: int) -> Child:
    """``orchestrator worker``: batch items only, on the same Redis queue as the server."""
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "ORCH_QUERY_SERVICE_ADDRESS": query_address,
        "ORCH_EMBEDDING_SERVICE_ADDRESS": query_address,
        "ORCH_BATCH_WORKER_POLL": "0.2",
        "ORCH_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [str(BIN / "orchestrator"), "worker", "--concurrency", str(concurrency)], env=env, cwd=ROOT
    )
    return Child(proc, "orchestrator worker")


def main(argv: list[str]) -> int:
    redis_url, query_address, port, concurrency = argv
    machine.run(serve(redis_url, query_address, int(port), int(concurrency)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
