"""What an admin operation can fail with, independent of the wire.

    RegistryError
    ├── NotFound             unknown model or version                 -> NOT_FOUND
    ├── InvalidArgument      a bad value; `problems` lists each one   -> INVALID_ARGUMENT
    ├── FailedPrecondition   the change would leave the fleet broken  -> FAILED_PRECONDITION
    ├── AlreadyExists        e.g. a version that exists, differently  -> ALREADY_EXISTS
    ├── Aborted              lost a compare-and-set race; nothing     -> ABORTED
    │                        was written; re-read and retry
    └── Unavailable          NATS / JetStream cannot be reached or    -> UNAVAILABLE
                             answer now; retry in a few seconds

The gRPC layer maps these to status codes in one place (`grpc_api.STATUS`). A fleet
file's problems are a `fleet.FleetError` instead: Apply answers them in its response.
"""

from __future__ import annotations

__all__ = ["RegistryError", "NotFound", "InvalidArgument", "FailedPrecondition", "AlreadyExists", "Aborted", "Unavailable"]


class RegistryError(Exception):
    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.problems = problems or []


class NotFound(RegistryError):
    pass


class InvalidArgument(RegistryError):
    pass


class FailedPrecondition(RegistryError):
    pass


class AlreadyExists(RegistryError):
    pass


class Aborted(RegistryError):
    pass


class Unavailable(RegistryError):
    pass
