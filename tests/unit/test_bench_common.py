"""The benchmarks' shared pairing rules (bench/common.py): ABBA order, failure counts."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from common import abba, abba_order, count_pairs, pair_fields


def test_abba_alternates_which_side_runs_first() -> None:
    orders = [abba(i, "ferry", "raw") for i in range(4)]
    assert orders == [("ferry", "raw"), ("raw", "ferry"), ("ferry", "raw"), ("raw", "ferry")]
    firsts = [o[0] for o in orders]
    assert firsts.count("ferry") == firsts.count("raw")


def test_abba_order_alternates_every_pair_of_many_sides() -> None:
    groups = [abba_order(i, ["qemu-defaults", "nova", "ferry"]) for i in range(2)]
    assert groups == [["qemu-defaults", "nova", "ferry"], ["ferry", "nova", "qemu-defaults"]]
    for other in ("qemu-defaults", "nova"):
        before = [g.index("ferry") < g.index(other) for g in groups]
        assert sorted(before) == [False, True]


def test_a_pair_with_a_failed_side_counts_as_failed() -> None:
    sides = [(True, True), (True, False), (False, True), (False, False)]
    assert count_pairs(sides) == (4, 3)
    assert pair_fields(sides) == "pairs=4 failed=3"
    assert pair_fields([]) == "pairs=0 failed=0"
