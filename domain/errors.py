"""Domain errors. Handlers map each class to one gRPC status code in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field: ``field`` is a dotted path such as ``items[3].content``."""

    field: str
    description: str


class DomainError(Exception):
    """Base class: an expected failure with a message safe to show to the caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    """The request is malformed; ``violations`` names every bad field."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(f"invalid argument: {summary}")
        self.violations = violations

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])


class NotFound(DomainError):
    """The resource does not exist for this tenant (also used for other tenants' resources)."""


class AlreadyExists(DomainError):
    """The resource already exists."""


class FailedPrecondition(DomainError):
    """The resource is not in a state that allows the operation."""


class Unauthenticated(DomainError):
    """The caller did not identify itself."""


class PermissionDenied(DomainError):
    """The caller is identified but not allowed to do this."""


class ResourceExhausted(DomainError):
    """A limit was hit; ``retry_after_s`` says when trying again may succeed."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        quota_subject: str = "",
        quota_description: str = "",
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.quota_subject = quota_subject
        self.quota_description = quota_description


class Aborted(DomainError):
    """The work was cut off by something outside the caller's request: its record is gone
    (the backend lost its data). Start it again."""


class Unavailable(DomainError):
    """A backend (Redis, a downstream service) cannot be reached right now; retry later."""


class DeadlineExceeded(DomainError):
    """The work did not finish in the time allowed."""


class DataLoss(DomainError):
    """A stored record cannot be read (corrupted, or written by an incompatible release)."""
