"""Power drivers' failures: the host's power could not be switched or read.

A BMC that does not answer is the host being unavailable, so the root derives from
`HostUnavailable` and the API answers 502 (wire.py walks the MRO). The underlying cause
(an OSError, a timeout, ipmitool's exit status) stays on `cause` and `__cause__`.
"""

from __future__ import annotations

from ferry.domain.errors import HostUnavailable


class PowerError(HostUnavailable):
    code = "power_error"

    def __init__(self, problem: str, fix: str = "", *,
                 cause: BaseException | None = None) -> None:
        super().__init__(problem, fix)
        self.cause = cause
        self.__cause__ = cause


class PowerTimeout(PowerError):
    code = "power_timeout"


class PowerUnsupported(PowerError):
    """The driver cannot do this at all (Wake-on-LAN cannot power a host off)."""

    code = "power_unsupported"
