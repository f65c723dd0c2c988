"""Convergence: what to do next with a running pre-copy, as a pure function.

`decide(state, options)` reads a snapshot of the migration (passes so far, the latest
query-migrate reading, the levers already pulled) and returns one Action. Three
policies, so that Ferry can be measured against the others in one run:

- FERRY: when what is left fits the allowed downtime, raise the limit to just that much
  and switch now. When the guest dirties memory nearly as fast as the link carries it:
  post-copy at once if the user allowed it; otherwise slow its vCPUs (vMotion's SDPS
  idea, via QEMU's CPU throttle), stepping up each pass while it does not converge, then
  the longest allowed downtime; abort only when the budget or progress timeout runs out.
- NOVA: OpenStack Nova's defaults: the downtime limit ramps to its maximum in 10 steps
  (one step every 75 s per GiB of RAM); post-copy (if allowed) once remaining memory
  shrinks by less than 10 % per pass.
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
)
from ferry.domain.specs import Frozen

CONVERGING = 0.8  # dirty rate below 80 % of throughput: pre-copy shrinks on its own
THROTTLE_STEP = 20
NEAR_FIT = 2.0  # a dirty set needing up to 2x the max downtime is within reach...
NEAR_FIT_PASSES = 8  # ...for this many passes (short ones: each sends that small set)
DIRTY_SHARE = 0.6  # a pass that leaves 60 % of what it sent dirty is losing
NOVA_STEPS = 10
NOVA_STEP_S_PER_GIB = 75.0


class ActionKind(StrEnum):
    CONTINUE = "continue"
    RAISE_DOWNTIME = "raise_downtime"
    THROTTLE = "throttle"
    POSTCOPY = "postcopy"
    ABORT = "abort"


class Action(Frozen):
    kind: ActionKind
    value: int | None = None  # downtime ms, or throttle %
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


def decide(state: ConvergenceState, options: StreamOptions) -> Action:
    if state.postcopy:
        return CONTINUE  # nothing left to steer: the target runs, pages follow
    late = abort_reason(state.elapsed_s, state.since_progress_s, state.memory_mib, options)
    if late is not None:
        if options.allow_postcopy and options.policy is not PolicyKind.QEMU:
            return Action(kind=ActionKind.POSTCOPY, reason=f"{late}; post-copy finishes it")
        return Action(kind=ActionKind.ABORT, reason=late)
    if options.policy is PolicyKind.QEMU:
        return CONTINUE
    if options.policy is PolicyKind.NOVA:
        return _nova(state, options)
    return _ferry(state, options)


def _ferry(state: ConvergenceState, options: StreamOptions) -> Action:
    if len(state.iterations) < 2:
        return CONTINUE  # the first pass copies everything once; nothing to judge yet
    p = state.progress
    rate = p.throughput_bytes_s
    if rate <= 0:
        return CONTINUE
    # What a pass leaves dirty is the remaining at its start (the last sync); the
    # remaining mid-pass shrinks towards zero every pass and says nothing.
    dirty_set = state.iterations[-1].remaining_bytes
    needed_ms = math.ceil(dirty_set / rate * 1000)
    if state.downtime_ms < needed_ms <= options.max_downtime_ms:
        target = min(options.max_downtime_ms, math.ceil(needed_ms * 1.25) + 10)
        return Action(kind=ActionKind.RAISE_DOWNTIME, value=target,
                      reason=f"{dirty_set >> 20} MiB dirty fit in {needed_ms} ms")
    if needed_ms <= state.downtime_ms:
        return CONTINUE  # the dirty set already fits: QEMU switches at the next check
    near = [it for it in state.iterations
            if it.remaining_bytes / rate * 1000 <= NEAR_FIT * options.max_downtime_ms]
    if needed_ms <= NEAR_FIT * options.max_downtime_ms and len(near) <= NEAR_FIT_PASSES:
        # Within reach: QEMU re-syncs mid-pass and switches as soon as what is left
        # fits, which a set this small allows within a few passes (measured at 12 MiB/s
        # over a 23.8 MiB/s link). Post-copy would put the VM at risk for little gain.
        return CONTINUE
    dirty = p.dirty_rate_bytes_s
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
    if options.policy is PolicyKind.NOVA:
        return nova_downtime_ms(0.0, memory_mib, options)
    return options.initial_downtime_ms


def _nova(state: ConvergenceState, options: StreamOptions) -> Action:
    its = state.iterations
    if options.allow_postcopy and len(its) >= 3:
        previous, last = its[-2].remaining_bytes, its[-1].remaining_bytes
        if previous > 0 and last > previous * 0.9:
            return Action(kind=ActionKind.POSTCOPY,
                          reason="remaining memory shrank less than 10 % in a pass")
    wanted = nova_downtime_ms(state.elapsed_s, state.memory_mib, options)
    if wanted > state.downtime_ms:
        return Action(kind=ActionKind.RAISE_DOWNTIME, value=wanted, reason="downtime ramp step")
    return CONTINUE
