"""aorkestra: the Python SDK of the Agent Orchestrator Service.

``AsyncClient`` (asyncio) and ``Client`` (synchronous) give ``sessions``, ``chat``, ``batches``,
``keys`` and ``admin``. Streams resume by themselves; errors are typed (aorkestra.errors).
"""

from aorkestra import errors, events
from aorkestra._transport import RetryNotice
from aorkestra.client import AsyncClient, BatchProgress, JobFailedError, batch_item, read_jsonl
from aorkestra.config import ClientConfig, ConfigError
from aorkestra.errors import HistoryTruncatedError, OrchestratorError
from aorkestra.retry import RetryPolicy
from aorkestra.sync import Client

__all__ = [
    "AsyncClient",
    "BatchProgress",
    "Client",
    "ClientConfig",
    "ConfigError",
    "HistoryTruncatedError",
    "JobFailedError",
    "OrchestratorError",
    "RetryNotice",
    "RetryPolicy",
    "batch_item",
    "errors",
    "events",
    "read_jsonl",
]
__version__ = "0.1.0"
