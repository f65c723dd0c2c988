"""The control plane's leader lease (ferry/domain/leader.py): the rules alone, then
replicas with skewed clocks claiming one row by compare-and-set in random orders, which
must never lead at overlapping times."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ferry.domain.leader import LeaderLease, LeaderTerms, claim, leads

TERMS = LeaderTerms(ttl_s=10.0, renew_s=2.0, max_skew_s=1.0)


def test_renewal_must_fit_the_term_twice() -> None:
    with pytest.raises(ValidationError):
        LeaderTerms(ttl_s=4.0, renew_s=2.0)


def test_an_empty_row_is_taken_with_the_first_token() -> None:
    row = claim(LeaderLease(), "a", 100.0, TERMS)
    assert row == LeaderLease(holder="a", expires_at=110.0, token=1, version=1)
    assert leads(row, "a", 109.9) and not leads(row, "a", 110.0)
    assert not leads(row, "b", 105.0) and not leads(None, "a", 105.0)


def test_the_holder_renews_in_its_term_and_starts_a_new_one_after() -> None:
    row = LeaderLease(holder="a", expires_at=110.0, token=4, version=9)
    assert claim(row, "a", 105.0, TERMS, row) == LeaderLease(holder="a", expires_at=115.0,
                                                             token=4, version=10)
    assert claim(row, "a", 110.0, TERMS, row) == LeaderLease(holder="a", expires_at=120.0,
                                                             token=5, version=10)
    # A restarted process of the same replica leads at once, in a new term.
    assert claim(row, "a", 105.0, TERMS) == LeaderLease(holder="a", expires_at=115.0,
                                                        token=5, version=10)


def test_another_waits_out_the_term_and_the_skew_then_takes_over() -> None:
    row = LeaderLease(holder="a", expires_at=110.0, token=4, version=9)
    assert claim(row, "b", 110.5, TERMS) is None
    assert claim(row, "b", 111.0, TERMS) == LeaderLease(holder="b", expires_at=121.0,
                                                        token=5, version=10)


# --- replicas racing for the row ----------------------------------------------------
@dataclass
class Replica:
    name: str
    offset: float  # its clock minus the true time
    written: LeaderLease | None = None  # the last row it wrote itself
    pending: tuple[int, LeaderLease] | None = None  # (version read, row to write)


@dataclass
class World:
    replicas: list[Replica]
    row: LeaderLease = field(default_factory=LeaderLease)
    # (holder, token) -> [first true time it led, last true time its term ran to]
    terms: dict[tuple[str, int], list[float]] = field(default_factory=dict)

    def read(self, r: Replica, now: float) -> None:
        new = claim(self.row, r.name, now + r.offset, TERMS, r.written)
        r.pending = (self.row.version, new) if new is not None else None

    def write(self, r: Replica, now: float) -> None:
        """The compare-and-set: lands only if nobody wrote since this replica read."""
        if r.pending is None or r.pending[0] != self.row.version:
            r.pending = None
            return
        self.row = r.written = r.pending[1]
        r.pending = None
        if not leads(r.written, r.name, now + r.offset):
            return  # the write landed after the term it asked for had run out
        end = r.written.expires_at - r.offset  # the true time its clock reaches expiry
        span = self.terms.setdefault((r.name, r.written.token), [now, end])
        span[1] = max(span[1], end)


# Gaps near the ones that matter (a renewal, most of a term) as well as any, and clock
# offsets at the extremes of the allowed skew as well as between: the races live there.
gaps = st.one_of(st.sampled_from([0.0, 0.3, TERMS.renew_s, TERMS.ttl_s - 0.8, TERMS.ttl_s]),
                 st.floats(0, TERMS.ttl_s * 1.2, allow_nan=False))
# A step: a replica reads the row, writes what it decided, or both at once (a read and
# its write apart let others write in between; together they make takeovers common).
READ, WRITE, BOTH = "read", "write", "both"
steps = st.lists(st.tuples(st.integers(0, 2), st.sampled_from([READ, WRITE, BOTH]), gaps),
                 min_size=1, max_size=120)
half = TERMS.max_skew_s / 2
offsets = st.lists(st.one_of(st.sampled_from([-half, 0.0, half]),
                             st.floats(-half, half, allow_nan=False)), min_size=3, max_size=3)


@settings(max_examples=500, deadline=None)
@given(steps, offsets)
def test_no_two_replicas_ever_lead_at_once(plan: list[tuple[int, str, float]],
                                          clock_offsets: list[float]) -> None:
    world = World([Replica(f"cp{i}", off) for i, off in enumerate(clock_offsets)])
    now = 1000.0
    for who, action, dt in plan:
        now += dt
        replica = world.replicas[who]
        if action in (READ, BOTH):
            world.read(replica, now)
        if action in (WRITE, BOTH):
            world.write(replica, now)
    spans = sorted((start, end, token, holder)
                   for (holder, token), (start, end) in world.terms.items())
    for (_, end, token, _), (start, _, next_token, _) in itertools.pairwise(spans):
        assert start >= end, spans  # the next term begins after the last one ran out
        assert next_token > token, spans  # and carries a higher fencing token
