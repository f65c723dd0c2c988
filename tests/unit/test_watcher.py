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
SRC, DST = Qemu("vm", "host1", 101), Qemu("vm", "host2", 202)


def executed(spans: Sequence[tuple[float, float]], t: float) -> int:
    """Nanoseconds of vCPU time by time t for a QEMU executing during `spans`."""
    return round(sum(max(0.0, min(end, t) - start) for start, end in spans) * 1e9)


def simulate(execs: Mapping[Qemu, Sequence[tuple[float, float]]], until: float,
             offsets: Mapping[str, float] | None = None) -> list[Sample]:
    """Samples every PERIOD from 0 to `until`, reading each QEMU at k*PERIOD + its
    host's offset (the order and skew of reads within one sample)."""
    offsets = offsets or {}
    samples = []
    for k in range(int(until / PERIOD) + 1):
        readings = {}
        for qemu, spans in execs.items():
            t = k * PERIOD + offsets.get(qemu.host, 0.0)
            readings[qemu] = Reading(t, t + READ_S, executed(spans, t + READ_S / 2))
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


def advanced(samples: Sequence[Sample], k: int) -> set[str]:
    """The hosts whose QEMU's vCPU time grew from sample k-1 to sample k."""
    return {q.host for q, r in samples[k].readings.items()
            if q in samples[k - 1].readings and r.vcpu_ns > samples[k - 1].readings[q].vcpu_ns}


offset = st.floats(0.0, PERIOD - 2 * READ_S)


@given(st.floats(0.2, 0.8), st.floats(0.0, 0.01), offset, offset, st.booleans())
def test_a_switchover_is_never_a_double_run_wherever_the_samples_fall(
        switch: float, gap: float, off_a: float, off_b: float, idle: bool) -> None:
    if idle:
        a, b = bursts(0.0, switch), bursts(switch + gap, 1.5)
    else:
        a, b = [(0.0, switch)], [(switch + gap, 1.5)]
    samples = simulate({SRC: a, DST: b}, 1.5, {"host1": off_a, "host2": off_b})
    assert double_runs(samples) == []
    assert {r.qemu for r in runs(samples)} == {SRC, DST}


def test_the_switch_between_reading_one_qemu_and_the_other_is_not_a_double_run() -> None:
    # host1 is read at k*50 ms + 1 ms, host2 at + 3 ms; the guest leaves host1 at
    # 301.5 ms and starts on host2 at 302.5 ms: two consecutive intervals show both
    samples = simulate({SRC: [(0.0, 0.3015)], DST: [(0.3025, 1.0)]}, 1.0,
                       {"host1": 0.001, "host2": 0.003})
    both = [k for k in range(1, len(samples)) if advanced(samples, k) == {"host1", "host2"}]
    assert both == [6, 7]
    assert double_runs(samples) == []


@given(st.floats(0.1, 0.6), st.floats(0.15, 1.0), offset, offset, st.booleans())
def test_executing_on_two_hosts_at_once_is_caught(
        start: float, length: float, off_a: float, off_b: float, idle: bool) -> None:
    a = bursts(0.0, 2.0) if idle else [(0.0, 2.0)]
    b = bursts(start, start + length) if idle else [(start, start + length)]
    samples = simulate({SRC: a, DST: b}, 2.0, {"host1": off_a, "host2": off_b})
    found = double_runs(samples)
    assert len(found) == 1, found
    (hit,) = found
    assert (hit.vm, hit.first, hit.second, hit.hosts) == ("vm", SRC, DST, ("host1", "host2"))
    assert start < hit.proven_at <= start + length + 3 * PERIOD  # soon after it began
    assert "executed on host2 (QEMU 202) and, after that had begun, again on host1" \
        in str(hit)


@given(st.floats(0.1, 5.0))
def test_a_source_resumed_after_the_target_ran_is_caught_however_late(
        after: float) -> None:
    # the target runs for 100 ms and dies, the source resumes `after` seconds later:
    # the guest's history forked (writes made on host2 are lost to the copy on host1)
    samples = simulate({SRC: [(0.0, 0.5), (0.6 + after, 6.0)], DST: [(0.5, 0.6)]}, 6.0,
                       {"host1": 0.001, "host2": 0.002})
    (hit,) = double_runs(samples)
    assert hit.hosts == ("host1", "host2") and 0.6 + after < hit.proven_at


