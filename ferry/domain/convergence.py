"""Convergence: what to do next with a running pre-copy, as a pure function.

`decide(state, options)` reads a snapshot of the migration (passes so far, the latest
query-migrate reading, the levers already pulled) and returns one Action. Five
policies, so that Ferry can be measured against its peers' defaults in one run:

- FERRY: start with a low downtime limit (half Nova's first step: a 20th of the max) and
  raise it only when pre-copy, projected from the measured transfer and dirty rates of
  the passes so far, would not get the dirty set under that limit within the budget;
  then raise it to just what the dirty set needs. Once the first pass measured the
  link, cap the stream's send buffer (CAP_BACKLOG), so that the switch's last pages do
  not queue behind megabytes already "sent" (agent/stream_socket.py says why). When
  the guest dirties memory nearly
  as fast as the link carries it: post-copy at once if the user allowed it; otherwise
  slow its vCPUs (vMotion's SDPS idea, via QEMU's CPU throttle), stepping up each pass
  while it does not converge, then the longest allowed downtime; abort only when the
  budget or progress timeout runs out.
- NOVA: OpenStack Nova's current defaults: the downtime limit ramps to its maximum in 10
  steps (one every 75 s per GiB of RAM, at least 2 GiB); at the completion timeout
  (the per-GiB budget x the same GiB) the timeout action: abort, or post-copy when
  allow_postcopy is set (Nova's live_migration_permit_post_copy together with
  live_migration_timeout_action = force_complete). No progress timeout: Nova removed it.
- NOVA_LEGACY: older Nova: the same ramp, plus post-copy (if allowed) as soon as the
  remaining memory shrinks by less than 10 % per pass; progress timeout as Ferry's.
- KUBEVIRT: KubeVirt's migration monitor: QEMU's fixed downtime limit; past the
  completion timeout (per-GiB budget x whole GB, rounded up) post-copy if allowPostCopy,
  else abort; no shrink of the remaining memory for progress_timeout_s: abort.
- QEMU: QEMU's defaults: a fixed downtime limit and nothing else.
"""

from __future__ import annotations

import math
from enum import StrEnum

from ferry.domain.migration import (
    Iteration,
    PolicyKind,
    Progress,
    StreamOptions,
    abort_reason,
    completion_deadline_s,
)
from ferry.domain.specs import Frozen

CONVERGING = 0.8  # dirty rate below 80 % of throughput: pre-copy shrinks on its own
THROTTLE_STEP = 20
NEAR_FIT = 2.0  # a dirty set needing up to 2x the max downtime is within reach...
NEAR_FIT_PASSES = 8  # ...for this many passes (short ones: each sends that small set)
DIRTY_SHARE = 0.6  # a pass that leaves 60 % of what it sent dirty is losing
NOVA_STEPS = 10
NOVA_STEP_S_PER_GIB = 75.0
STALLED = 0.9  # a dirty set that keeps 90 % of itself per pass is not shrinking
# A raised limit is held this long (at most a tenth of the budget left) before the next
# raise: the dirty set of short passes jitters, and QEMU switches at the first dip that
# fits (Nova, sitting at its 50 ms first step, caught dips Ferry had raised past).
RAISE_HOLD_S = 5.0
RAISE_STEP = 2  # a raise at most doubles the limit
# What the stream's send buffer may hold beyond the path's bandwidth-delay product, in
# ms of its throughput: the longest the switch's last bytes queue behind earlier ones.
BACKLOG_MARGIN_MS = 10
# Linux's largest autotuned send buffer (net.ipv4.tcp_wmem's default maximum; the
# kernel counts twice the payload): a link carrying that within the margin gains
# nothing from the cap, which would only add work to a short migration's last passes.
AUTOTUNED_SEND_BUFFER = 4 << 20


class ActionKind(StrEnum):
    CONTINUE = "continue"
    RAISE_DOWNTIME = "raise_downtime"
    THROTTLE = "throttle"
    POSTCOPY = "postcopy"
    ABORT = "abort"
    CAP_BACKLOG = "cap_backlog"


class Action(Frozen):
    kind: ActionKind
    value: int | None = None  # downtime ms, throttle %, or backlog margin ms
    reason: str = ""


