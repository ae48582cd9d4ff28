"""The retry policy's arithmetic and the decoding of error details from trailers."""

from __future__ import annotations

import random

from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from aorkestra import RetryPolicy
from aorkestra.errors import parse_details, request_id_of


def test_backoff_is_jittered_below_an_exponential_ceiling() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=2.0, max_backoff_s=1.0)
    rng = random.Random(7)
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        delays = [policy.backoff(attempt, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # spread over the range, not a constant
        assert len(set(delays)) > 100


def test_an_advertised_delay_is_waited_in_full_and_one_beyond_the_cap_is_refused() -> None:
    policy = RetryPolicy(max_retry_delay_s=5.0)
    assert all((policy.delay(1, 2.0) or 0) >= 2.0 for _ in range(50))
    assert policy.delay(1, 6.0) is None


def test_retry_after_stands_in_when_there_is_no_retry_info() -> None:
    details = parse_details((("retry-after", "3"),))
    assert details.retry_delay_s == 3.0


def test_retry_info_wins_over_retry_after() -> None:
    status = status_pb2.Status(code=8, message="slow down")
    status.details.add().Pack(
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000))
    )
    trailers = (("grpc-status-details-bin", status.SerializeToString()), ("retry-after", "2"))
    assert parse_details(trailers).retry_delay_s == 1.5


def test_the_request_id_comes_from_trailers_when_headers_lack_it() -> None:
    assert request_id_of((), (("x-request-id", "abc"),)) == "abc"
    assert request_id_of((("x-request-id", "head"),), (("x-request-id", "tail"),)) == "head"