def test_migrating_there_and_back_is_fine() -> None:
    # back on host1 in a new QEMU process, as every migration's target is
    back = Qemu("vm", "host1", 303)
    samples = simulate({SRC: [(0.0, 0.5)], DST: [(0.503, 1.09)], back: [(1.1, 2.5)]}, 2.5,
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
    a, b = Qemu("a", "host1", 1), Qemu("b", "host2", 2)
    samples = simulate({a: [(0.0, 1.0)], b: [(0.0, 1.0)]}, 1.0)
    assert len(runs(samples)) == 2 * 20 and double_runs(samples) == []


def test_a_restarted_qemu_on_the_same_host_is_not_two_hosts() -> None:
    old, new = Qemu("vm", "host1", 7), Qemu("vm", "host1", 9)
    samples = simulate({old: [(0.0, 0.5)], new: [(0.4, 1.0)]}, 1.0)
    assert {r.qemu for r in runs(samples)} == {old, new}
    assert double_runs(samples) == []


def test_a_paused_qemu_woken_by_sigcont_is_not_a_run_but_a_thawed_guest_is() -> None:
    """The freeze fault stops a paused source with SIGSTOP; SIGCONT wakes its vCPU
    thread for some µs. That is no execution; a running guest thawed uses far more."""
    old = Qemu("vm", "host1", 1)
    new = Qemu("vm", "host2", 2)
    samples = [Sample({old: Reading(0.0, 0.001, 0), new: Reading(0.0, 0.001, 0)}),
               Sample({old: Reading(0.05, 0.051, 10_000_000),  # the guest ran here
                       new: Reading(0.05, 0.051, 0)}),
               Sample({old: Reading(0.1, 0.101, 10_000_000, stopped=True),
                       new: Reading(0.1, 0.101, 40_000_000)}),  # switched over
               Sample({old: Reading(0.15, 0.151, 10_017_000),  # thawed: 17 µs, paused
                       new: Reading(0.15, 0.151, 80_000_000)}),
               Sample({old: Reading(0.2, 0.201, 10_017_000),
                       new: Reading(0.2, 0.201, 120_000_000)})]
    assert double_runs(samples) == []
    ran = [*samples[:3], Sample({old: Reading(0.15, 0.151, 10_000_000, stopped=True),
                                 new: Reading(0.15, 0.151, 80_000_000)}),
           Sample({old: Reading(0.2, 0.201, 30_000_000),  # thawed and executing
                   new: Reading(0.2, 0.201, 120_000_000)})]
    assert [d.hosts for d in double_runs(ran)] == [("host1", "host2")]


def test_a_handed_over_qemu_woken_for_a_moment_is_not_a_run_but_executing_is() -> None:
    # the post-copy source's vCPU thread is woken 8 s after the target began (an
    # interrupt raised, work queued on it): 83 µs in one interval, as seen in CI
    def with_late(used_ns: int) -> list[Sample]:
        samples = simulate({SRC: [(0.0, 0.5)], DST: [(0.503, 9.0)]}, 9.0,
                           {"host1": 0.001, "host2": 0.002})
        for k in range(160, len(samples)):  # from 8 s on
            r = samples[k].readings[SRC]
            samples[k] = Sample({**samples[k].readings,
                                 SRC: Reading(r.before, r.after, r.vcpu_ns + used_ns)})
        return samples

    assert double_runs(with_late(83_000)) == []
    (hit,) = double_runs(with_late(1_500_000))
    assert hit.first == SRC and hit.again_ns == 1_500_000 and hit.again_intervals == 1


def test_a_qemu_torn_down_by_the_kernel_is_not_executing() -> None:
    # its last thread, a vCPU thread, frees the guest's RAM as the process exits: ms
    samples = simulate({SRC: [(0.0, 0.5)], DST: [(0.503, 2.0)]}, 2.0,
                       {"host1": 0.001, "host2": 0.002})
    r = samples[30].readings[SRC]
    samples[30] = Sample({**samples[30].readings,
                          SRC: Reading(r.before, r.after, r.vcpu_ns + 18_000_000,
                                       exiting=True)})
    samples[31:] = [Sample({q: x for q, x in s.readings.items() if q != SRC})
                    for s in samples[31:]]
    assert double_runs(samples) == []
    samples[30] = Sample({**samples[30].readings,
                          SRC: Reading(r.before, r.after, r.vcpu_ns + 18_000_000)})
    assert len(double_runs(samples)) == 1