CONTINUE = Action(kind=ActionKind.CONTINUE)


class ConvergenceState(Frozen):
    """What decide() may look at: one consistent snapshot, no clocks or I/O."""

    elapsed_s: float
    since_progress_s: float
    memory_mib: int
    iterations: tuple[Iteration, ...]
    progress: Progress
    downtime_ms: int  # the limit currently set
    throttle_pct: int  # the throttle ceiling currently set (0: none)
    postcopy: bool  # post-copy already started
    since_raise_s: float | None = None  # since the policy last raised the limit
    backlog_capped: bool = False  # CAP_BACKLOG was asked for already


def decide(state: ConvergenceState, options: StreamOptions) -> Action:
    if state.postcopy:
        return CONTINUE  # nothing left to steer: the target runs, pages follow
    if options.policy is PolicyKind.NOVA:
        return _nova(state, options)
    if options.policy is PolicyKind.KUBEVIRT:
        return _kubevirt(state, options)
    late = abort_reason(state.elapsed_s, state.since_progress_s, state.memory_mib, options)
    if late is not None:
        if options.allow_postcopy and options.policy is not PolicyKind.QEMU:
            return Action(kind=ActionKind.POSTCOPY, reason=f"{late}; post-copy finishes it")
        return Action(kind=ActionKind.ABORT, reason=late)
    if options.policy is PolicyKind.QEMU:
        return CONTINUE
    if options.policy is PolicyKind.NOVA_LEGACY:
        return _nova_legacy(state, options)
    return _ferry(state, options)


def projected_finish_s(its: tuple[Iteration, ...], dirty: float, rate: float,
                       limit_ms: int) -> float | None:
    """Seconds until pre-copy leaves a dirty set that fits `limit_ms`, or None if it
    never will at this limit.

    Each pass sends the set S at `rate` and leaves q*S dirty: q is the dirty rate over
    the rate, or the shrink the last pass measured when that says less progress (QEMU's
    dirty rate counts distinct pages, so it under-reads a long pass). The first pass
    sent all of memory, so a shrink against it says nothing.
    """
    left = its[-1].remaining_bytes
    target = rate * limit_ms / 1000
    if left <= target:
        return 0.0
    q = dirty / rate
    if len(its) >= 3 and its[-2].remaining_bytes > 0:
        q = max(q, its[-1].remaining_bytes / its[-2].remaining_bytes)
    if q >= STALLED:
        return None
    if q <= 0:
        return left / rate
    passes = math.ceil(math.log(target / left) / math.log(q))
    return left * (1 - q ** passes) / (1 - q) / rate


