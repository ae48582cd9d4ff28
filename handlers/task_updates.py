"""orchestrator.v1.TaskUpdateService."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from domain.jobs import NoticeOutcome, Verdict
from domain.notice_stream import answer_in_order
from domain.notices import NoticeInput, NoticeProcessor, VerdictTally
from handlers.call_context import Ctx
from handlers.errors import stream_errors, unary_errors
from handlers.event_converters import notice_from_pb
from handlers.framing import raw_request_frames
from handlers.request_context import current_caller
from orchestrator.v1 import task_update_pb2, task_update_pb2_grpc

_REASONS = {
    Verdict.UNKNOWN_JOB: task_update_pb2.REJECT_REASON_UNKNOWN_JOB,
    Verdict.WRONG_TENANT: task_update_pb2.REJECT_REASON_WRONG_TENANT,
    Verdict.WRONG_SERVICE: task_update_pb2.REJECT_REASON_WRONG_SERVICE,
    Verdict.JOB_FINISHED: task_update_pb2.REJECT_REASON_JOB_FINISHED,
    Verdict.MALFORMED: task_update_pb2.REJECT_REASON_MALFORMED,
}


def tally_to_pb(tally: VerdictTally) -> task_update_pb2.PublishUpdatesResponse:
    counts = tally.counts
    return task_update_pb2.PublishUpdatesResponse(
        received=tally.received,
        accepted=counts[Verdict.ACCEPTED],
        duplicate=counts[Verdict.DUPLICATE],
        rejected_unknown_job=counts[Verdict.UNKNOWN_JOB],
        rejected_wrong_tenant=counts[Verdict.WRONG_TENANT],
        rejected_wrong_service=counts[Verdict.WRONG_SERVICE],
        rejected_job_finished=counts[Verdict.JOB_FINISHED],
        rejected_malformed=counts[Verdict.MALFORMED],
        rejected=[
            task_update_pb2.RejectedNotice(
                index=r.index, job_id=r.job_id, reason=_REASONS[r.verdict], detail=r.detail
            )
            for r in tally.rejected
        ],
        rejected_truncated=tally.rejected_truncated,
    )


_VERDICTS = {
    Verdict.ACCEPTED: task_update_pb2.NOTICE_VERDICT_ACCEPTED,
    Verdict.DUPLICATE: task_update_pb2.NOTICE_VERDICT_DUPLICATE,
}


def answer_to_pb(
    index: int, raw: NoticeInput, outcome: NoticeOutcome
) -> task_update_pb2.ReportUpdatesResponse:
    """The ReportUpdates answer to notice ``index``."""
    answer = task_update_pb2.ReportUpdatesResponse(
        index=index,
        job_id=raw.job_id,
        sequence=raw.sequence or 0,
        verdict=_VERDICTS.get(outcome.verdict, task_update_pb2.NOTICE_VERDICT_REJECTED),
        detail=outcome.detail,
    )
    reason = _REASONS.get(outcome.verdict)
    if reason is not None:
        answer.reason = reason
    if outcome.event is not None:
        answer.event_sequence = outcome.event.sequence
    return answer


class TaskUpdateServicer(task_update_pb2_grpc.TaskUpdateServiceServicer):
    """Applies each notice of the stream on its own and answers with the tally
    (PublishUpdates) or notice by notice (ReportUpdates). Every notice is judged against the
    services the caller's key speaks for."""

    def __init__(self, notices: NoticeProcessor) -> None:
        self._notices = notices

    @raw_request_frames
    @unary_errors
    async def PublishUpdates(  # type: ignore[override]  # frames as bytes (handlers.framing)
        self, request_iterator: AsyncIterator[bytes], context: Ctx
    ) -> task_update_pb2.PublishUpdatesResponse:
        """The request frames arrive as bytes (server.decoding): each is parsed here, so a
        frame that is not a valid notice counts as malformed and the stream goes on."""
        caller = current_caller()
        tally = VerdictTally()
        async for batch in _batches(request_iterator):
            raws = [notice_from_frame(frame) for frame in batch]
            outcomes = await self._notices.process_many(raws, caller)
            for raw, outcome in zip(raws, outcomes, strict=True):
                tally.add(raw.job_id, outcome)
        return tally_to_pb(tally)

    @raw_request_frames
    @stream_errors
    async def ReportUpdates(  # type: ignore[override]  # frames as bytes (handlers.framing)
        self, request_iterator: AsyncIterator[bytes], context: Ctx
    ) -> AsyncIterator[task_update_pb2.ReportUpdatesResponse]:
        """Each notice answered as soon as it is applied, in stream order
        (domain.notice_stream). A frame that is not a valid ReportUpdatesRequest, or carries
        no notice, is answered as malformed and the stream goes on."""
        caller = current_caller()
        raws = (report_from_frame(frame) async for frame in request_iterator)
        index = 0
        async for raw, outcome in answer_in_order(self._notices, raws, caller):
            yield answer_to_pb(index, raw, outcome)
            index += 1


def report_from_frame(frame: bytes) -> NoticeInput:
    """One ReportUpdates request frame as a notice (malformed when it does not parse or
    carries none)."""
    try:
        request = task_update_pb2.ReportUpdatesRequest.FromString(frame)
    except Exception:  # DecodeError: truncated, invalid UTF-8, too deep, ...
        return NoticeInput.malformed_frame(f"notice: not a valid {_REPORT_NAME}")
    if not request.HasField("notice"):
        return NoticeInput.malformed_frame("notice: is required")
    return notice_from_pb(request.notice)


_REPORT_NAME = task_update_pb2.ReportUpdatesRequest.DESCRIPTOR.full_name


def notice_from_frame(frame: bytes) -> NoticeInput:
    """One request frame as a notice; a frame that does not parse as a PublishUpdatesRequest
    is a notice that fails validation as malformed."""
    try:
        request = task_update_pb2.PublishUpdatesRequest.FromString(frame)
    except Exception:  # DecodeError: truncated, invalid UTF-8, too deep, ...
        return NoticeInput.malformed_frame(f"notice: not a valid {_REQUEST_NAME}")
    return notice_from_pb(request)


_REQUEST_NAME = task_update_pb2.PublishUpdatesRequest.DESCRIPTOR.full_name


async def _batches(
    requests: AsyncIterator[bytes], max_batch: int = 128
) -> AsyncIterator[list[bytes]]:
    """Group the notices that have already arrived, so notices about different jobs are
    applied concurrently; a batch never waits for more notices than are there."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=max_batch * 4)

    async def pump() -> None:
        try:
            async for request in requests:
                await queue.put(request)
        finally:
            await queue.put(None)

    reader = asyncio.create_task(pump())
    try:
        done = False
        while not done:
            first = await queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < max_batch and not queue.empty():
                item = queue.get_nowait()
                if item is None:
                    done = True
                    break
                batch.append(item)
            yield batch
        await reader  # surfaces a broken request stream
    finally:
        reader.cancel()
