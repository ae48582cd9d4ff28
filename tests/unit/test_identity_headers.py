"""Until API keys land, the caller is taken from x-tenant-id / x-caller-role headers."""

from __future__ import annotations

import grpc
import pytest

from domain.identity import Role
from server.interceptors import IdentityError, caller_from_headers, required_role


def test_public_methods_need_no_identity() -> None:
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role("/grpc.reflection.v1alpha.ServerReflection/X") is None


def test_task_updates_need_the_service_role() -> None:
    assert required_role("/orchestrator.v1.TaskUpdateService/PublishUpdates") is Role.SERVICE
    assert required_role("/orchestrator.v1.SessionService/GetSession") is Role.CLIENT


def test_tenant_role_and_request_id_come_from_headers() -> None:
    caller = caller_from_headers((("x-tenant-id", "acme"), ("x-request-id", "r-1")), Role.CLIENT)
    assert (caller.tenant_id, caller.role, caller.request_id) == ("acme", Role.CLIENT, "r-1")


def test_a_request_id_is_generated_when_missing() -> None:
    assert caller_from_headers((("x-tenant-id", "acme"),), Role.CLIENT).request_id


@pytest.mark.parametrize(
    ("headers", "needed", "code"),
    [
        ((), Role.CLIENT, grpc.StatusCode.UNAUTHENTICATED),
        ((("x-tenant-id", "{bad}"),), Role.CLIENT, grpc.StatusCode.UNAUTHENTICATED),
        ((("x-tenant-id", "acme"),), Role.SERVICE, grpc.StatusCode.PERMISSION_DENIED),
        (
            (("x-tenant-id", "acme"), ("x-caller-role", "service")),
            Role.CLIENT,
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        (
            (("x-tenant-id", "acme"), ("x-caller-role", "root")),
            Role.CLIENT,
            grpc.StatusCode.PERMISSION_DENIED,
        ),
    ],
)
def test_missing_or_wrong_identity_is_refused(
    headers: tuple[tuple[str, str], ...], needed: Role, code: grpc.StatusCode
) -> None:
    with pytest.raises(IdentityError) as caught:
        caller_from_headers(headers, needed)
    assert caught.value.code == code
