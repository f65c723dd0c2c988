"""The benchmarks' client-view summaries: which gaps count, how TCP breaks are counted."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from client_view import View
from convergence_sweep import Run as SweepRun
from migrate_vs_qemu import Run, client_table, gaps, tcp_broken

from ferry.lab.echo import EchoReport


def view(gap_ms: float, broken: bool = False) -> View:
    return View(gap_ms=gap_ms, tcp_broken=broken, tcp_error=None, tcp_bytes_sent=160,
                tcp_bytes_echoed=160, udp_sent=1000, udp_lost=3)


def test_view_of_a_report_counts_an_unconnected_tcp_as_broken() -> None:
    report = EchoReport(target="198.19.1.10", started_at=0.0, duration_s=1.0, udp_sent=10,
                        udp_replies=9, udp_lost=1, max_gap_ms=12.34, max_gap_start=0.0,
                        tcp_connected=False, tcp_bytes_sent=0, tcp_bytes_echoed=0,
                        tcp_broken=False, tcp_error=None)
    v = View.of(report)
    assert v.gap_ms == 12.3 and v.tcp_broken
    assert v.record()["tcp_survived"] is False


def test_gaps_only_of_completed_migrations_and_broken_tcp_counted_either_way() -> None:
    ok = Run("ferry", 0, 0, "host1", "host2", ok=True, migrated=True, view=view(50.0))
    failed = Run("ferry", 0, 1, "host2", "host1", view=view(900.0, broken=True))
    raw = Run("raw", 0, 0, "host1", "host2", ok=True, migrated=True, view=view(40.0, True))
    runs = [ok, failed, raw]
    assert gaps(runs, "ferry") == [50.0]
    assert tcp_broken(runs) == 2
    rows, table = client_table(runs, [0])
    assert rows[0]["ferry_tcp_survived"] == "1/2" and rows[0]["raw_tcp_survived"] == "0/1"
    assert rows[0]["gap_delta_ms"] == 10.0
    assert "| 0 |" in table


def test_sweep_reports_no_gap_for_an_aborted_cell() -> None:
    aborted = SweepRun(48, 0, "qemu-defaults", "vm", completed=False, view=view(5.0))
    done = SweepRun(48, 0, "ferry", "vm", completed=True, view=view(7.0))
    assert aborted.gap_ms is None and done.gap_ms == 7.0
