"""Session-wide: what the machine was like, and what was running if CI stopped us.

A CI run that ends on its time limit prints only part of its output. So the header says
what the machine offers (cores, load, memory), the summary says how busy its CPUs were
during the session (steal time shows a host sharing its cores with others), and a SIGTERM
becomes an interrupt that names the test it cut short, so fixtures' teardown (the lab,
the PostgreSQL server) still runs and the next run on the machine starts clean.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType

import pytest

_running: dict[str, object] = {}
_cpu_at_start: list[int] = []


def _cpu_times() -> list[int]:
    """user, nice, system, idle, iowait, irq, softirq, steal (clock ticks, all CPUs)."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return []


def _meminfo(key: str) -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _machine() -> str:
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"machine: {os.cpu_count()} CPUs, load {load}, "
            f"memory available {_meminfo('MemAvailable')}, "
            f"/dev/kvm {'present' if os.path.exists('/dev/kvm') else 'absent'}")


def _interrupt(signum: int, _: FrameType | None) -> None:
    test = _running.get("nodeid", "no test (collection or teardown)")
    began = _running.get("since")
    ran = f", running for {time.monotonic() - began:.0f} s" if isinstance(began, float) \
        else ""
    sys.stderr.write(f"\nsignal {signum} during {test}{ran}\n")
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionstart(session: pytest.Session) -> None:
    _cpu_at_start[:] = _cpu_times()
    signal.signal(signal.SIGTERM, _interrupt)
    # Written even under -q (a report header is not).
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(_machine())


def pytest_runtest_logstart(nodeid: str) -> None:
    _running["nodeid"] = nodeid
    _running["since"] = time.monotonic()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    now = _cpu_times()
    if not now or len(now) != len(_cpu_at_start):
        return
    used = [b - a for a, b in zip(_cpu_at_start, now, strict=True)]
    total = sum(used) or 1
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    shares = ", ".join(f"{n} {100 * u / total:.0f}%" for n, u in zip(names, used, strict=True)
                       if n in ("user", "system", "idle", "iowait", "steal"))
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    terminalreporter.write_line(f"machine during the session: {shares}; load now {load}")
