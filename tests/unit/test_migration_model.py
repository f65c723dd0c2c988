import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.domain.errors import Conflict
from ferry.domain.migration import (
    Iteration,
    Phase,
    Progress,
    SourceStatus,
    StreamOptions,
    abort_reason,
    can_transition,
    completion_deadline_s,
    record_iteration,
    transition,
)

HAPPY = [Phase.PENDING, Phase.CHECKING, Phase.PREPARING_TARGET, Phase.PRECOPY,
         Phase.SWITCHOVER, Phase.RESUMING_TARGET, Phase.COMPLETED]


def test_happy_path_is_allowed() -> None:
    for a, b in itertools.pairwise(HAPPY):
        assert transition(a, b) is b


def test_every_non_terminal_phase_can_roll_back_and_rollback_ends_failed() -> None:
    for phase in Phase:
        if not phase.terminal and phase is not Phase.ROLLING_BACK:
            assert can_transition(phase, Phase.ROLLING_BACK)
    assert transition(Phase.ROLLING_BACK, Phase.FAILED) is Phase.FAILED


def test_skipping_a_stage_is_refused() -> None:
    with pytest.raises(Conflict, match="cannot go from checking to precopy"):
        transition(Phase.CHECKING, Phase.PRECOPY)


@given(st.lists(st.sampled_from(list(Phase)), max_size=30))
def test_random_walks_never_leave_a_terminal_phase(steps: list[Phase]) -> None:
    phase = Phase.PENDING
    for step in steps:
        if can_transition(phase, step):
            phase = step
    if phase.terminal:
        assert not any(can_transition(phase, p) for p in Phase)
    # only COMPLETED or FAILED are terminal, and FAILED is only reached via ROLLING_BACK
    assert {p for p in Phase if p.terminal} == {Phase.COMPLETED, Phase.FAILED}
    assert [p for p in Phase if can_transition(p, Phase.FAILED)] == [Phase.ROLLING_BACK]


def test_cancellable_only_before_switchover_and_never_in_postcopy() -> None:
    assert Phase.PRECOPY.cancellable and Phase.DISK_COPY.cancellable
    assert not Phase.SWITCHOVER.cancellable and not Phase.POSTCOPY.cancellable
    assert not Phase.RESUMING_TARGET.cancellable and not Phase.COMPLETED.cancellable


def test_postcopy_goes_only_forward() -> None:
    assert transition(Phase.PRECOPY, Phase.POSTCOPY) is Phase.POSTCOPY
    assert {p for p in Phase if can_transition(Phase.POSTCOPY, p)} == {
        Phase.COMPLETED, Phase.ROLLING_BACK}
    with pytest.raises(Conflict):
        transition(Phase.POSTCOPY, Phase.SWITCHOVER)


def progress(sync: int, remaining: int) -> Progress:
    return Progress(status=SourceStatus.ACTIVE, dirty_sync_count=sync, remaining_bytes=remaining,
                    dirty_pages_rate=10, mbps=80.0)


def test_record_iteration_records_each_pass_once() -> None:
    its: list[Iteration] = []
    for sync, rem in [(1, 100), (1, 90), (2, 50), (2, 40), (3, 10)]:
        it = record_iteration(its, progress(sync, rem), at_ms=sync * 100)
        if it is not None:
            its.append(it)
    assert [i.number for i in its] == [1, 2, 3]
    assert [i.remaining_bytes for i in its] == [100, 50, 10]
    assert its[0].dirty_rate_bytes_s == 40960 and its[0].throughput_bytes_s == 10_000_000


def test_completion_budget_scales_with_memory() -> None:
    opts = StreamOptions(completion_budget_s_per_gib=800)
    assert completion_deadline_s(2048, opts) == 1600
    assert completion_deadline_s(16, opts) == 60  # a floor for tiny VMs


def test_abort_reasons() -> None:
    opts = StreamOptions(progress_timeout_s=150)
    assert abort_reason(10, 5, 1024, opts) is None
    stalled = abort_reason(200, 151, 1024, opts)
    assert stalled is not None and "no progress" in stalled
    late = abort_reason(900, 1, 1024, opts)
    assert late is not None and "budget" in late


@given(st.floats(0, 10_000), st.floats(0, 10_000), st.integers(32, 65536))
def test_never_aborts_while_shrinking_within_budget(elapsed: float, since: float,
                                                    mem: int) -> None:
    opts = StreamOptions()
    reason = abort_reason(elapsed, since, mem, opts)
    within = elapsed <= completion_deadline_s(mem, opts) and since <= opts.progress_timeout_s
    assert (reason is None) == within
