"""The serial log's tail: whole lines only (a heartbeat half-written is not a heartbeat)."""

from __future__ import annotations

from pathlib import Path

from ferry.agent.vmfiles import SERIAL_TAIL_BYTES, tail_lines
from ferry.domain.probe import last_heartbeat

BEAT = ("FERRY-PROBE v1 seq={seq} uptime_ms=1000 mem_mib=64 rate_mib_s=0 pages_written=1 "
        "mem_errors=0 disk_errors=0 boot=4555112855618395712")


def test_a_line_being_written_is_left_out(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    whole = BEAT.format(seq=1) + "\r\n"
    log.write_text(whole + BEAT.format(seq=2)[:-13])  # cut inside the boot id
    assert tail_lines(log, 50) == [BEAT.format(seq=1)]
    hb = last_heartbeat(tail_lines(log, 50))
    assert hb is not None and hb.seq == 1 and hb.boot_id == "4555112855618395712"
    log.write_text("no newline yet")
    assert tail_lines(log, 50) == []
    assert tail_lines(tmp_path / "missing.log", 50) == []


def test_a_tail_from_the_middle_starts_at_a_whole_line(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    lines = [BEAT.format(seq=n) for n in range(SERIAL_TAIL_BYTES // len(BEAT) + 50)]
    log.write_text("\n".join(lines) + "\n")
    got = tail_lines(log, 10_000)
    assert got and got == lines[-len(got):]  # every line whole, the newest last
    assert tail_lines(log, 3) == lines[-3:]
