"""The convergence policies, as pure functions of a snapshot."""

import math

from hypothesis import given
from hypothesis import strategies as st

from ferry.domain.convergence import (
    AUTOTUNED_SEND_BUFFER,
    BACKLOG_MARGIN_MS,
    ActionKind,
    ConvergenceState,
    decide,
    initial_downtime_ms,
    low_downtime_ms,
    nova_downtime_ms,
    projected_finish_s,
)
from ferry.domain.migration import (
    Iteration,
    PolicyKind,
    Progress,
    SourceStatus,
    StreamOptions,
    completion_deadline_s,
)

MIB = 1 << 20


def its(*remaining_mib: int) -> tuple[Iteration, ...]:
    return tuple(Iteration(number=i + 1, at_ms=i * 1000, remaining_bytes=r * MIB,
                           transferred_bytes=0, dirty_rate_bytes_s=0, throughput_bytes_s=0,
                           expected_downtime_ms=None) for i, r in enumerate(remaining_mib))


def state(remaining_mib: int = 100, dirty_mib_s: float = 10, link_mib_s: float = 25,
          iterations: tuple[Iteration, ...] = its(256, 120), elapsed: float = 10,
          since: float = 0, downtime: int = 300, throttle: int = 0, postcopy: bool = False,
          memory: int = 256, since_raise: float | None = None,
          capped: bool = True) -> ConvergenceState:
    progress = Progress(status=SourceStatus.ACTIVE, remaining_bytes=remaining_mib * MIB,
                        dirty_pages_rate=int(dirty_mib_s * MIB / 4096),
                        mbps=link_mib_s * MIB * 8 / 1e6)
    return ConvergenceState(elapsed_s=elapsed, since_progress_s=since, memory_mib=memory,
                            iterations=iterations, progress=progress, downtime_ms=downtime,
                            throttle_pct=throttle, postcopy=postcopy,
                            since_raise_s=since_raise, backlog_capped=capped)


FERRY = StreamOptions()


def test_ferry_caps_the_stream_backlog_once_the_first_pass_measured_the_link() -> None:
    first = decide(state(iterations=its(256), capped=False), FERRY)
    assert first.kind is ActionKind.CONTINUE  # nothing measured yet
    action = decide(state(capped=False), FERRY)
    assert action.kind is ActionKind.CAP_BACKLOG and action.value == BACKLOG_MARGIN_MS
    assert decide(state(capped=True), FERRY).kind is not ActionKind.CAP_BACKLOG
    # A link so fast that Linux's own buffer holds less than the margin: nothing to cap.
    fast = state(capped=False, link_mib_s=AUTOTUNED_SEND_BUFFER / MIB / 2 / 0.01 + 1)
    assert decide(fast, FERRY).kind is not ActionKind.CAP_BACKLOG
    paced = StreamOptions(max_bandwidth_bytes_s=16 * MIB)
    assert decide(state(capped=False), paced).kind is not ActionKind.CAP_BACKLOG
    # Only Ferry's policy: the peers' baselines behave as the peers do.
    for policy in (PolicyKind.NOVA, PolicyKind.NOVA_LEGACY, PolicyKind.KUBEVIRT,
                   PolicyKind.QEMU):
        assert decide(state(capped=False), StreamOptions(policy=policy)).kind \
            is not ActionKind.CAP_BACKLOG


def test_first_pass_is_left_alone() -> None:
    assert decide(state(dirty_mib_s=100, iterations=its(256)), FERRY).kind is ActionKind.CONTINUE


def test_converging_stream_continues() -> None:
    assert decide(state(dirty_mib_s=5), FERRY).kind is ActionKind.CONTINUE


def test_dirty_set_that_fits_max_downtime_raises_the_limit_just_enough() -> None:
    action = decide(state(dirty_mib_s=24, link_mib_s=25, iterations=its(256, 10)), FERRY)
    assert action.kind is ActionKind.RAISE_DOWNTIME
    assert action.value is not None and 400 < action.value <= 500  # 10/25 s = 400 ms


