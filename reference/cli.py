"""The ``orchestrator-reference`` command: serve the reference services until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from reference.app import ReferenceServices
from reference.config import ConfigError, ReferenceConfig

ENV_HELP = """environment:
  REF_LISTEN_ADDRESS        host:port to bind (default [::]:50061)
  REF_ORCHESTRATOR_ADDRESS  orchestrator to report to (default localhost:50051): every
                            replica comma-separated, or a dns:/// name (round_robin)
  REF_STEP_DELAY            seconds between notices (default 0.05)
  REF_DELTAS                delta notices per query (default 3)
  REF_FAILURE_RATE          fraction of jobs that fail, 0..1 (default 0)
  REF_SILENT_RATE           fraction of jobs that never report, 0..1 (default 0)
  REF_EMBEDDING_DIM         embedding vector size (default 8)
  REF_DEMO_TENANTS          tenants seeded with the demo agents, comma-separated
                            (default demo,other; empty: none)
  REF_PUBLISH_API_KEY       send "authorization: Bearer <key>" instead of the service headers
  REF_LOG_LEVEL             DEBUG, INFO, WARNING or ERROR (default INFO)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="orchestrator-reference",
        description="Reference platform services (Query, Embedding, Conversation, Agent "
        "Management, Tool Registry, Agent Execution, Workflow Engine) that report to the "
        "orchestrator.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    try:
        config = ReferenceConfig.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(ReferenceServices(config).serve_until_signalled())
    return 0


if __name__ == "__main__":
    sys.exit(main())
