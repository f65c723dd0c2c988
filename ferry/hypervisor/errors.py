"""Failures of QEMU itself on one host, placed in the one error tree so that the HTTP
layer gives each a status (wire.py walks the class's MRO): QEMU failing is the host
failing (502), except asking for a QEMU that does not run, which is the VM's state (409).

    HypervisorError
     ├── QemuStartError         the process did not start
     ├── MonitorError           a QMP call failed (the original on __cause__)
     │    ├── CommandFailed     QEMU answered with an error: error_class, desc
     │    ├── MonitorTimeout    no answer in time
     │    └── MonitorGone       the connection is lost (QEMU exited or closed it)
     └── NotRunning             no QEMU of that VM runs here (also a Conflict: 409)
"""

from __future__ import annotations

from ferry.domain.errors import Conflict, HostUnavailable


class HypervisorError(HostUnavailable):
    code = "hypervisor_error"


class QemuStartError(HypervisorError):
    code = "qemu_start_error"


class MonitorError(HypervisorError):
    code = "monitor_error"


class CommandFailed(MonitorError):
    """QEMU received the command and refused it: the monitor itself works."""

    code = "qmp_command_failed"

    def __init__(self, problem: str, error_class: str, desc: str) -> None:
        super().__init__(problem)
        self.error_class = error_class  # QMP's class: GenericError, DeviceNotFound, ...
        self.desc = desc


class MonitorTimeout(MonitorError):
    code = "qmp_timeout"


class MonitorGone(MonitorError):
    code = "qmp_disconnected"


class NotRunning(Conflict, HypervisorError):
    code = "not_running"


__all__ = ["CommandFailed", "HostUnavailable", "HypervisorError", "MonitorError",
           "MonitorGone", "MonitorTimeout", "NotRunning", "QemuStartError"]
