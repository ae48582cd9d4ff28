"""Running jobs: one asyncio task per job id, idempotent submits, cancellation."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

from orchestrator.v1 import common_pb2, task_update_pb2
from reference.reporter import Notice, Reporter

log = logging.getLogger(__name__)

# How many finished job ids are remembered so a late repeated submit does not rerun the job.
REMEMBERED_JOBS = 100_000


class NoticeWriter:
    """Builds one job's notices with the fields every notice carries and the next sequence."""

    def __init__(
        self,
        reporter: Reporter,
        service: common_pb2.Service.ValueType,
        job_id: str,
        tenant_id: str,
        agent_id: str,
    ) -> None:
        self._reporter = reporter
        self.job_id = job_id
        self.sequence = 0
        # The fields every notice of the job carries.
        self._carried: dict[str, Any] = {
            "service": service,
            "job_id": job_id,
            "tenant_id": tenant_id,
            "agent_id": agent_id,
        }

    def _send(self, event: task_update_pb2.NoticeEvent.ValueType, **fields: Any) -> None:
        self.sequence += 1
        self._reporter.publish(
            Notice(event=event, sequence=self.sequence, **self._carried, **fields)
        )

    def progress(self, fraction: float, status: str) -> None:
        self._send(task_update_pb2.NOTICE_EVENT_PROGRESS, progress=fraction, status_message=status)

    def delta(self, text: str) -> None:
        self._send(task_update_pb2.NOTICE_EVENT_DELTA, delta=text)

    def completed(self, result: common_pb2.JobResult, usage: common_pb2.TokenUsage) -> None:
        self._send(task_update_pb2.NOTICE_EVENT_COMPLETED, result=result, usage=usage)

    def tool_call(
        self,
        call_id: str,
        name: str,
        phase: common_pb2.StepPhase.ValueType,
        arguments_json: str,
        *,
        result_summary: str = "",
        error: common_pb2.JobError | None = None,
    ) -> None:
        call = common_pb2.ToolCall(
            call_id=call_id,
            name=name,
            phase=phase,
            arguments_json=arguments_json,
            result_summary=result_summary,
            error=error,
        )
        self._send(task_update_pb2.NOTICE_EVENT_TOOL_CALL, tool_call=call)

    def step(
        self,
        index: int,
        name: str,
        phase: common_pb2.StepPhase.ValueType,
        *,
        summary: str = "",
        error: common_pb2.JobError | None = None,
    ) -> None:
        step = common_pb2.WorkflowStep(
            step_id=name, name=name, index=index, phase=phase, summary=summary, error=error
        )
        self._send(task_update_pb2.NOTICE_EVENT_STEP, step=step)

    def failed(self, code: str, message: str, *, retryable: bool) -> None:
        error = common_pb2.JobError(code=code, message=message, retryable=retryable)
        self._send(task_update_pb2.NOTICE_EVENT_FAILED, error=error)


class JobTable:
    """Job id -> task, plus which tenant owns it. A job id runs at most once."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._owners: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, job_id: str, tenant_id: str, job: Coroutine[Any, Any, None]) -> bool:
        """Run ``job`` under ``job_id`` unless that id was seen before (then close it unused)."""
        if job_id in self._owners:
            job.close()
            return False
        self._owners[job_id] = tenant_id
        while len(self._owners) > REMEMBERED_JOBS:
            self._owners.popitem(last=False)
        task = asyncio.get_running_loop().create_task(job, name=f"job-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda done: self._finished(job_id, done))
        return True

    def _finished(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("job %s crashed", job_id, exc_info=task.exception())

    def cancel(self, job_id: str, tenant_id: str) -> bool:
        """Stop a running job of this tenant; False for unknown, finished or foreign jobs."""
        task = self._tasks.get(job_id)
        if task is None or task.done() or self._owners.get(job_id) != tenant_id:
            return False
        task.cancel()
        self._tasks.pop(job_id, None)
        return True

    async def close(self) -> None:
        """Cancel every running job and wait for them to end."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
