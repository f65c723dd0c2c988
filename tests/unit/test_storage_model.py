"""Storage vMotion's pure parts: the phase machine, the checks, the stalled-copy watch."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.domain.errors import Conflict
from ferry.domain.specs import DatastoreInfo, DiskFormat, DiskSpec, Provisioning
from ferry.domain.storage import (
    CopyWatch,
    ImageInfo,
    RelocationPhase,
    check_relocation,
    relocation_transition,
)

MIB = 1 << 20
DISK = DiskSpec(name="root", datastore="shared", path="vm/root.qcow2")
IMAGE = ImageInfo(path="/srv/shared/vm/root.qcow2", format=DiskFormat.QCOW2,
                  virtual_size=1024 * MIB, allocated=300 * MIB)


def target(provisioning: Provisioning = Provisioning.THIN, datastore: str = "fast",
           path: str = "vm/root.qcow2") -> DiskSpec:
    return DiskSpec(name="root", datastore=datastore, path=path, provisioning=provisioning)


def store(free_mib: int, name: str = "fast") -> DatastoreInfo:
    return DatastoreInfo(name=name, path=f"/srv/{name}", shared=False,
                         total_bytes=4096 * MIB, free_bytes=free_mib * MIB)


def test_thin_needs_the_allocated_bytes_thick_the_virtual_size() -> None:
    assert check_relocation(DISK, target(), IMAGE, store(400), False) == []
    [reason] = check_relocation(DISK, target(Provisioning.THICK), IMAGE, store(400), False)
    assert "has 400 MiB free, the thick copy needs 1024 MiB" in reason
    assert "choose thin" in reason


def test_every_reason_is_reported_at_once() -> None:
    reasons = check_relocation(DISK, target(), IMAGE, store(100), target_exists=True)
    assert len(reasons) == 2
    assert "needs 300 MiB" in reasons[0] and "already exists" in reasons[1]


def test_an_unseen_datastore_and_a_move_onto_itself_are_refused() -> None:
    [unseen] = check_relocation(DISK, target(), IMAGE, None, False)
    assert "does not see datastore fast" in unseen
    [same] = check_relocation(DISK, target(datastore="shared"), IMAGE, store(9999, "shared"),
                              target_exists=True)
    assert "already is shared:vm/root.qcow2" in same


def test_a_datastore_without_o_direct_is_refused_for_a_cache_none_disk() -> None:
    no_odirect = store(4000).model_copy(update={"direct_io": False})
    [reason] = check_relocation(DISK, target(), IMAGE, no_odirect, False)
    assert "fast does not support O_DIRECT" in reason


def test_phases_only_move_forward_or_into_rollback() -> None:
    assert relocation_transition(RelocationPhase.COPYING, RelocationPhase.PIVOTING) \
        is RelocationPhase.PIVOTING
    with pytest.raises(Conflict, match="from copying to completed"):
        relocation_transition(RelocationPhase.COPYING, RelocationPhase.COMPLETED)
    with pytest.raises(Conflict):
        relocation_transition(RelocationPhase.COMPLETED, RelocationPhase.ROLLING_BACK)


def test_a_copy_that_keeps_gaining_never_stalls() -> None:
    watch = CopyWatch()
    for second, left in enumerate(range(500 * MIB, 0, -7 * MIB)):
        watch = watch.observe(float(second), left)
        assert not watch.stalled(float(second), timeout_s=5)


def test_a_copy_the_guest_outruns_stalls_after_the_timeout() -> None:
    watch = CopyWatch().observe(0.0, 100 * MIB)
    # the guest dirties faster than the copy goes: `left` grows, with small dips
    for second, left in enumerate([120, 110, 130, 125, 140, 150], start=1):
        watch = watch.observe(float(second), left * MIB)
    assert not watch.stalled(6.0, timeout_s=8)
    assert watch.stalled(8.5, timeout_s=8)
    # a new low resets the clock
    assert not watch.observe(8.5, 99 * MIB).stalled(9.0, timeout_s=8)


@given(st.lists(st.integers(min_value=0, max_value=1 << 40), min_size=1, max_size=50),
       st.floats(min_value=1, max_value=1000))
def test_stalled_only_after_timeout_without_a_new_low(lefts: list[int], timeout: float
                                                      ) -> None:
    watch = CopyWatch()
    lowest_at = 0.0
    for second, left in enumerate(lefts):
        if watch.best_left is None or left < watch.best_left:
            lowest_at = float(second)
        watch = watch.observe(float(second), left)
    now = float(len(lefts))
    assert watch.stalled(now, timeout) == (now - lowest_at > timeout)
