"""The control plane's term, as an agent sees it: the fencing token of the leader lease.

Every call of a control plane carries its term (header `X-Ferry-Term`; 0 from a replica
that does not lead). The agent keeps the highest term it has seen (in its run
directory, so a restarted agent still knows it) and refuses a change from a lower one:
a replica whose term was taken over cannot move or stop a VM behind the new leader's
back, even in the moment before it notices. Reads are answered whatever the term. A call
without the header (a tool holding the control plane's certificate, an older control
plane) is not fenced.
"""

from __future__ import annotations

import os
from pathlib import Path

from ferry.domain.errors import InvalidInput, NotLeader

HEADER = "x-ferry-term"
MAX_TERM = 2**63 - 1  # the lease row's token is a 64-bit column
READS = frozenset({"GET", "HEAD", "OPTIONS"})


class TermFence:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.highest = int(path.read_text().strip() or 0)
        except (OSError, ValueError):
            self.highest = 0

    def admit(self, method: str, header: str | None) -> None:
        """Raise unless a call with this method and term header may go on."""
        if header is None:
            return
        try:
            term = int(header) if len(header) <= 19 else -1
        except ValueError:
            term = -1
        if not 0 <= term <= MAX_TERM:
            raise InvalidInput(f"{HEADER} {header[:40]!r} is not a term (a whole number "
                               f"0 to {MAX_TERM})",
                               "the control plane sends its leader term there")
        if term > self.highest:
            self._remember(term)
        if term < self.highest and method not in READS:
            raise NotLeader(
                f"a control plane of term {term} asked for a change, but term "
                f"{self.highest} has begun: only the current leader drives this agent",
                "nothing was done; the leading replica drives the cluster")

    def _remember(self, term: int) -> None:
        self.highest = term
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(str(term))
            os.replace(tmp, self.path)
        except OSError:
            pass  # kept in memory; a restart then learns it again from the next call
