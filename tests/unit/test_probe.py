from hypothesis import given
from hypothesis import strategies as st

from ferry.domain.probe import heartbeats, last_heartbeat, parse_heartbeat

LINE = ("FERRY-PROBE v1 seq=12 uptime_ms=12004 mem_mib=64 rate_mib_s=10 "
        "pages_written=30720 mem_errors=0 disk_errors=2")


def test_parses_every_field() -> None:
    hb = parse_heartbeat(LINE)
    assert hb is not None
    assert (hb.seq, hb.uptime_ms, hb.mem_mib, hb.rate_mib_s) == (12, 12004, 64, 10)
    assert (hb.pages_written, hb.mem_errors, hb.disk_errors) == (30720, 0, 2)
    assert hb.integrity_errors == 2


def test_line_with_console_noise_before_it_still_parses() -> None:
    assert parse_heartbeat("\r[  2.1] x " + LINE + "\r") is not None


def test_truncated_line_is_not_a_heartbeat() -> None:
    assert parse_heartbeat(LINE[:40]) is None
    assert parse_heartbeat("FERRY-PROBE v1 seq=3 uptime_ms=1") is None
    assert parse_heartbeat("FERRY-PROBE-READY mem_mib=64 rate_mib_s=10") is None


def test_last_heartbeat_skips_other_lines() -> None:
    lines = ["boot", LINE, "FERRY-PROBE-ERROR page=3", LINE.replace("seq=12", "seq=13")]
    assert len(heartbeats(lines)) == 2
    hb = last_heartbeat(lines)
    assert hb is not None and hb.seq == 13
    assert last_heartbeat(["nothing"]) is None


@given(st.integers(0, 2**63), st.integers(0, 2**40), st.integers(0, 10**6))
def test_roundtrip_any_numbers(seq: int, written: int, errors: int) -> None:
    line = (f"FERRY-PROBE v1 seq={seq} uptime_ms=1 mem_mib=1 rate_mib_s=0 "
            f"pages_written={written} mem_errors={errors} disk_errors=0")
    hb = parse_heartbeat(line)
    assert hb is not None and (hb.seq, hb.pages_written, hb.mem_errors) == (seq, written, errors)