def _ferry(state: ConvergenceState, options: StreamOptions) -> Action:
    if len(state.iterations) < 2:
        return CONTINUE  # the first pass copies everything once; nothing to judge yet
    p = state.progress
    rate = p.throughput_bytes_s
    if rate <= 0:
        return CONTINUE
    if not state.backlog_capped and not options.max_bandwidth_bytes_s and \
            2 * rate * BACKLOG_MARGIN_MS / 1000 < AUTOTUNED_SEND_BUFFER:
        # The agent caps at the first pass's average throughput, the link's (a single
        # reading is not: one low one would cap the buffer, and the stream, too low).
        # A stream QEMU paces itself (max_bandwidth) keeps no standing queue.
        return Action(kind=ActionKind.CAP_BACKLOG, value=BACKLOG_MARGIN_MS,
                      reason=f"the link carries {rate / 1e6:.0f} MB/s: the stream's send "
                             f"buffer holds the path's bandwidth-delay product plus "
                             f"{BACKLOG_MARGIN_MS} ms, so little queues in front of the "
                             "switch")
    # What a pass leaves dirty is the remaining at its start (the last sync); the
    # remaining mid-pass shrinks towards zero every pass and says nothing.
    dirty_set = state.iterations[-1].remaining_bytes
    needed_ms = math.ceil(dirty_set / rate * 1000)
    if needed_ms <= state.downtime_ms:
        return CONTINUE  # the dirty set already fits: QEMU switches at the next check
    p_dirty = p.dirty_rate_bytes_s
    if needed_ms <= options.max_downtime_ms:
        # A higher limit switches sooner but pauses the guest longer: keep the low one
        # while more passes get the set under it within the budget.
        budget_left = completion_deadline_s(state.memory_mib, options) - state.elapsed_s
        finish = projected_finish_s(state.iterations, p_dirty, rate, state.downtime_ms)
        if finish is not None and finish <= budget_left:
            return CONTINUE
        if state.since_raise_s is not None and \
                state.since_raise_s < min(RAISE_HOLD_S, max(0.0, budget_left) / 10):
            return CONTINUE  # give the last raise its chance at a dip first
        # The dirty set of short passes jitters around a floor: a limit just above the
        # smallest recent set switches at the next dip, with the shortest pause; once
        # the limit is there already, a step to what the latest set needs. At most a
        # doubling while that stays below what the latest set needs (a lower limit may
        # yet catch a dip; one at the set's size would leave QEMU no margin).
        recent = [it.remaining_bytes for it in state.iterations[1:][-4:]]
        snug = math.ceil(min(recent) / rate * 1000 * 1.1) + 5
        target = snug if snug > state.downtime_ms else math.ceil(needed_ms * 1.25) + 10
        if RAISE_STEP * state.downtime_ms < needed_ms:
            target = min(target, RAISE_STEP * state.downtime_ms)
        target = min(options.max_downtime_ms, target)
        late = ("the dirty set stopped shrinking" if finish is None
                else f"pre-copy would need {finish:.0f} s, {budget_left:.0f} s left")
        return Action(kind=ActionKind.RAISE_DOWNTIME, value=target,
                      reason=f"{late}; {dirty_set >> 20} MiB dirty fit in {needed_ms} ms")
    near = [it for it in state.iterations
            if it.remaining_bytes / rate * 1000 <= NEAR_FIT * options.max_downtime_ms]
    if needed_ms <= NEAR_FIT * options.max_downtime_ms and len(near) <= NEAR_FIT_PASSES:
        # Within reach: QEMU re-syncs mid-pass and switches as soon as what is left
        # fits, which a set this small allows within a few passes (measured at 12 MiB/s
        # over a 23.8 MiB/s link). Post-copy would put the VM at risk for little gain.
        return CONTINUE
    dirty = p_dirty
    why = _not_converging(state.iterations, dirty, rate)
    if why is None:
        return CONTINUE
    if options.allow_postcopy:
        # Pre-copy cannot converge; post-copy sends each page at most once more and
        # stalls only the vCPU that touches a missing page, so it beats more passes.
        return Action(kind=ActionKind.POSTCOPY, reason=f"{why}: pre-copy cannot converge")
    if options.throttles and state.throttle_pct < options.max_throttle_pct:
        # A throttle t leaves a CPU-bound guest (1 - t) of its dirty rate; a guest that
        # dirties with little CPU needs more, so each step adds at least 20 points.
        wanted = math.ceil((1 - CONVERGING * 0.75 * rate / dirty) * 100) if dirty else 0
        target = min(options.max_throttle_pct,
                     max(wanted, state.throttle_pct + THROTTLE_STEP))
        return Action(kind=ActionKind.THROTTLE, value=target, reason=why)
    if state.downtime_ms < options.max_downtime_ms:
        return Action(kind=ActionKind.RAISE_DOWNTIME, value=options.max_downtime_ms,
                      reason="throttle limit reached; allow the longest downtime")
    return CONTINUE


