"""Measured demand of each VM, from what the agents report with every heartbeat: the
CPU time of its QEMU process, turned into cores used over a sliding window (DRS plans on
smoothed demand, never on one sample)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from ferry.agent.models import AgentVmState, VmInfo

WINDOW_S = 60.0  # smoothing window, as vSphere's DRS averages over minutes
MIN_SPAN_S = 2.0  # fewer seconds of samples than this: no estimate yet


@dataclass(frozen=True)
class Sample:
    at: float
    cpu_s: float
    pid: int | None


class Demand:
    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: dict[str, deque[Sample]] = {}
        self._where: dict[str, str] = {}

    def record(self, host: str, vms: tuple[VmInfo, ...], now: float | None = None) -> None:
        now = time.time() if now is None else now
        for vm in vms:
            if vm.state is not AgentVmState.RUNNING or vm.cpu_time_s is None:
                continue
            samples = self._samples.setdefault(vm.name, deque())
            # Another process (a migration, a restart) starts counting from zero.
            if samples and (self._where.get(vm.name) != host or samples[-1].pid != vm.pid
                            or vm.cpu_time_s < samples[-1].cpu_s):
                samples.clear()
            self._where[vm.name] = host
            samples.append(Sample(now, vm.cpu_time_s, vm.pid))
            while samples and now - samples[0].at > self.window_s:
                samples.popleft()

    def cores(self, vm: str) -> float | None:
        """CPU cores the VM used on average over the window; None before enough samples."""
        samples = self._samples.get(vm)
        if not samples or samples[-1].at - samples[0].at < MIN_SPAN_S:
            return None
        first, last = samples[0], samples[-1]
        return max(0.0, (last.cpu_s - first.cpu_s) / (last.at - first.at))

    def forget(self, vm: str) -> None:
        self._samples.pop(vm, None)
        self._where.pop(vm, None)
