"""An agent's fence against a deposed leader (ferry/agent/terms.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.agent.terms import TermFence
from ferry.domain.errors import InvalidInput, NotLeader


def test_a_lower_term_may_read_but_not_change(tmp_path: Path) -> None:
    fence = TermFence(tmp_path / "control-term")
    fence.admit("POST", "3")
    fence.admit("POST", "3")  # the same leader again
    with pytest.raises(NotLeader, match="term 2 asked for a change, but term 3"):
        fence.admit("POST", "2")
    with pytest.raises(NotLeader):
        fence.admit("DELETE", "0")  # a replica that knows it does not lead
    fence.admit("GET", "2")  # reads are answered whatever the term
    fence.admit("POST", "4")  # a newer leader takes over
    with pytest.raises(NotLeader):
        fence.admit("POST", "3")
    fence.admit("POST", None)  # no term given: not fenced (tools, older planes)


def test_the_highest_term_survives_an_agent_restart(tmp_path: Path) -> None:
    TermFence(tmp_path / "run" / "control-term").admit("POST", "7")
    again = TermFence(tmp_path / "run" / "control-term")
    assert again.highest == 7
    with pytest.raises(NotLeader):
        again.admit("POST", "6")


@pytest.mark.parametrize("header", ["x", "1.5", "-1", "", "9" * 19, "9" * 5000])
def test_a_term_that_is_no_64_bit_whole_number_is_refused(tmp_path: Path, header: str
                                                         ) -> None:
    # Not even from the control plane's certificate: a huge term would lock out every
    # later leader.
    fence = TermFence(tmp_path / "control-term")
    with pytest.raises(InvalidInput):
        fence.admit("POST", header)
    assert fence.highest == 0