def test_mid_pass_remaining_does_not_fool_the_downtime_lever() -> None:
    # 2 MiB left of this pass, but the last sync found 120 MiB dirty: no switch now
    action = decide(state(remaining_mib=2, dirty_mib_s=24, link_mib_s=25), FERRY)
    assert action.kind is not ActionKind.RAISE_DOWNTIME


def test_dirtying_faster_than_the_link_throttles_stepwise() -> None:
    first = decide(state(dirty_mib_s=40, link_mib_s=25), FERRY)
    assert first.kind is ActionKind.THROTTLE and first.value is not None
    assert 10 <= first.value <= FERRY.max_throttle_pct
    more = decide(state(dirty_mib_s=40, link_mib_s=25, throttle=first.value), FERRY)
    assert more.kind is ActionKind.THROTTLE and more.value is not None
    assert more.value > first.value or more.value == FERRY.max_throttle_pct


def test_postcopy_first_when_allowed_else_throttle_then_longest_downtime() -> None:
    allowed = StreamOptions(allow_postcopy=True)
    assert decide(state(dirty_mib_s=40, link_mib_s=25), allowed).kind is ActionKind.POSTCOPY
    spent = state(dirty_mib_s=40, link_mib_s=25, throttle=99)
    action = decide(spent, FERRY)
    assert action.kind is ActionKind.RAISE_DOWNTIME and action.value == 500
    assert decide(state(dirty_mib_s=40, link_mib_s=25, throttle=99, downtime=500),
                  FERRY).kind is ActionKind.CONTINUE


def test_qemu_policy_never_steers() -> None:
    qemu = StreamOptions(policy=PolicyKind.QEMU, allow_postcopy=True)
    assert decide(state(dirty_mib_s=400), qemu).kind is ActionKind.CONTINUE
    assert decide(state(elapsed=10_000), qemu).kind is ActionKind.ABORT


def test_nova_legacy_ramp_and_postcopy_on_stall() -> None:
    nova = StreamOptions(policy=PolicyKind.NOVA_LEGACY, allow_postcopy=True)
    assert initial_downtime_ms(nova, 256) == 50
    assert nova_downtime_ms(150 * 10, 256, nova) == 500  # 10 steps of 150 s (2 GiB floor)
    assert nova_downtime_ms(151, 256, nova) == 95
    stalled = state(iterations=its(256, 100, 95), downtime=50)
    assert decide(stalled, nova).kind is ActionKind.POSTCOPY
    shrinking = state(iterations=its(256, 100, 50), downtime=50, elapsed=200)
    action = decide(shrinking, nova)
    assert action.kind is ActionKind.RAISE_DOWNTIME and action.value == 95


NOVA = StreamOptions(policy=PolicyKind.NOVA)  # Nova's defaults: no post-copy, abort


def test_nova_ramps_the_limit_and_never_post_copies_on_a_stall() -> None:
    assert initial_downtime_ms(NOVA, 256) == 50  # 500 ms / 10 steps
    stalled = state(dirty_mib_s=400, iterations=its(256, 100, 99), downtime=50, since=1000)
    # no post-copy on a stall and no progress timeout (Nova removed both)
    for opts in (NOVA, StreamOptions(policy=PolicyKind.NOVA, allow_postcopy=True)):
        assert decide(stalled, opts).kind is ActionKind.CONTINUE
    action = decide(state(iterations=its(256, 100, 50), downtime=50, elapsed=200), NOVA)
    assert action.kind is ActionKind.RAISE_DOWNTIME and action.value == 95


def test_nova_timeout_counts_at_least_2_gib_then_aborts_or_forces_completion() -> None:
    # live_migration_completion_timeout 800 s per GiB, 256 MiB counted as 2 GiB: 1600 s
    assert completion_deadline_s(256, NOVA) == 1600
    assert decide(state(elapsed=1599, downtime=50), NOVA).kind is not ActionKind.ABORT
    assert decide(state(elapsed=1601, downtime=50), NOVA).kind is ActionKind.ABORT
    # permit_post_copy + timeout action force_complete: post-copy at the timeout
    forced = StreamOptions(policy=PolicyKind.NOVA, allow_postcopy=True)
    assert decide(state(elapsed=1601, downtime=50), forced).kind is ActionKind.POSTCOPY


