import itertools
import re

from hypothesis import given
from hypothesis import strategies as st

from ferry.domain.probe import (
    Heartbeat,
    full_pass_after,
    heartbeats,
    judge_intact,
    last_heartbeat,
    page_errors,
    page_pattern,
    parse_heartbeat,
    probe_address,
)

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


NEW_LINE = LINE + " disk_written=0 disk_passes=0 mem_passes=3 boot=16459765182229226411"


def test_new_fields_parse_and_old_lines_take_defaults() -> None:
    hb = parse_heartbeat(NEW_LINE + "\r")
    assert hb is not None
    assert (hb.mem_passes, hb.boot_id, hb.seq) == (3, "16459765182229226411", 12)
    old = parse_heartbeat(LINE)
    assert old is not None and (old.mem_passes, old.boot_id) == (0, "")


def test_a_parser_of_the_old_line_format_still_reads_the_new_line() -> None:
    # the regular expression the parser had before the boot id and mem_passes existed
    old = re.compile(r"FERRY-PROBE v1((?: [a-z_]+=\d+)+)\s*$")
    match = old.search(NEW_LINE)
    assert match is not None and "seq=12" in match.group(1)


def test_probe_address_and_page_errors_parse() -> None:
    lines = ["FERRY-PROBE-ADDR page=0 vaddr=0x7f00a000 gpa=0x2e3c000 boot=77\r",
             "FERRY-PROBE-ERROR page=0 want_gen=0 word=5 got=0x00000000deadbeef "
             "want=0x1234567890abcdef hdr_page=0 hdr_gen=0 during=sweep\r"]
    addr = probe_address(lines)
    assert addr is not None and (addr.vaddr, addr.gpa, addr.boot_id) == (0x7F00A000,
                                                                          0x2E3C000, "77")
    none = probe_address(["FERRY-PROBE-ADDR page=0 vaddr=0x1000 gpa=none boot=1"])
    assert none is not None and none.gpa is None
    assert probe_address(["nothing"]) is None
    (err,) = page_errors(lines)
    assert (err.page, err.word, err.got, err.want) == (0, 5, 0xDEADBEEF,
                                                       0x1234567890ABCDEF)


def beat(seq: int, boot: str = "42", passes: int | None = None, written: int | None = None,
         mem_errors: int = 0, disk_errors: int = 0, rate: int = 5,
         uptime: int | None = None) -> Heartbeat:
    """A heartbeat as a probe running since seq 0 would print it at second `seq`."""
    return Heartbeat(seq=seq, uptime_ms=seq * 1000 if uptime is None else uptime,
                     mem_mib=64, rate_mib_s=rate,
                     pages_written=seq * rate * 256 if written is None else written,
                     mem_errors=mem_errors, disk_errors=disk_errors,
                     mem_passes=seq // 5 if passes is None else passes, boot_id=boot)


def test_a_guest_that_lived_through_the_migration_is_intact() -> None:
    assert judge_intact(beat(10), [beat(s) for s in range(13, 26)]) == []


def test_a_rebooted_guest_fails_even_with_clean_counters() -> None:
    # a cold boot on the target: a new boot id, its own counters from 1
    problems = judge_intact(beat(100), [beat(s, boot="43") for s in range(1, 16)])
    assert any("rebooted" in p and "42" in p and "43" in p for p in problems), problems
    assert any("seq went back" in p for p in problems)
    # even if its counters happened to be ahead, the boot id gives it away
    problems = judge_intact(beat(10), [beat(s, boot="43") for s in range(13, 26)])
    assert len(problems) == 1 and "rebooted" in problems[0]


def test_uptime_going_backwards_fails() -> None:
    after = [beat(13), beat(14, uptime=9000), *[beat(s) for s in range(15, 26)]]
    problems = judge_intact(beat(10), after)
    assert problems == ["uptime_ms went back from 13000 to 9000 (seq 13 -> 14)"]


def test_uptime_that_did_not_grow_fails() -> None:
    after = [beat(s, uptime=10_000) for s in range(13, 26)]
    assert any("uptime did not grow" in p for p in judge_intact(beat(10), after))


def test_pages_written_must_grow_only_when_the_probe_dirties() -> None:
    stuck = [beat(s, written=12800) for s in range(13, 26)]
    assert any("stopped dirtying" in p for p in judge_intact(beat(10), stuck))
    idle = [beat(s, rate=0) for s in range(13, 26)]
    assert judge_intact(beat(10, rate=0), idle) == []


def test_no_completed_full_pass_after_the_switch_fails() -> None:
    # passes 2 -> 3 only: pass 3 began before the first heartbeat after the switch
    after = [beat(s) for s in range(13, 19)]
    problems = judge_intact(beat(10), after)
    assert len(problems) == 1 and "no full memory verify pass" in problems[0], problems
    assert not full_pass_after(after)
    assert full_pass_after([*after, beat(20)])
    assert not full_pass_after([])


def test_any_integrity_error_fails() -> None:
    after = [beat(s, mem_errors=1 if s > 20 else 0) for s in range(13, 26)]
    assert judge_intact(beat(10), after) == [
        "integrity errors: mem_errors=1 disk_errors=0 (first seen at seq 21)"]
    after = [beat(s) for s in range(13, 26)]
    assert "disk_errors=2" in judge_intact(beat(10, disk_errors=2), after)[0]


def test_no_heartbeat_after_or_no_boot_id_fails() -> None:
    assert judge_intact(beat(10), []) == ["no probe heartbeat after the event"]
    problems = judge_intact(beat(10, boot=""), [beat(s, boot="") for s in range(13, 26)])
    assert len(problems) == 1 and "no boot id" in problems[0]


@given(st.integers(1, 50), st.integers(0, 5), st.integers(3, 40), st.booleans())
def test_a_clean_run_is_intact_iff_two_passes_completed(
        start: int, gap: int, length: int, reboot: bool) -> None:
    before = beat(start)
    first = start + gap + 1
    after = [beat(s, boot="7" if reboot else "42") for s in range(first, first + length)]
    problems = judge_intact(before, after)
    if reboot:
        assert any("rebooted" in p for p in problems)
    else:
        assert (problems == []) == (after[-1].mem_passes >= after[0].mem_passes + 2)


def test_page_pattern_follows_the_probe() -> None:
    page = page_pattern(3, 7)
    assert len(page) == 4096
    assert int.from_bytes(page[:8], "little") == (3 << 32) | 7
    words = [int.from_bytes(page[i:i + 8], "little") for i in range(8, 4096, 8)]
    step = 0x9E3779B97F4A7C15
    assert all((b - a) % 2**64 == step for a, b in itertools.pairwise(words))
    assert page_pattern(3, 8) != page and page_pattern(4, 7) != page
