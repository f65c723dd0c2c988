"""Failures of QEMU itself on one host, placed in the one error tree so that the HTTP
layer gives each a status (wire.py walks the class's MRO): QEMU failing is the host
failing (502), except asking for a QEMU that does not run, which is the VM's state (409).
"""

from __future__ import annotations

from ferry.domain.errors import Conflict, HostUnavailable


class HypervisorError(HostUnavailable):
    code = "hypervisor_error"


class QemuStartError(HypervisorError):
    code = "qemu_start_error"


class MonitorError(HypervisorError):
    code = "monitor_error"


class NotRunning(Conflict, HypervisorError):
    code = "not_running"


__all__ = ["HostUnavailable", "HypervisorError", "MonitorError", "NotRunning", "QemuStartError"]