KUBEVIRT = StreamOptions(policy=PolicyKind.KUBEVIRT, allow_postcopy=True,
                         completion_budget_s_per_gib=150, progress_timeout_s=150)


def test_kubevirt_keeps_qemus_limit_until_the_timeout_then_post_copies() -> None:
    assert initial_downtime_ms(KUBEVIRT, 256) == 300  # QEMU's default, left alone
    # 256 MiB is 0.27 GB, counted as 1 whole GB: 150 s
    assert completion_deadline_s(256, KUBEVIRT) == 150
    losing = state(dirty_mib_s=400, iterations=its(256, 100, 99, 99), elapsed=149)
    assert decide(losing, KUBEVIRT).kind is ActionKind.CONTINUE  # no lever before it
    late = state(dirty_mib_s=400, iterations=its(256, 100, 99, 99), elapsed=151)
    assert decide(late, KUBEVIRT).kind is ActionKind.POSTCOPY
    no_postcopy = KUBEVIRT.model_copy(update={"allow_postcopy": False})
    assert decide(late, no_postcopy).kind is ActionKind.ABORT


def test_kubevirt_aborts_a_migration_without_progress() -> None:
    stuck = state(elapsed=100, since=151)
    assert decide(stuck, KUBEVIRT).kind is ActionKind.ABORT  # even with post-copy allowed
    assert decide(state(elapsed=100, since=149), KUBEVIRT).kind is ActionKind.CONTINUE


def test_ferry_starts_no_higher_than_novas_first_step() -> None:
    assert initial_downtime_ms(FERRY, 256) == low_downtime_ms(FERRY)
    assert low_downtime_ms(FERRY) <= nova_downtime_ms(0, 256, NOVA)


def test_ferry_keeps_the_low_limit_while_pre_copy_converges() -> None:
    # 10 MiB dirty would fit 400 ms at 25 MiB/s, but a 5 MiB/s guest leaves 1/5 of each
    # pass dirty: a few more passes get it under 50 ms, well within the budget
    converging = state(dirty_mib_s=5, link_mib_s=25, iterations=its(256, 40, 10),
                       downtime=50)
    assert decide(converging, FERRY).kind is ActionKind.CONTINUE


def test_ferry_raises_the_limit_once_the_dirty_set_stops_shrinking() -> None:
    # 10 MiB at 25 MiB/s needs 400 ms: a doubling at a time, each held a while
    limit, at, raised = 50, 0.0, []
    for _ in range(20):
        stuck = state(dirty_mib_s=5, link_mib_s=25, iterations=its(256, 40, 10, 10),
                      downtime=limit, since_raise=None if not raised else 1.0 * at)
        action = decide(stuck, FERRY)
        if action.kind is ActionKind.RAISE_DOWNTIME:
            assert action.value is not None and "stopped shrinking" in action.reason
            assert action.value <= 2 * limit or 2 * limit >= 400  # doubling, or the fit
            limit, at = action.value, 0.0
            raised.append(limit)
        at += 1.0  # a second per pass
    # the last step is not capped at the set's own 400 ms: QEMU needs a margin
    assert raised[:2] == [100, 200] and 400 < raised[-1] <= 500, raised


def test_a_raised_limit_is_held_a_while_before_the_next() -> None:
    stuck = its(256, 40, 10, 10)
    held = state(dirty_mib_s=5, iterations=stuck, downtime=100, since_raise=2.0)
    assert decide(held, FERRY).kind is ActionKind.CONTINUE
    after = state(dirty_mib_s=5, iterations=stuck, downtime=100, since_raise=6.0)
    assert decide(after, FERRY).kind is ActionKind.RAISE_DOWNTIME
    # with little of the budget left the hold is shorter (a tenth of what is left)
    late = state(dirty_mib_s=5, iterations=stuck, downtime=100, since_raise=1.0,
                 elapsed=completion_deadline_s(256, FERRY) - 5)
    assert decide(late, FERRY).kind is ActionKind.RAISE_DOWNTIME


