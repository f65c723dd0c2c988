"""The double-run judgement of the integration tests' watcher, on simulated sampling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hypothesis import given
from hypothesis import strategies as st

from tests.integration.watcher import (
    Qemu,
    Reading,
    Sample,
    double_runs,
    runs,
)

PERIOD = 0.05
READ_S = 0.0002  # how long reading one process takes


def executed(spans: Sequence[tuple[float, float]], t: float) -> int:
    """Nanoseconds of vCPU time by time t for a QEMU executing during `spans`."""
    return round(sum(max(0.0, min(end, t) - start) for start, end in spans) * 1e9)


def simulate(execs: Mapping[tuple[str, str], Sequence[tuple[float, float]]], until: float,
             offsets: Mapping[str, float] | None = None) -> list[Sample]:
    """Samples every PERIOD from 0 to `until`, reading each (vm, host)'s QEMU at
    k*PERIOD + its host's offset (the order and skew of reads within one sample)."""
    offsets = offsets or {}
    pids = {key: 100 + i for i, key in enumerate(sorted(execs))}
    samples = []
    for k in range(int(until / PERIOD) + 1):
        readings = {}
        for (vm, host), spans in execs.items():
            t = k * PERIOD + offsets.get(host, 0.0)
            readings[Qemu(vm, host, pids[vm, host])] = Reading(
                t, t + READ_S, executed(spans, t + READ_S / 2))
        samples.append(Sample(readings))
    return samples


def bursts(start: float, end: float, every: float = 0.02, length: float = 0.004
           ) -> list[tuple[float, float]]:
    """A mostly idle vCPU: a short run every `every` seconds."""
    out, t = [], start
    while t < end:
        out.append((t, min(t + length, end)))
        t += every
    return out


offset = st.floats(0.0, PERIOD - 2 * READ_S)


@given(st.floats(0.2, 0.8), st.floats(0.0, 0.01), offset, offset, st.booleans())
def test_a_switchover_is_never_a_double_run_wherever_the_samples_fall(
        switch: float, gap: float, off_a: float, off_b: float, idle: bool) -> None:
    if idle:
        a, b = bursts(0.0, switch), bursts(switch + gap, 1.5)
    else:
        a, b = [(0.0, switch)], [(switch + gap, 1.5)]
    samples = simulate({("vm", "host1"): a, ("vm", "host2"): b}, 1.5,
                       {"host1": off_a, "host2": off_b})
    assert double_runs(samples) == []
    assert {r.host for r in runs(samples)} == {"host1", "host2"}


def test_the_switch_between_reading_one_qemu_and_the_other_is_not_a_double_run() -> None:
    # host1 is read at k*50 ms + 1 ms, host2 at + 3 ms; the guest leaves host1 at
    # 301.5 ms and starts on host2 at 302.5 ms: two consecutive intervals show both
    samples = simulate({("vm", "host1"): [(0.0, 0.3015)], ("vm", "host2"): [(0.3025, 1.0)]},
                       1.0, {"host1": 0.001, "host2": 0.003})
    both = [k for k in range(1, len(samples)) if advanced(samples, k) == {"host1", "host2"}]
    assert both == [6, 7]
    assert double_runs(samples) == []


def advanced(samples: Sequence[Sample], k: int) -> set[str]:
    """The hosts whose QEMU's vCPU time grew from sample k-1 to sample k."""
    return {q.host for q, r in samples[k].readings.items()
            if q in samples[k - 1].readings and r.vcpu_ns > samples[k - 1].readings[q].vcpu_ns}


@given(st.floats(0.1, 0.6), st.floats(0.2, 1.0), offset, offset, st.booleans())
def test_executing_on_two_hosts_at_once_is_caught(
        start: float, length: float, off_a: float, off_b: float, idle: bool) -> None:
    a = bursts(0.0, 2.0) if idle else [(0.0, 2.0)]
    b = bursts(start, start + length) if idle else [(start, start + length)]
    samples = simulate({("vm", "host1"): a, ("vm", "host2"): b}, 2.0,
                       {"host1": off_a, "host2": off_b})
    found = double_runs(samples)
    assert len(found) == 1, found
    (hit,) = found
    assert hit.vm == "vm" and hit.hosts == ("host1", "host2")
    assert hit.start < start + length and hit.end > start  # when it happened
    assert "executed on host1 and host2 at once" in str(hit)


def test_a_fork_back_to_the_source_within_the_window_is_caught() -> None:
    # the target runs, then the source resumes 100 ms later: the guest's history forked
    samples = simulate({("vm", "host1"): [(0.0, 0.5), (0.6, 1.0)],
                        ("vm", "host2"): [(0.5, 0.6)]}, 1.0,
                       {"host1": 0.001, "host2": 0.002})
    assert [d.hosts for d in double_runs(samples)] == [("host1", "host2")]


def test_migrating_there_and_back_is_fine() -> None:
    samples = simulate({("vm", "host1"): [(0.0, 0.5), (1.6, 2.5)],
                        ("vm", "host2"): [(0.503, 1.59)]}, 2.5,
                       {"host1": 0.001, "host2": 0.002})
    assert double_runs(samples) == []


def test_paused_first_seen_and_other_vms_give_no_runs() -> None:
    paused = Qemu("vm", "host2", 7)  # an incoming QEMU: vCPU time never moves
    first = Qemu("vm", "host3", 8)  # appears in the last sample only
    samples = [Sample({paused: Reading(0.0, 0.001, 500)}),
               Sample({paused: Reading(0.05, 0.051, 500)}),
               Sample({paused: Reading(0.1, 0.101, 500), first: Reading(0.1, 0.1, 9)})]
    assert runs(samples) == []
    # two VMs, each on its own host, at the same time
    samples = simulate({("a", "host1"): [(0.0, 1.0)], ("b", "host2"): [(0.0, 1.0)]}, 1.0)
    assert len(runs(samples)) == 2 * 20 and double_runs(samples) == []


def test_a_restarted_qemu_on_the_same_host_is_not_two_hosts() -> None:
    old, new = Qemu("vm", "host1", 7), Qemu("vm", "host1", 9)
    samples = [Sample({old: Reading(0.0, 0.0, 1)}), Sample({old: Reading(0.05, 0.05, 9)}),
               Sample({new: Reading(0.1, 0.1, 1)}), Sample({new: Reading(0.15, 0.15, 5)})]
    assert [r.host for r in runs(samples)] == ["host1", "host1"]
    assert double_runs(samples) == []
