"""bench/backlog_cap.py's summary: a failed side fails its pair, which is counted and
left out of the ratios; the ratios are per pair."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from backlog_cap import Run, parse_args, summarize


def _ok(rtt: int, pair: int, capped: bool, rate: float, wait: float) -> Run:
    return Run(rtt_ms=rtt, pair=pair, capped=capped, ok=True, wait_ms=wait,
               result={"steady_bytes_s": rate, "sndbuf_after": 1 << 20})


def test_a_failed_side_is_counted_and_left_out(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["--rtts", "50", "--runs", "2"])
    runs = [_ok(50, 0, True, 9e6, 40.0), _ok(50, 0, False, 10e6, 240.0),
            Run(rtt_ms=50, pair=1, capped=True, error="RuntimeError('sender: boom')"),
            _ok(50, 1, False, 1e6, 999.0)]
    summary = summarize(runs, args)
    assert summary == {"throughput_ratio_min": pytest.approx(0.9),
                       "wait_delta_ms_max": pytest.approx(-200.0)}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "throughput_ratio_min=0.90 wait_delta_ms_max=-200.0 pairs=2 failed=1"


def test_bad_rtts_are_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--rtts", "20,x"])
    with pytest.raises(SystemExit):
        parse_args(["--rtts", "-5"])
