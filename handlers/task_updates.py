"""orchestrator.v1.TaskUpdateService."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from domain.jobs import Verdict
from domain.notices import NoticeProcessor, VerdictTally
from handlers.errors import unary_errors
from handlers.event_converters import notice_from_pb
from orchestrator.v1 import task_update_pb2, task_update_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]

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


class TaskUpdateServicer(task_update_pb2_grpc.TaskUpdateServiceServicer):
    """Applies each notice of the stream on its own and answers with the tally."""

    def __init__(self, notices: NoticeProcessor) -> None:
        self._notices = notices

    @unary_errors
    async def PublishUpdates(
        self,
        request_iterator: AsyncIterator[task_update_pb2.PublishUpdatesRequest],
        context: Ctx,
    ) -> task_update_pb2.PublishUpdatesResponse:
        tally = VerdictTally()
        async for request in request_iterator:
            outcome = await self._notices.process(notice_from_pb(request))
            tally.add(request.job_id, outcome)
        return tally_to_pb(tally)
