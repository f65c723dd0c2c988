"""The lab's fault hook: what arms, what fires when, and what a fired fault does (with
fake signals: no process is touched)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import NoReturn

import pytest
from fastapi.routing import APIRoute
from pydantic import ValidationError

from ferry.agent.app import create_app
from ferry.agent.config import AgentConfig
from ferry.agent.faults import (
    KILLED_EXIT_CODE,
    FaultAction,
    FaultRequest,
    Faults,
    FaultStage,
    fired_faults,
    freeze_waker_argv,
)
from ferry.agent.host import HostRuntime
from ferry.domain.errors import Conflict
from ferry.lab.cluster import agent_config
from ferry.lab.config import LabConfig


class Exited(Exception):
    pass


class Recorder:
    def __init__(self) -> None:
        self.kills: list[tuple[int, int]] = []
        self.kills_waited: list[int] = []
        self.spawned: list[list[str]] = []
        self.exits: list[int] = []

    def kill(self, pid: int, sig: int) -> None:
        self.kills.append((pid, sig))

    def exit(self, code: int) -> NoReturn:
        self.exits.append(code)
        raise Exited(code)

    def spawn(self, argv: list[str]) -> None:
        self.spawned.append(argv)


def faults(tmp_path: Path, enabled: bool = True) -> tuple[Faults, Recorder]:
    rec = Recorder()
    return Faults(enabled, tmp_path / "faults.log", kill=rec.kill, exit=rec.exit,
                  spawn=rec.spawn, wait_gone=rec.kills_waited.append), rec


def req(stage: FaultStage, action: FaultAction = FaultAction.KILL_QEMU, vm: str = "vm1",
        **kw: object) -> FaultRequest:
    return FaultRequest.model_validate({"vm": vm, "stage": stage, "action": action, **kw})


def test_off_refuses_to_arm_and_never_fires(tmp_path: Path) -> None:
    f, rec = faults(tmp_path, enabled=False)
    with pytest.raises(Conflict, match="fault hooks are off"):
        f.arm(req(FaultStage.START_OUTGOING))
    f.reach(FaultStage.START_OUTGOING, "vm1", 42)
    assert rec.kills == [] and not (tmp_path / "faults.log").exists()


def test_a_fault_fires_once_for_its_vm_and_stage_only(tmp_path: Path) -> None:
    f, rec = faults(tmp_path)
    f.arm(req(FaultStage.START_OUTGOING))
    f.reach(FaultStage.PREPARE_INCOMING, "vm1", 42)  # another stage
    f.reach(FaultStage.START_OUTGOING, "vm2", 43)  # another VM
    assert rec.kills == []
    f.reach(FaultStage.START_OUTGOING, "vm1", 42)
    f.reach(FaultStage.START_OUTGOING, "vm1", 42)  # one-shot
    assert rec.kills == [(42, signal.SIGKILL)] and rec.kills_waited == [42]
    assert f.armed() == []
    logged = fired_faults(tmp_path / "faults.log")
    assert [r.request.stage for r in logged] == [FaultStage.START_OUTGOING]
    assert logged[0].fired_at is not None


def test_precopy_pass_waits_for_its_pass_and_incoming_poll_counts(tmp_path: Path) -> None:
    f, _ = faults(tmp_path)
    f.arm(req(FaultStage.PRECOPY_PASS, pass_count=3))
    assert f.take(FaultStage.PRECOPY_PASS, "vm1", 1) is None
    assert f.take(FaultStage.PRECOPY_PASS, "vm1", 2) is None
    assert f.take(FaultStage.PRECOPY_PASS, "vm1", 4) is not None  # a later pass fires too
    f.arm(req(FaultStage.INCOMING_POLL, pass_count=2))
    assert f.take(FaultStage.INCOMING_POLL, "vm1") is None
    assert f.take(FaultStage.INCOMING_POLL, "vm1") is not None
    assert f.take(FaultStage.INCOMING_POLL, "vm1") is None


def test_arming_again_replaces_and_disarm_clears(tmp_path: Path) -> None:
    f, _ = faults(tmp_path)
    f.arm(req(FaultStage.RESUME))
    f.arm(req(FaultStage.RESUME, FaultAction.KILL_AGENT))
    assert [r.request.action for r in f.armed()] == [FaultAction.KILL_AGENT]
    f.disarm()
    assert f.armed() == []


def test_kill_agent_exits_at_once(tmp_path: Path) -> None:
    f, rec = faults(tmp_path)
    f.arm(req(FaultStage.POSTCOPY, FaultAction.KILL_AGENT))
    with pytest.raises(Exited):
        f.reach(FaultStage.POSTCOPY, "vm1", 42)
    assert rec.exits == [KILLED_EXIT_CODE] and rec.kills == []
    # logged before acting: the test can see it fired although the agent is gone
    assert len(fired_faults(tmp_path / "faults.log")) == 1


def test_freeze_starts_its_waker_before_stopping_qemu_and_itself(tmp_path: Path) -> None:
    f, rec = faults(tmp_path)
    f.arm(req(FaultStage.INCOMING_POLL, FaultAction.FREEZE, freeze_s=40))
    f.reach(FaultStage.INCOMING_POLL, "vm1", 42)
    me = os.getpid()
    assert rec.spawned == [freeze_waker_argv((42, me), 40)]
    assert rec.kills == [(42, signal.SIGSTOP), (me, signal.SIGSTOP)]
    assert freeze_waker_argv((42, me), 40)[-1] == f"sleep 40.000; kill -CONT 42 {me}"


def test_kill_qemu_without_a_qemu_does_nothing(tmp_path: Path) -> None:
    f, rec = faults(tmp_path)
    f.arm(req(FaultStage.PIVOT))
    f.reach(FaultStage.PIVOT, "vm1", None)
    assert rec.kills == []


@pytest.mark.parametrize("body", [
    {"vm": "vm1", "stage": "resume", "action": "freeze"},  # freeze without a duration
    {"vm": "vm1", "stage": "resume", "action": "kill_qemu", "freeze_s": 3},
    {"vm": "vm1", "stage": "somewhere", "action": "kill_qemu"},
    {"vm": "vm1", "stage": "resume", "action": "reboot"},
    {"vm": "vm1", "stage": "precopy_pass", "action": "kill_qemu", "pass_count": 0},
    {"vm": "../x", "stage": "resume", "action": "kill_qemu"},
])
def test_bad_requests_are_refused(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        FaultRequest.model_validate(body)


def _routes(config: AgentConfig) -> set[str]:
    app = create_app(HostRuntime(config))
    return {r.path for r in app.routes if isinstance(r, APIRoute)}


def test_only_a_lab_that_asks_for_it_gets_the_route(tmp_path: Path) -> None:
    plain = LabConfig.default(tmp_path, 2)
    assert agent_config(plain, "host1").fault_hooks is False
    assert "/v1/faults" not in _routes(agent_config(plain, "host1"))
    assert "/v1/faults" not in _routes(AgentConfig(name="h", run_dir=tmp_path))
    hooked = LabConfig.default(tmp_path, 2, fault_hooks=True)
    assert "/v1/faults" in _routes(agent_config(hooked, "host1"))
