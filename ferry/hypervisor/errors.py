from __future__ import annotations

from ferry.domain.errors import FerryError, HostUnavailable


class HypervisorError(FerryError):
    code = "hypervisor_error"


class QemuStartError(HypervisorError):
    code = "qemu_start_error"


class MonitorError(HypervisorError):
    code = "monitor_error"


class NotRunning(HypervisorError):
    code = "not_running"


__all__ = ["HostUnavailable", "HypervisorError", "MonitorError", "NotRunning", "QemuStartError"]
