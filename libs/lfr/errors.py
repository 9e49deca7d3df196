"""The domain's errors: what a pure core raises when it refuses a request, one class per gRPC status.

The cores raise these and never touch grpc; the shared gRPC edge (lfr.runtime.service.ErrorInterceptor) turns
any of them into its status with its message, once, for every service. A core that picks the status at run time
writes ``Refused(code, message)``, which builds the typed error named by the status (``Refused("NOT_FOUND", m)``
is a ``NotFound``), so ``except NotFound`` and ``except Refused`` both see it.
"""

from __future__ import annotations

# Every gRPC status but OK, by name (this module imports no grpc).
STATUS_NAMES = ("CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
                "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")


class Refused(Exception):
    """A request the domain refuses: ``code`` names the gRPC status the edge answers with, ``message`` is what
    the caller reads (a reason it can act on, never data such as images or vectors)."""

    code = "FAILED_PRECONDITION"

    def __new__(cls, *args, **kwargs):
        if cls is Refused and len(args) == 2:
            cls = BY_CODE.get(args[0], Refused)
        return super().__new__(cls)

    def __init__(self, *args):
        """``Subclass(message)``, or ``Refused(code, message)`` (any other gRPC status name, such as one passed
        on from a service this one called, stays a plain Refused with that code)."""
        message = args[-1] if args else ""
        super().__init__(message)
        self.message = message
        if len(args) == 2 and type(self) is Refused:
            if args[0] not in STATUS_NAMES:
                raise ValueError(f"{args[0]!r} is not a gRPC status name")
            self.code = args[0]


class Invalid(Refused):
    """The request itself is wrong: a missing or malformed field."""

    code = "INVALID_ARGUMENT"


class NotFound(Refused):
    code = "NOT_FOUND"


class AlreadyExists(Refused):
    code = "ALREADY_EXISTS"


class FailedPrecondition(Refused):
    """The request is well formed but the state it needs does not hold (a deployment not ACTIVE, a window shut)."""

    code = "FAILED_PRECONDITION"


class PermissionDenied(Refused):
    code = "PERMISSION_DENIED"


class ResourceExhausted(Refused):
    """Over a limit: bytes, pixels, items per request, queued work."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(Refused):
    """A service this one needs cannot be reached now; the caller may retry."""

    code = "UNAVAILABLE"


BY_CODE: dict[str, type[Refused]] = {c.code: c for c in (
    Invalid, NotFound, AlreadyExists, FailedPrecondition, PermissionDenied, ResourceExhausted, Unavailable)}
