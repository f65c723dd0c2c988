"""Lab-only fault injection: break an agent at a named stage of a migration or disk move.

Off unless the agent's config says `fault_hooks: true` (only `ferry/lab` ever writes
that, and only when its LabConfig asks for it): without it `HostRuntime.faults` is inert
and the agent has no /v1/faults route. When on, the control plane's certificate (the
agent's mutual TLS and its only-the-control-plane rule still apply) can arm a one-shot
fault for one VM: when this agent reaches `stage` for that VM it performs `action`:

- KILL_QEMU: SIGKILL the VM's QEMU on this host;
- KILL_AGENT: the agent itself exits at once (os._exit, no cleanup, like a crash);
- FREEZE: SIGSTOP the VM's QEMU and the agent for `freeze_s`, then SIGCONT both (a
  detached `sh` started first does the waking, since the agent cannot).

Each fired fault is appended to `<run_dir>/faults.log` before it acts, so a test can tell
a fault that fired from one that was never reached. Link cuts are not done here: a test
cuts a host's link itself (ferry.lab.net.set_link).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import NoReturn

from fastapi import FastAPI
from pydantic import Field, model_validator

from ferry.domain.errors import Conflict
from ferry.domain.specs import Frozen, Name

log = logging.getLogger("ferry.agent.faults")

KILLED_EXIT_CODE = 137  # what a SIGKILLed agent would report


class FaultStage(StrEnum):
    """Where in the agent a fault fires (each for the VM it was armed for)."""

    # destination: its QEMU was started paused and listens; the agent has not answered
    PREPARE_INCOMING = "prepare_incoming"
    # destination: asked about the VM while it is receiving (every pre-copy tick)
    INCOMING_POLL = "incoming_poll"
    # source: asked to start mirroring disks into the destination's NBD (DISK_COPY)
    DISK_MIRRORS = "disk_mirrors"
    # source: before QEMU is told to `migrate` (the stream has not started)
    START_OUTGOING = "start_outgoing"
    # source: a progress poll that sees pre-copy pass `pass_count` or later
    PRECOPY_PASS = "precopy_pass"
    # source: a progress poll that sees the stream completed (SWITCHOVER)
    SOURCE_COMPLETED = "source_completed"
    # source: right after QEMU was told to switch to post-copy
    POSTCOPY = "postcopy"
    # destination: asked to run the paused VM, before `cont` (the switch is recorded)
    RESUME = "resume"
    # destination: after `cont`, before the agent answers (the guest runs there)
    RESUMED = "resumed"
    # destination that never ran: asked for its RAM's chunk digests (memory check)
    RAM_DIGESTS = "ram_digests"
    # a VM's QEMU was just started (an ordinary start or an HA restart), before the
    # agent answers the control plane
    STARTED = "started"
    # relocation: a mirror poll that sees the job ready (in sync)
    MIRROR_READY = "mirror_ready"
    # relocation: before the pivot (job-complete)
    PIVOT = "pivot"


class FaultAction(StrEnum):
    KILL_QEMU = "kill_qemu"
    KILL_AGENT = "kill_agent"
    FREEZE = "freeze"
    # RAM_DIGESTS only: make a few pages of the copy stale, as a lost write does
    CORRUPT_RAM = "corrupt_ram"


class FaultRequest(Frozen):
    """One fault to arm: for VM `vm`, at `stage`, do `action` (once)."""

    vm: Name
    stage: FaultStage
    action: FaultAction
    # PRECOPY_PASS fires at the first poll that sees this pass; INCOMING_POLL at the
    # n-th poll of the receiving VM. Other stages fire the first time.
    pass_count: int = Field(default=1, ge=1, le=10_000)
    # FREEZE only: how long agent and QEMU stay stopped.
    freeze_s: float | None = Field(default=None, gt=0, le=600)

    @model_validator(mode="after")
    def _freeze_needs_a_duration(self) -> FaultRequest:
        if (self.action is FaultAction.FREEZE) != (self.freeze_s is not None):
            raise ValueError("freeze_s is required for the freeze action and only for it")
        return self


class FaultRecord(Frozen):
    """A fault as the agent holds it: armed, or fired (with when)."""

    request: FaultRequest
    fired_at: float | None = None


def freeze_waker_argv(pids: tuple[int, ...], seconds: float) -> list[str]:
    """A detached shell that sends SIGCONT to `pids` after `seconds`."""
    return ["/bin/sh", "-c", f"sleep {seconds:.3f}; kill -CONT {' '.join(map(str, pids))}"]


def _spawn_detached(argv: list[str]) -> None:
    subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_gone(pid: int, timeout_s: float = 5.0) -> None:
    """Until `pid` has exited (a zombie or reaped): its files, the QMP socket among
    them, are closed by then, so the agent's next QMP command fails for certain."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
            return
        time.sleep(0.01)