def test_ferry_raises_the_limit_when_the_budget_is_too_short_for_more_passes() -> None:
    # the same converging stream, but with 1 s of the 200 s budget left
    late = state(dirty_mib_s=5, link_mib_s=25, iterations=its(256, 40, 10), downtime=50,
                 elapsed=completion_deadline_s(256, FERRY) - 0.1)
    assert decide(late, FERRY).kind is ActionKind.RAISE_DOWNTIME


def test_projected_finish() -> None:
    rate = 25.0 * MIB
    # fits already
    assert projected_finish_s(its(256, 1), 0, rate, 50) == 0
    # no dirtying: one more pass of the 10 MiB
    assert projected_finish_s(its(256, 10), 0, rate, 50) == 10 / 25
    # q = 0.2: 10 -> 2 -> 0.4 MiB (<= 1.25 MiB): passes of 10 and 2 MiB
    finish = projected_finish_s(its(256, 10), 5 * MIB, rate, 50)
    assert finish is not None and abs(finish - 12 / 25) < 1e-9
    # a last pass that kept most of the set wins over a low dirty rate reading
    assert projected_finish_s(its(256, 10, 10), 1 * MIB, rate, 50) is None
    assert projected_finish_s(its(256, 10), 24 * MIB, rate, 50) is None


rates = st.floats(0, 2000)
policies = st.sampled_from(list(PolicyKind))


@given(st.integers(1, 4096), rates, st.floats(1, 2000), st.floats(0, 5000),
       st.integers(32, 8192), policies, st.booleans(), st.integers(0, 99))
def test_never_aborts_while_within_budget_and_progressing(
        remaining: int, dirty: float, link: float, elapsed: float, memory: int,
        policy: PolicyKind, postcopy_ok: bool, throttle: int) -> None:
    opts = StreamOptions(policy=policy, allow_postcopy=postcopy_ok)
    elapsed = min(elapsed, completion_deadline_s(memory, opts))
    s = state(remaining, dirty, link, elapsed=elapsed, since=0, memory=memory,
              throttle=throttle)
    assert decide(s, opts).kind is not ActionKind.ABORT


@given(st.floats(0, 1e6), st.floats(0, 1e6), st.integers(32, 8192), policies, st.booleans(),
       rates)
def test_always_ends_within_the_budget(elapsed: float, since: float, memory: int,
                                       policy: PolicyKind, postcopy_ok: bool,
                                       dirty: float) -> None:
    opts = StreamOptions(policy=policy, allow_postcopy=postcopy_ok)
    s = state(elapsed=elapsed, since=since, memory=memory, dirty_mib_s=dirty)
    stuck = since > opts.progress_timeout_s and policy is not PolicyKind.NOVA
    if elapsed > completion_deadline_s(memory, opts) or stuck:  # Nova has no progress timeout
        assert decide(s, opts).kind in (ActionKind.ABORT, ActionKind.POSTCOPY)


@given(st.integers(1, 4096), rates, st.floats(1, 2000), st.floats(0, 1e5), st.floats(0, 1e4),
       policies, st.integers(0, 99), st.lists(st.integers(1, 4096), max_size=6))
def test_postcopy_never_chosen_when_not_allowed(
        remaining: int, dirty: float, link: float, elapsed: float, since: float,
        policy: PolicyKind, throttle: int, passes: list[int]) -> None:
    opts = StreamOptions(policy=policy, allow_postcopy=False)
    s = state(remaining, dirty, link, iterations=its(*passes), elapsed=elapsed, since=since,
              throttle=throttle)
    assert decide(s, opts).kind is not ActionKind.POSTCOPY


@given(rates, st.floats(1, 2000), st.integers(0, 99), st.lists(st.integers(0, 4096),
                                                                min_size=2, max_size=5))
