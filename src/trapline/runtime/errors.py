"""Domain errors, shared by every service.

Domain code raises these; it never imports grpc. The runtime's interceptor maps each class to one
gRPC status code (see ``trapline.runtime.interceptors``). Anything else that escapes a handler becomes
INTERNAL with a generic message for the client and the full traceback in the server log only.
"""

from __future__ import annotations


class TraplineError(Exception):
    """Base class: an error whose message is safe to show to the caller."""

    #: Name of the grpc.StatusCode this error maps to.
    code = "UNKNOWN"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        if self.field:
            return f"{self.field}: {self.message}"
        return self.message


class InvalidArgument(TraplineError):
    """The request is malformed; ``field`` names the offending field (e.g. ``"images[2].uri"``)."""

    code = "INVALID_ARGUMENT"


class NotFound(TraplineError):
    """An id the caller named does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(TraplineError):
    """Creating something whose id is taken."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(TraplineError):
    """The system is not in a state that allows the request (e.g. no predictions yet)."""

    code = "FAILED_PRECONDITION"


class Unavailable(TraplineError):
    """Not ready yet or temporarily unable to serve; the caller may retry."""

    code = "UNAVAILABLE"


class ResourceExhausted(TraplineError):
    """A size or rate limit was hit."""

    code = "RESOURCE_EXHAUSTED"


class PermissionDenied(TraplineError):
    """The request reaches outside what the caller may touch (e.g. a path outside the allowed roots)."""

    code = "PERMISSION_DENIED"


class Cancelled(TraplineError):
    """The operation was cancelled."""

    code = "CANCELLED"


class Aborted(TraplineError):
    """A concurrency conflict; retrying may succeed."""

    code = "ABORTED"
