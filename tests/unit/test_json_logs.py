"""The JSON log formatter: one object per line with the request context and exceptions."""

from __future__ import annotations

import contextvars
import json
import logging
import sys

from domain.identity import Caller, Role
from handlers.request_context import bind_request_context
from server.logging_setup import JsonFormatter, RequestContextFilter, TextFormatter


def record(message: str, *, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("svc", logging.ERROR, __file__, 1, message, None, exc_info)
    rec.__dict__.update(extra)
    return rec


def test_a_line_outside_an_rpc_has_no_context_fields() -> None:
    entry = json.loads(JsonFormatter().format(record("plain")))
    assert entry["message"] == "plain" and entry["level"] == "ERROR"
    assert "request_id" not in entry and "tenant" not in entry


def test_a_line_inside_an_rpc_has_request_id_tenant_method_and_the_exception() -> None:
    def inside_rpc() -> dict[str, object]:
        scope = bind_request_context("rid-7", None, "/orchestrator.v1.SessionService/GetSession")
        scope.caller = Caller(tenant_id="acme", role=Role.CLIENT)
        rec = record("failed", exc=True, job_id="j-1")
        RequestContextFilter().filter(rec)
        return dict(json.loads(JsonFormatter().format(rec)))

    entry = contextvars.copy_context().run(inside_rpc)
    assert entry["request_id"] == "rid-7"
    assert entry["tenant"] == "acme"
    assert entry["method"] == "/orchestrator.v1.SessionService/GetSession"
    assert entry["job_id"] == "j-1"
    assert entry["exception_type"] == "ValueError"
    assert "ValueError: boom" in str(entry["exception"])


def test_text_lines_show_the_request_id_in_brackets() -> None:
    formatter = TextFormatter("%(name)s%(request_tag)s: %(message)s")
    assert formatter.format(record("x", request_id="r-9")) == "svc [r-9]: x"
    assert formatter.format(record("x")) == "svc: x"
