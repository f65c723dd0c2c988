"""Host facts probed from the filesystem."""

from __future__ import annotations

from pathlib import Path

from ferry.agent.facts import takes_direct_io


def test_direct_io_probe_on_a_real_directory_leaves_nothing_behind(tmp_path: Path) -> None:
    # /tmp's filesystem here takes O_DIRECT (ext4, or tmpfs since Linux 6.6)
    assert takes_direct_io(str(tmp_path)) is True
    assert list(tmp_path.iterdir()) == []


def test_direct_io_probe_of_a_missing_directory_does_not_raise(tmp_path: Path) -> None:
    assert takes_direct_io(str(tmp_path / "absent")) is True  # cannot tell: QEMU will say
