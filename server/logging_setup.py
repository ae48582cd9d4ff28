"""Logging: human-readable text or one JSON object per line.

Every line carries the current RPC's request id (handlers.request_context, bound by the
edge), and while a caller is bound its tenant, and the gRPC method. Both formats read
them through ``RequestContextFilter``; the JSON formatter also reads them itself, so it works on
handlers without the filter.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from handlers.request_context import request_context

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}
_CONTEXT_FIELDS = ("request_id", "tenant", "method")


def _context() -> dict[str, str]:
    scope = request_context()
    if scope is None:
        return {"request_id": "", "tenant": "", "method": ""}
    caller = scope.caller
    return {
        "request_id": scope.request_id,
        "tenant": caller.tenant_id if caller is not None else "",
        "method": scope.method,
    }


class RequestContextFilter(logging.Filter):
    """Adds the current RPC's request id, tenant and method to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context().items():
            setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request context, any ``extra``
    fields, and the formatted exception (with traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = _context()
        for key in _CONTEXT_FIELDS:
            value = getattr(record, key, None) or context[key]
            if value:
                entry[key] = value
        for key, value in record.__dict__.items():
            if key not in _RESERVED and key not in _CONTEXT_FIELDS and value not in ("", None):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
            if record.exc_info[0] is not None:
                entry["exception_type"] = record.exc_info[0].__name__
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger [request id]: message``; the brackets are left out outside RPCs."""

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", "") or _context()["request_id"]
        record.request_tag = f" [{request_id}]" if request_id else ""
        return super().format(record)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            TextFormatter("%(asctime)s %(levelname)-7s %(name)s%(request_tag)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