class Faults:
    """The armed faults of one agent and the hook its HostRuntime calls at each stage.

    `kill`, `exit`, `spawn` and `wait_gone` are os.kill, os._exit, a detached Popen and
    a wait for a process's exit; tests pass
    fakes to exercise the decisions without signals."""

    def __init__(self, enabled: bool, log_file: Path | None = None,
                 kill: Callable[[int, int], None] = os.kill,
                 exit: Callable[[int], NoReturn] = os._exit,
                 spawn: Callable[[list[str]], None] = _spawn_detached,
                 wait_gone: Callable[[int], None] = _wait_gone) -> None:
        self.enabled = enabled
        self._wait_gone = wait_gone
        self.log_file = log_file
        self._kill = kill
        self._exit = exit
        self._spawn = spawn
        self._armed: dict[tuple[str, FaultStage], FaultRequest] = {}
        self._polls: dict[tuple[str, FaultStage], int] = {}
        self.fired: list[FaultRecord] = []

    def arm(self, req: FaultRequest) -> list[FaultRecord]:
        if not self.enabled:
            raise Conflict("fault hooks are off on this agent",
                           "only a lab agent with fault_hooks on takes faults")
        self._armed[(req.vm, req.stage)] = req
        self._polls.pop((req.vm, req.stage), None)
        return self.armed()

    def disarm(self) -> None:
        self._armed.clear()
        self._polls.clear()

    def armed(self) -> list[FaultRecord]:
        return [FaultRecord(request=r) for r in self._armed.values()]

    def take(self, stage: FaultStage, vm: str, pass_count: int = 0) -> FaultRequest | None:
        """The fault armed for (vm, stage) if this moment fires it (removed: one-shot)."""
        key = (vm, stage)
        req = self._armed.get(key)
        if req is None:
            return None
        if stage is FaultStage.PRECOPY_PASS and pass_count < req.pass_count:
            return None
        if stage is FaultStage.INCOMING_POLL:
            seen = self._polls[key] = self._polls.get(key, 0) + 1
            if seen < req.pass_count:
                return None
        del self._armed[key]
        self._polls.pop(key, None)
        return req

    def reach(self, stage: FaultStage, vm: str, qemu_pid: int | None,
              pass_count: int = 0, corrupt: Callable[[], None] | None = None) -> None:
        """The hook: called by the agent when it reaches `stage` for `vm`; `corrupt`
        does CORRUPT_RAM where the stage offers it."""
        if not self.enabled:
            return
        req = self.take(stage, vm, pass_count)
        if req is not None:
            self.fire(req, qemu_pid, corrupt)

    def fire(self, req: FaultRequest, qemu_pid: int | None,
             corrupt: Callable[[], None] | None = None) -> None:
        record = FaultRecord(request=req, fired_at=time.time())
        self.fired.append(record)
        log.warning("fault: %s at %s for VM %s (QEMU pid %s)", req.action, req.stage,
                    req.vm, qemu_pid)
        if self.log_file is not None:
            with open(self.log_file, "a") as f:
                f.write(record.model_dump_json() + "\n")
                f.flush()
                os.fsync(f.fileno())
        if req.action is FaultAction.CORRUPT_RAM:
            if corrupt is not None:
                corrupt()
            return
        if req.action is FaultAction.KILL_AGENT:
            self._exit(KILLED_EXIT_CODE)
        if req.action is FaultAction.KILL_QEMU:
            if qemu_pid is not None:
                self._kill(qemu_pid, signal.SIGKILL)
                # "QEMU died at this stage": it must not take the agent's next command.
                self._wait_gone(qemu_pid)
            return
        assert req.freeze_s is not None  # FaultRequest's validator
        me = os.getpid()
        pids = (me,) if qemu_pid is None else (qemu_pid, me)
        self._spawn(freeze_waker_argv(pids, req.freeze_s))
        if qemu_pid is not None:
            self._kill(qemu_pid, signal.SIGSTOP)
        self._kill(me, signal.SIGSTOP)  # returns once the waker sent SIGCONT


def fired_faults(log_file: Path) -> list[FaultRecord]:
    """The faults an agent logged as fired (for tests and the soak's census)."""
    try:
        lines = log_file.read_text().splitlines()
    except OSError:
        return []
    return [FaultRecord.model_validate_json(line) for line in lines if line.strip()]


def add_routes(app: FastAPI, faults: Faults) -> None:
    """POST /v1/faults arms one, GET lists the armed ones, DELETE disarms all. Called
    only for an agent whose config has fault_hooks on."""

    @app.post("/v1/faults")
    async def arm_fault(body: FaultRequest) -> list[FaultRecord]:
        return faults.arm(body)

    @app.get("/v1/faults")
    async def armed_faults() -> list[FaultRecord]:
        return faults.armed()

    @app.delete("/v1/faults", status_code=204)
    async def disarm_faults() -> None:
        faults.disarm()
