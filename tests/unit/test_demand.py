"""Measured CPU demand: cores used over a sliding window, reset when the process changes."""

from ferry.agent.models import AgentVmState, VmInfo
from ferry.control.demand import Demand
from ferry.domain.specs import VmSpec

SPEC = VmSpec.model_validate({"name": "web1", "kernel": {"kernel": "/k"}})


def info(cpu_s: float, pid: int = 100, state: AgentVmState = AgentVmState.RUNNING
         ) -> tuple[VmInfo, ...]:
    return (VmInfo(name="web1", uuid=SPEC.uuid, state=state, pid=pid, spec=SPEC,
                   cpu_time_s=cpu_s),)


def test_cores_are_cpu_seconds_per_second_over_the_window() -> None:
    d = Demand(window_s=60)
    assert d.cores("web1") is None  # nothing known yet
    d.record("host1", info(10.0), now=1000.0)
    d.record("host1", info(10.5), now=1001.0)
    assert d.cores("web1") is None  # under two seconds of samples: no estimate
    d.record("host1", info(13.0), now=1006.0)
    assert d.cores("web1") == 0.5
    # old samples leave the window: the estimate follows the recent rate
    d.record("host1", info(73.0), now=1066.0)
    assert d.cores("web1") == 1.0


def test_a_new_process_or_host_starts_counting_afresh() -> None:
    d = Demand()
    d.record("host1", info(100.0), now=0.0)
    d.record("host1", info(104.0), now=4.0)
    assert d.cores("web1") == 1.0
    d.record("host2", info(0.2, pid=200), now=5.0)  # migrated: a new QEMU on host2
    assert d.cores("web1") is None
    d.record("host2", info(2.2, pid=200), now=9.0)
    assert d.cores("web1") == 0.5


def test_paused_or_unmeasured_vms_are_not_sampled() -> None:
    d = Demand()
    d.record("host1", info(1.0, state=AgentVmState.PAUSED), now=0.0)
    d.record("host1", info(9.0, state=AgentVmState.PAUSED), now=8.0)
    assert d.cores("web1") is None
