"""AdminService calls and rich-status helpers shared by the usage, budget and isolation tests."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.support.servers import admin


def admin_stub(channel: grpc.aio.Channel) -> admin_pb2_grpc.AdminServiceAsyncStub:
    return admin_pb2_grpc.AdminServiceStub(channel)


async def get_task(channel: grpc.aio.Channel, tenant_id: str, job_id: str) -> admin_pb2.Task:
    reply = await admin_stub(channel).GetTask(
        admin_pb2.GetTaskRequest(tenant_id=tenant_id, job_id=job_id), metadata=admin()
    )
    task: admin_pb2.Task = reply.task
    return task


async def tenant_usage(
    channel: grpc.aio.Channel, tenant_id: str, start: str = "", end: str = ""
) -> admin_pb2.GetTenantUsageResponse:
    reply: admin_pb2.GetTenantUsageResponse = await admin_stub(channel).GetTenantUsage(
        admin_pb2.GetTenantUsageRequest(tenant_id=tenant_id, start_date=start, end_date=end),
        metadata=admin(),
    )
    return reply


def quota_subjects(error: grpc.aio.AioRpcError) -> list[str]:
    """The subjects of the google.rpc.QuotaFailure details of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    subjects: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            subjects += [v.subject for v in failure.violations]
    return subjects
