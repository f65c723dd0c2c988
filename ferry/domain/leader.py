"""Which control-plane replica leads: one lease row in the store, pure rules here.

Only the leader drives jobs, HA, DRS and schedules; every replica tries to claim the row
every `renew_s` and writes it only by compare-and-set on its version, so of two claims
made from one reading at most one lands.

The row holds the holder, the expiry (the holder's wall clock plus `ttl_s`, when it
read the row) and a fencing token, bumped by every new term (a takeover, or the holder
coming back after its own term ran out): whatever a leader writes elsewhere can carry the
token, and a higher one wins.

Clocks of replicas differ by at most `max_skew_s` (NTP keeps them well inside a second).
The holder leads while its clock is before the expiry; any other replica takes over
only once its own clock is `max_skew_s` past it. At one true instant the holder's clock
is then at least at the expiry: two replicas never lead at once (tests/unit/
test_leader.py checks it over random schedules and clock offsets).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from ferry.domain.specs import Frozen


class LeaderTerms(Frozen):
    ttl_s: float = Field(default=10.0, gt=0)
    renew_s: float = Field(default=2.0, gt=0)
    max_skew_s: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _renew_in_time(self) -> LeaderTerms:
        # A holder must get at least two renewals in before its term runs out.
        if self.renew_s * 2 >= self.ttl_s:
            raise ValueError("renew_s must be under half of ttl_s")
        return self


class LeaderLease(Frozen):
    """The lease row as read or to be written ("" holds nothing: no leader yet)."""

    holder: str = ""
    expires_at: float = 0.0
    token: int = Field(default=0, ge=0)
    version: int = Field(default=0, ge=0)  # bumped by every write (compare-and-set)


def claim(current: LeaderLease, me: str, now: float, terms: LeaderTerms,
          written: LeaderLease | None = None) -> LeaderLease | None:
    """The row `me` should write to lead from `current` (read at `now`, its clock), or
    None: another replica's term may still run. `written`: the last row this process
    wrote, if any (a term is renewed only by the process that began it)."""
    renewed = {"holder": me, "expires_at": now + terms.ttl_s, "version": current.version + 1}
    if current.holder == me:
        if now < current.expires_at and written is not None and (
                written.token == current.token):
            return current.model_copy(update=renewed)
        # Our term ran out (we stopped leading), or it was begun by an earlier process
        # of this replica (a restart: one replica id is one process at a time): a new
        # term, as a takeover would start.
        return current.model_copy(update=renewed | {"token": current.token + 1})
    if current.holder and now < current.expires_at + terms.max_skew_s:
        return None
    return current.model_copy(update=renewed | {"token": current.token + 1})


def leads(written: LeaderLease | None, me: str, now: float) -> bool:
    """Whether `me` leads at `now` (its clock), given the last row it wrote itself."""
    return written is not None and written.holder == me and now < written.expires_at