def test_throttle_stays_within_the_allowed_maximum(dirty: float, link: float,
                                                   throttle: int, passes: list[int]) -> None:
    opts = StreamOptions(max_throttle_pct=60)
    action = decide(state(dirty_mib_s=dirty, link_mib_s=link, throttle=throttle,
                          iterations=its(*passes)), opts)
    if action.kind is ActionKind.THROTTLE:
        assert action.value is not None and throttle < action.value <= 60


def test_no_throttle_when_not_allowed() -> None:
    opts = StreamOptions(allow_throttle=False)
    assert decide(state(dirty_mib_s=40), opts).kind is not ActionKind.THROTTLE


def test_compression_needs_multifd() -> None:
    import pytest
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="only with multifd"):
        StreamOptions(compression="zstd")
    assert StreamOptions(compression="zstd", multifd_channels=4).multifd_channels == 4


def test_saturated_dirty_rate_still_reveals_a_losing_precopy() -> None:
    # QEMU reports 15 MiB/s (its working set per pass) against a 25 MiB/s link, but the
    # second pass sent 127 MiB and left 125 MiB dirty: pre-copy is losing.
    def it(n: int, at_ms: int, left: int, sent: int) -> Iteration:
        return Iteration(number=n, at_ms=at_ms, remaining_bytes=left * MIB,
                         transferred_bytes=sent * MIB, dirty_rate_bytes_s=0,
                         throughput_bytes_s=0, expected_downtime_ms=None)
    first = (it(1, 0, 256, 0), it(2, 9000, 132, 191))
    passes = (*first, it(3, 14000, 125, 318))
    losing = StreamOptions(allow_postcopy=True)
    action = decide(state(dirty_mib_s=15, link_mib_s=25, iterations=passes), losing)
    assert action.kind is ActionKind.POSTCOPY and "left 125 MiB dirty" in action.reason
    # the first pass alone says nothing: it sent all memory, not a dirty set
    assert decide(state(dirty_mib_s=15, link_mib_s=25, iterations=first),
                  losing).kind is ActionKind.CONTINUE
    # a pass that leaves half behind still converges geometrically: left alone
    fine = (*first, it(3, 12000, 66, 323))
    assert decide(state(dirty_mib_s=5, link_mib_s=25, iterations=fine),
                  losing).kind is ActionKind.CONTINUE


def test_dirty_set_not_shrinking_is_not_converging() -> None:
    action = decide(state(dirty_mib_s=5, iterations=its(256, 100, 95)),
                    StreamOptions(allow_postcopy=True))
    assert action.kind is ActionKind.POSTCOPY


def test_a_tiny_end_of_pass_sync_is_not_taken_for_a_losing_pass() -> None:
    # seen in the sweep: the set before was 8 MiB, the last "pass" sent 2 MiB and left 6
    tail = (Iteration(number=4, at_ms=0, remaining_bytes=8 * MIB, transferred_bytes=256 * MIB,
                      dirty_rate_bytes_s=0, throughput_bytes_s=0, expected_downtime_ms=None),
            Iteration(number=6, at_ms=100, remaining_bytes=6 * MIB,
                      transferred_bytes=258 * MIB, dirty_rate_bytes_s=0,
                      throughput_bytes_s=0, expected_downtime_ms=None))
    s = state(dirty_mib_s=6, link_mib_s=23, iterations=tail, downtime=404)
    assert decide(s, StreamOptions(allow_postcopy=True)).kind is ActionKind.CONTINUE


