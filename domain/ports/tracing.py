"""Tracing as the domain sees it: spans in a job's trace, named by plain values.

The domain never imports OpenTelemetry. A trace context travels as a W3C ``traceparent``
header value (``CallContext.traceparent``; the one a job was accepted under is stored with the
job, ``NewJob.traceparent``). Code that does work for a job (a hand-off, a finalize, a queued
job's turn, a notice) opens a span with :meth:`Tracing.job_span` and passes the traceparent it
yields on, so the calls it makes nest under it. An implementation writes only
:meth:`Tracing.open_span`: ``server.tracing.OtelTracing`` with OpenTelemetry; :data:`NO_TRACING`
(tracing off) opens nothing and yields the traceparent it was given, so the trace context is
still propagated.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

# What a span attribute may hold here.
AttributeValue = str | int | bool
Attributes = Mapping[str, AttributeValue]


class SpanKind(enum.Enum):
    """OpenTelemetry's span kinds (the subset the service opens)."""

    INTERNAL = "internal"
    CLIENT = "client"
    CONSUMER = "consumer"


class Tracing(abc.ABC):
    """Opens spans in a job's trace (see the module docstring)."""

    @property
    @abc.abstractmethod
    def enabled(self) -> bool:
        """Whether spans are recorded (False: every method is a cheap pass-through)."""

    @abc.abstractmethod
    def open_span(self, spec: SpanSpec) -> AbstractContextManager[str | None]:
        """The span of ``spec``, as :meth:`job_span` describes it."""

    def job_span(
        self,
        name: str,
        traceparent: str | None,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes | None = None,
    ) -> AbstractContextManager[str | None]:
        """A span named ``name`` in the trace of ``traceparent`` (a job's stored trace
        context, or the one a CallContext carries), current for the block, which yields the
        traceparent to pass on (the new span's; tracing off: ``traceparent`` itself). Its
        parent is the current span when that is in the same trace already, else
        ``traceparent`` (with a link to the current span, e.g. the server span of the RPC
        doing the work for a job accepted by another one); with neither it starts a trace.
        An exception leaving the block is recorded on the span and sets its status."""
        return self.open_span(SpanSpec(name, traceparent, kind, attributes))

    def record_span(
        self,
        name: str,
        traceparent: str | None,
        start_ns: int,
        *,
        attributes: Attributes | None = None,
    ) -> AbstractContextManager[str | None]:
        """Like :meth:`job_span`, for work already done that only now turned out to belong
        to a job (a notice: the store answers with the job's trace context): the span starts
        at ``start_ns`` (``time.time_ns()``) and ends when the block exits."""
        return self.open_span(SpanSpec(name, traceparent, attributes=attributes, start_ns=start_ns))


@dataclass(frozen=True, slots=True)
class SpanSpec:
    """What a span is opened with: see :meth:`Tracing.job_span` (``start_ns``: when the span
    started, ``time.time_ns()``; None: now)."""

    name: str
    traceparent: str | None
    kind: SpanKind = SpanKind.INTERNAL
    attributes: Attributes | None = None
    start_ns: int | None = None


class NoTracing(Tracing):
    """Tracing off: no spans; the given trace context passes through unchanged."""

    @property
    def enabled(self) -> bool:
        return False

    def open_span(self, spec: SpanSpec) -> AbstractContextManager[str | None]:
        return nullcontext(spec.traceparent)


NO_TRACING: Tracing = NoTracing()
