"""Per-RPC metrics that cost next to nothing per call: ``orchestrator_rpcs`` (finished RPCs by
method and status code) and ``orchestrator_rpc_duration_seconds`` (latency by method), and the
same numbers under the standard gRPC names that stock dashboards read (go-grpc-prometheus,
py-grpc-prometheus): ``grpc_server_handled_total`` (labels ``grpc_type``, ``grpc_service``,
``grpc_method``, ``grpc_code``) and ``grpc_server_handling_seconds`` (``grpc_type``,
``grpc_service``, ``grpc_method``).

Every call adds to them, so they are kept as plain numbers per method (``RpcRecorder``) instead
of prometheus_client Counter and Histogram children, whose updates take a lock each (three per
call) and walk the buckets in Python. ``RpcCollector`` turns the numbers into the same metric
families, samples and labels (``_total``/``_created``, ``_bucket``/``_count``/``_sum``/``_created``)
when the registry is scraped.

The recorders are updated by the server's event loop thread only (the edge runs there) and read
by the scrape, which also runs in that loop; the values are plain ints and floats, so a reader
on another thread could at worst see a call counted without its latency yet.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence

import grpc
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

RPCS = "orchestrator_rpcs"
RPCS_HELP = "Finished RPCs by method and status code"
DURATION = "orchestrator_rpc_duration_seconds"
DURATION_HELP = "RPC latency by method (for streams: how long the stream was open)"
# The standard names (go-grpc-prometheus), so stock gRPC dashboards work unchanged.
HANDLED = "grpc_server_handled"
HANDLED_HELP = "Total number of RPCs completed on the server, regardless of success or failure."
HANDLING = "grpc_server_handling_seconds"
HANDLING_HELP = (
    "Histogram of response latency (seconds) of gRPC that had been application-level "
    "handled by the server."
)
HANDLED_LABELS = ("grpc_type", "grpc_service", "grpc_method", "grpc_code")
HANDLING_LABELS = ("grpc_type", "grpc_service", "grpc_method")
# grpc_type values, by (client streams, server streams).
RPC_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}


def split_method(method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` into ``("pkg.Service", "Method")``."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class RpcRecorder:
    """One method's finished calls by code and its latency histogram."""

    __slots__ = (
        "_bounds",
        "buckets",
        "codes",
        "codes_created",
        "created",
        "method",
        "rpc_type",
        "sum",
    )

    def __init__(self, method: str, bounds: Sequence[float], rpc_type: str = "unary") -> None:
        self.method = method
        self.rpc_type = rpc_type
        self._bounds = tuple(bounds)
        # Calls per latency bucket, not cumulative; the last one is +Inf.
        self.buckets = [0] * (len(self._bounds) + 1)
        self.sum = 0.0
        self.created = 0.0  # when the first call was recorded (the series' _created)
        self.codes: dict[grpc.StatusCode, int] = {}
        self.codes_created: dict[grpc.StatusCode, float] = {}

    def observe(self, code: grpc.StatusCode, seconds: float) -> None:
        codes = self.codes
        count = codes.get(code)
        if count is None:
            self._first(code)
            count = 0
        codes[code] = count + 1
        self.buckets[bisect_left(self._bounds, seconds)] += 1
        self.sum += seconds

    def _first(self, code: grpc.StatusCode) -> None:
        now = time.time()
        self.codes_created[code] = now
        if not self.created:
            self.created = now


class RpcCollector(Collector):
    """The recorders of one server, exposed as prometheus metric families."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = tuple(bounds)
        self._les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._recorders: dict[str, RpcRecorder] = {}

    def recorder(self, method: str, rpc_type: str = "unary") -> RpcRecorder:
        """The recorder of ``method`` (the same object for every call of it); ``rpc_type`` is
        its ``grpc_type`` label (unary, client_stream, server_stream, bidi_stream)."""
        recorder = self._recorders.get(method)
        if recorder is None:
            recorder = self._recorders[method] = RpcRecorder(method, self._bounds, rpc_type)
        return recorder

    def describe(self) -> Iterable[Metric]:
        return [
            CounterMetricFamily(RPCS, RPCS_HELP, labels=("method", "code")),
            HistogramMetricFamily(DURATION, DURATION_HELP, labels=("method",)),
            CounterMetricFamily(HANDLED, HANDLED_HELP, labels=HANDLED_LABELS),
            HistogramMetricFamily(HANDLING, HANDLING_HELP, labels=HANDLING_LABELS),
        ]

    def collect(self) -> Iterable[Metric]:
        with_created = getattr(prometheus_metrics, "_use_created", True)
        rpcs = CounterMetricFamily(RPCS, RPCS_HELP, labels=("method", "code"))
        duration = HistogramMetricFamily(DURATION, DURATION_HELP, labels=("method",))
        handled = CounterMetricFamily(HANDLED, HANDLED_HELP, labels=HANDLED_LABELS)
        handling = HistogramMetricFamily(HANDLING, HANDLING_HELP, labels=HANDLING_LABELS)
        for method, recorder in list(self._recorders.items()):
            service, name = split_method(method)
            standard = (recorder.rpc_type, service, name)
            for code, count in list(recorder.codes.items()):
                created = recorder.codes_created[code] if with_created else None
                rpcs.add_metric((method, code.name), count, created=created)
                handled.add_metric((*standard, code.name), count, created=created)
            if not recorder.created:
                continue
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for le, count in zip(self._les, recorder.buckets, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            duration.add_metric((method,), buckets, recorder.sum)
            handling.add_metric(standard, buckets, recorder.sum)
            if with_created:
                duration.samples.append(
                    Sample(f"{DURATION}_created", {"method": method}, recorder.created)
                )
                handling.samples.append(
                    Sample(
                        f"{HANDLING}_created",
                        dict(zip(HANDLING_LABELS, standard, strict=True)),
                        recorder.created,
                    )
                )
        return [rpcs, duration, handled, handling]