def _not_converging(its: tuple[Iteration, ...], dirty: int, rate: float) -> str | None:
    """Why pre-copy will not converge on its own, or None while it still may.

    QEMU's dirty rate counts distinct pages per pass, so it saturates at the guest's
    working set; the dirty set a pass leaves behind, compared with what that pass sent
    and with the set before it, tells earlier that pre-copy is losing.
    """
    if dirty >= CONVERGING * rate:
        return f"dirty {dirty >> 20} MiB/s vs link {int(rate) >> 20} MiB/s"
    if len(its) < 3:
        # The first pass says nothing: it sends all of memory, so what it leaves dirty is
        # bounded by the guest's working set, not by how fast the set shrinks (measured:
        # it left 0.69 of what it sent for a guest whose whole working set is dirty
        # again after every later pass).
        return None
    last, before = its[-1], its[-2]
    sent = last.transferred_bytes - before.transferred_bytes
    # Only a pass that sent most of the set before it says something (QEMU also syncs
    # at the very end of a pass, a tiny "pass").
    if sent >= 0.5 * before.remaining_bytes and last.remaining_bytes >= DIRTY_SHARE * sent:
        return (f"the last pass left {last.remaining_bytes >> 20} MiB dirty after sending "
                f"{sent >> 20} MiB")
    if last.remaining_bytes > 0.9 * before.remaining_bytes:
        return "the dirty set shrank less than 10 % in a pass"
    return None


def nova_downtime_ms(elapsed_s: float, memory_mib: int, options: StreamOptions) -> int:
    """Nova's linear ramp: base = max/steps at t=0, then + (max-base)/steps per step;
    a step every 75 s per GiB of RAM, counting at least 2 GiB (as Nova does)."""
    step_s = NOVA_STEP_S_PER_GIB * max(memory_mib / 1024, 2.0)
    step = min(NOVA_STEPS, int(elapsed_s // step_s))
    base = options.max_downtime_ms / NOVA_STEPS
    return int(base + (options.max_downtime_ms - base) / NOVA_STEPS * step)


def initial_downtime_ms(options: StreamOptions, memory_mib: int) -> int:
    if options.policy in (PolicyKind.NOVA, PolicyKind.NOVA_LEGACY):
        return nova_downtime_ms(0.0, memory_mib, options)
    if options.policy is PolicyKind.FERRY:
        return low_downtime_ms(options)
    return options.initial_downtime_ms  # QEMU's default (KubeVirt leaves it too)


def low_downtime_ms(options: StreamOptions) -> int:
    """Ferry's starting limit: half Nova's first step (25 ms of 500), so that wherever
    both converge Ferry's switch is the shorter; raised only when the projection says
    pre-copy would not finish in time at this limit."""
    return max(1, options.max_downtime_ms // (2 * NOVA_STEPS))


def _ramp(state: ConvergenceState, options: StreamOptions) -> Action:
    wanted = nova_downtime_ms(state.elapsed_s, state.memory_mib, options)
    if wanted > state.downtime_ms:
        return Action(kind=ActionKind.RAISE_DOWNTIME, value=wanted, reason="downtime ramp step")
    return CONTINUE


def _nova(state: ConvergenceState, options: StreamOptions) -> Action:
    deadline = completion_deadline_s(state.memory_mib, options)
    if state.elapsed_s > deadline:
        late = f"live migration not completed after {deadline:.0f} s"
        if options.allow_postcopy:  # permit_post_copy + timeout action force_complete
            return Action(kind=ActionKind.POSTCOPY, reason=f"{late}; force complete")
        return Action(kind=ActionKind.ABORT, reason=late)
    return _ramp(state, options)


def _nova_legacy(state: ConvergenceState, options: StreamOptions) -> Action:
    its = state.iterations
    if options.allow_postcopy and len(its) >= 3:
        previous, last = its[-2].remaining_bytes, its[-1].remaining_bytes
        if previous > 0 and last > previous * 0.9:
            return Action(kind=ActionKind.POSTCOPY,
                          reason="remaining memory shrank less than 10 % in a pass")
    return _ramp(state, options)


def _kubevirt(state: ConvergenceState, options: StreamOptions) -> Action:
    deadline = completion_deadline_s(state.memory_mib, options)
    late = state.elapsed_s > deadline
    if late and options.allow_postcopy:
        return Action(kind=ActionKind.POSTCOPY,
                      reason=f"not completed after {deadline:.0f} s; post-copy")
    if state.since_progress_s > options.progress_timeout_s:
        return Action(kind=ActionKind.ABORT,
                      reason=f"live migration stuck for {state.since_progress_s:.0f} s")
    if late:
        return Action(kind=ActionKind.ABORT, reason=f"not completed after {deadline:.0f} s")
    return CONTINUE
