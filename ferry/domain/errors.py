"""The one error tree of Ferry's domain.

    FerryError                  every refusal or failure Ferry reports on purpose
     ├── InvalidInput           malformed or out-of-range values        (HTTP 422)
     ├── NotFound               unknown host, VM, migration, datastore  (HTTP 404)
     ├── Conflict               duplicate name, VM busy, wrong state    (HTTP 409)
     ├── NoCapacity             no host has room for the request        (HTTP 409)
     ├── Incompatible           a migration target fails a check        (HTTP 409)
     ├── HostUnavailable        an agent cannot be reached or failed    (HTTP 502)
     ├── NotLeader              a standby control plane asked to change (HTTP 503)
     ├── Unauthenticated        no valid credentials (token, cert)      (HTTP 401)
     └── Forbidden              credentials valid, privilege missing    (HTTP 403)

Each carries `problem` (what was wrong) and `fix` (what the user can do); the API
maps the class to a status code and the CLI prints both parts.
"""

from __future__ import annotations


class FerryError(Exception):
    code = "ferry_error"

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(problem if not fix else f"{problem} ({fix})")
        self.problem = problem
        self.fix = fix


class InvalidInput(FerryError):
    code = "invalid_input"


class NotFound(FerryError):
    code = "not_found"


class Conflict(FerryError):
    code = "conflict"


class NoCapacity(FerryError):
    code = "no_capacity"


class Incompatible(FerryError):
    code = "incompatible"


class HostUnavailable(FerryError):
    code = "host_unavailable"


class NotLeader(FerryError):
    """A change sent to a control-plane replica that does not hold the leader lease."""

    code = "not_leader"


class Unauthenticated(FerryError):
    code = "unauthenticated"


class Forbidden(FerryError):
    code = "forbidden"


ERRORS_BY_CODE: dict[str, type[FerryError]] = {
    cls.code: cls
    for cls in (FerryError, InvalidInput, NotFound, Conflict, NoCapacity, Incompatible,
                HostUnavailable, NotLeader, Unauthenticated, Forbidden)
}
