"""Host facts probed from the filesystem and from a throwaway QEMU."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.agent import facts
from ferry.agent.facts import takes_direct_io
from ferry.hypervisor.errors import QemuStartError


def test_direct_io_probe_on_a_real_directory_leaves_nothing_behind(tmp_path: Path) -> None:
    # /tmp's filesystem here takes O_DIRECT (ext4, or tmpfs since Linux 6.6)
    assert takes_direct_io(str(tmp_path)) is True
    assert list(tmp_path.iterdir()) == []


def test_direct_io_probe_of_a_missing_directory_does_not_raise(tmp_path: Path) -> None:
    assert takes_direct_io(str(tmp_path / "absent")) is True  # cannot tell: QEMU will say


async def test_a_probe_qemu_that_never_answers_is_replaced_by_another(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A QEMU that accepted the QMP socket but never greeted kept an agent from
    starting (seen once in a lab start): the probe kills it and asks a new one."""
    tried: list[int] = []
    caps = facts.QemuCapabilities(version="7.2.0", cpu_models=("Nehalem",),
                                  machine_types=("pc-i440fx-7.2",), machine_aliases={})

    async def once(accel: str) -> facts.QemuCapabilities:
        tried.append(len(tried))
        if len(tried) < 3:
            raise QemuStartError("QEMU for probe did not answer on QMP")
        return caps

    monkeypatch.setattr(facts, "_probe_once", once)
    assert await facts.probe_qemu("tcg") == caps
    assert len(tried) == 3
    tried.clear()
    with pytest.raises(QemuStartError, match="did not answer"):
        await facts.probe_qemu("tcg", attempts=2)
    assert len(tried) == 2


async def test_the_probe_asks_a_real_qemu() -> None:
    found = await facts.probe_qemu("tcg")
    assert found.version.startswith("7.") and "Nehalem" in found.cpu_models
    assert any(m.startswith("pc-i440fx-") for m in found.machine_types)
