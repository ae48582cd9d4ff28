"""AdminService calls and rich-status helpers shared by the usage, budget and isolation tests."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.support.servers import admin, bearer


def admin_stub(channel: grpc.aio.Channel) -> admin_pb2_grpc.AdminServiceAsyncStub:
    return admin_pb2_grpc.AdminServiceStub(channel)


async def get_task(channel: grpc.aio.Channel, tenant_id: str, job_id: str) -> admin_pb2.Task:
    reply = await admin_stub(channel).GetTask(
        admin_pb2.GetTaskRequest(tenant_id=tenant_id, job_id=job_id), metadata=admin()
    )
    task: admin_pb2.Task = reply.task
    return task


async def create_service_key(
    channel: grpc.aio.Channel,
    services: Sequence[int],
    role: int = admin_pb2.API_KEY_ROLE_SERVICE,
    tenant_id: str = "platform",
) -> admin_pb2.CreateApiKeyResponse:
    """A real key created through AdminService (a service key speaking for ``services``)."""
    reply: admin_pb2.CreateApiKeyResponse = await admin_stub(channel).CreateApiKey(
        admin_pb2.CreateApiKeyRequest(
            tenant_id=tenant_id,
            role=role,  # type: ignore[arg-type]
            services=services,  # type: ignore[arg-type]
        ),
        metadata=admin(),
    )
    return reply


async def service_key_for(channel: grpc.aio.Channel, *services: int) -> tuple[tuple[str, str]]:
    """Call metadata with a new service key that speaks for ``services`` (none: legacy)."""
    created = await create_service_key(channel, services)
    return (bearer(created.api_key),)


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


async def create_api_key(
    address: str, admin_key: str, tenant_id: str, role: int, timeout_s: float = 20.0
) -> str:
    """A new key of ``tenant_id`` with ``role`` (admin_pb2.API_KEY_ROLE_*), created through
    the AdminService at ``address`` with ``admin_key``; its plaintext."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await admin_stub(channel).CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id=tenant_id, role=role),  # type: ignore[arg-type]
            metadata=(("authorization", f"Bearer {admin_key}"),),
            timeout=timeout_s,
        )
    api_key: str = reply.api_key
    return api_key