def test_a_dirty_set_within_reach_stays_in_precopy_for_a_few_passes() -> None:
    # 19 MiB needs 760 ms at 25 MiB/s: over the 500 ms maximum but within 2x of it.
    # QEMU's mid-pass re-sync can still find a moment it fits, so no post-copy yet...
    losing = StreamOptions(allow_postcopy=True)
    near = state(dirty_mib_s=12, link_mib_s=25, iterations=its(256, 100, 20, 19))
    assert decide(near, losing).kind is ActionKind.CONTINUE
    # ...but not forever: after 8 passes at that size it is judged like any other
    stuck = state(dirty_mib_s=12, link_mib_s=25, iterations=its(256, 100, *[19] * 9))
    assert decide(stuck, losing).kind is ActionKind.POSTCOPY
    # a set far beyond reach is judged at once
    far = state(dirty_mib_s=12, link_mib_s=25, iterations=its(256, 100, 95))
    assert decide(far, losing).kind is ActionKind.POSTCOPY


@given(st.integers(0, 4096), rates, st.floats(1, 2000), st.floats(0, 200),
       st.integers(10, 500), st.lists(st.integers(0, 4096), min_size=2, max_size=6))
def test_ferry_raises_a_fitting_limit_only_when_pre_copy_would_not_finish_in_time(
        remaining: int, dirty: float, link: float, elapsed: float, downtime: int,
        passes: list[int]) -> None:
    s = state(remaining, dirty, link, iterations=its(*passes), elapsed=elapsed,
              downtime=downtime)
    action = decide(s, FERRY)
    rate = s.progress.throughput_bytes_s
    needed_ms = passes[-1] * MIB / rate * 1000 if rate > 0 else math.inf
    if action.kind is ActionKind.RAISE_DOWNTIME and needed_ms <= FERRY.max_downtime_ms:
        finish = projected_finish_s(s.iterations, s.progress.dirty_rate_bytes_s, rate,
                                    downtime)
        assert finish is None or finish > completion_deadline_s(256, FERRY) - elapsed


def test_a_stalled_set_gets_a_limit_just_above_its_recent_floor() -> None:
    # Short passes leave 2 to 3 MiB dirty, jittering, at 25 MiB/s: 80-120 ms. A limit
    # snug above the floor (2 MiB: 80 ms) switches at the next dip with the shortest
    # pause; a next raise (the limit already there) steps to what the latest needs.
    # From 25 ms the first raise stops at 50 (a dip may fit there, as Nova's first step
    # caught them), held a while, then snug above the floor.
    jitter = its(256, 100, 40, 3, 2, 3, 3, 3)
    first = decide(state(dirty_mib_s=12, iterations=jitter, downtime=25), FERRY)
    assert first.kind is ActionKind.RAISE_DOWNTIME and first.value == 50, first
    snug = decide(state(dirty_mib_s=12, iterations=jitter, downtime=first.value,
                        since_raise=10), FERRY)
    assert snug.kind is ActionKind.RAISE_DOWNTIME and snug.value is not None
    assert 80 < snug.value <= 95, snug
    again = decide(state(dirty_mib_s=12, iterations=jitter, downtime=snug.value,
                         since_raise=10), FERRY)
    assert again.kind is ActionKind.RAISE_DOWNTIME and again.value is not None
    assert 120 < again.value <= 160, again


def test_each_policy_has_its_peers_budget_unless_one_is_set() -> None:
    """KubeVirt's completionTimeoutPerGiB is 150 s, Nova's completion timeout 800 s; a
    budget given explicitly wins for any policy."""
    assert StreamOptions(policy=PolicyKind.KUBEVIRT).budget_per_gib_s == 150
    assert StreamOptions(policy=PolicyKind.NOVA).budget_per_gib_s == 800
    assert StreamOptions().budget_per_gib_s == 800
    # 256 MiB is one whole GB for KubeVirt: 150 s, as the sweep's kubevirt arm sets it.
    assert completion_deadline_s(256, StreamOptions(policy=PolicyKind.KUBEVIRT)) == 150
    own = StreamOptions(policy=PolicyKind.KUBEVIRT, completion_budget_s_per_gib=400)
    assert own.budget_per_gib_s == 400
    # Switching a cluster's default policy to kubevirt gives it KubeVirt's budget.
    merged = StreamOptions.model_validate(StreamOptions().model_dump() | {"policy": "kubevirt"})
    assert merged.budget_per_gib_s == 150
