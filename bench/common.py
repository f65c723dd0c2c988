"""Helpers shared by the benchmarks: their own throw-away lab, probe heartbeats, medians.

Each benchmark brings up a lab of its own (own prefix, subnet and control port, in a
temporary directory unless --lab-dir) and always tears it down, also on Ctrl-C/SIGTERM.
FERRY_BENCH_PREFIX, FERRY_BENCH_SUBNET_OCTET and FERRY_BENCH_PORT override a script's
prefix, subnet (198.18.N.0/24) and control port, so two people can run the same script
on one machine at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from ferry.cli.client import Client
from ferry.domain.errors import FerryError, NotFound
from ferry.domain.probe import Heartbeat
from ferry.lab import cluster
from ferry.lab.config import LabConfig

MIB = 1 << 20
R = TypeVar("R")
T = TypeVar("T")
BOOT_TIMEOUT_S = 120.0


# --- arguments --------------------------------------------------------------------
def rate_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_guest_args(p: argparse.ArgumentParser, rates: str) -> None:
    """--rates, --memory, --probe-mib, --lab-dir, --json (checked by check_guest_args)."""
    p.add_argument("--rates", default=rates, type=rate_list,
                   help=f"probe dirty rates in MiB/s, comma-separated (default {rates})")
    p.add_argument("--memory", type=int, default=256, help="guest memory in MiB")
    p.add_argument("--probe-mib", type=int, default=128,
                   help="memory the probe dirties and checks (at most ~memory-72)")
    p.add_argument("--lab-dir", type=Path, help="lab directory (default: a fresh temp dir)")
    p.add_argument("--json", type=Path, help="write every measurement here")


def check_guest_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.rates:
        p.error("need at least one rate")
    if args.probe_mib > args.memory - 72:
        p.error(f"--probe-mib must be at most --memory - 72 ({args.memory - 72})")


# --- the lab ----------------------------------------------------------------------
def preflight(script: str) -> int | None:
    """An exit code if this machine cannot run a benchmark, else None."""
    if os.geteuid() != 0:
        print(f"{script} needs root: it creates network namespaces and a bridge for its "
              "lab (run it with sudo)", file=sys.stderr)
        return 2
    if not all((cluster.GUEST_DIR / f).exists() for f in cluster.GUEST_FILES):
        print(f"no guest image in {cluster.GUEST_DIR}: run `make guest`", file=sys.stderr)
        return 2
    return None


@dataclass
class BenchLab:
    config: LabConfig
    up_s: float = 0.0
    keep_logs: bool = True  # set False once the benchmark ran cleanly


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def bench_lab(lab_dir: Path | None, hosts: int, prefix: str, subnet_octet: int,
              control_port: int, lab_options: Mapping[str, Any] | None = None
              ) -> Iterator[BenchLab]:
    """A fresh lab, torn down on the way out whatever happens (SIGTERM raises
    KeyboardInterrupt in here like Ctrl-C). An own temp dir is removed unless
    `keep_logs` is still set; the caller catches the KeyboardInterrupt. `lab_options`
    are further LabConfig fields (e.g. control_planes=2, db="postgresql"; replicas
    listen on control_port, +1, ...)."""
    signal.signal(signal.SIGTERM, _terminate)
    prefix = os.environ.get("FERRY_BENCH_PREFIX", prefix)
    subnet_octet = int(os.environ.get("FERRY_BENCH_SUBNET_OCTET", subnet_octet))
    control_port = int(os.environ.get("FERRY_BENCH_PORT", control_port))
    own_dir = lab_dir is None
    directory = Path(tempfile.mkdtemp(prefix="ferry-bench-")) if lab_dir is None else lab_dir
    lab = BenchLab(LabConfig.default(directory, hosts, prefix=prefix,
                                     subnet_octet=subnet_octet, control_port=control_port,
                                     **dict(lab_options or {})))
    try:
        cluster.down(lab.config)  # leftovers of an earlier crashed run in the same directory
        began = time.monotonic()
        cluster.up(lab.config)
        lab.up_s = time.monotonic() - began
        yield lab
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not stop teardown
            signal.signal(sig, signal.SIG_IGN)
        print("tearing the lab down", flush=True)
        cluster.down(lab.config)
        if own_dir and not lab.keep_logs:
            shutil.rmtree(directory, ignore_errors=True)
        elif own_dir:
            print(f"logs kept in {lab.config.logs_dir}", flush=True)


def run_in_lab(script: str, lab_dir: Path | None, hosts: int, *, prefix: str,
               subnet_octet: int, control_port: int, banner: Callable[[BenchLab], str],
               body: Callable[[LabConfig], list[R]], failed: Callable[[list[R]], bool],
               lab_options: Mapping[str, Any] | None = None) -> list[R] | int:
    """Check the machine, run `body` in a fresh lab and tear it down; the runs, or an
    exit code (2: this machine cannot run it, 130: interrupted). The lab's logs are
    kept when `failed(runs)` says something went wrong. `lab_options`: see bench_lab."""
    if (code := preflight(script)) is not None:
        return code
    try:
        with bench_lab(lab_dir, hosts, prefix=prefix, subnet_octet=subnet_octet,
                       control_port=control_port, lab_options=lab_options) as lab:
            print(f"lab up in {lab.config.directory} ({lab.up_s:.1f} s); {banner(lab)}",
                  flush=True)
            runs = body(lab.config)
            lab.keep_logs = failed(runs)
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'Ctrl-C'}): no results", file=sys.stderr)
        return 130
    return runs


# --- VMs through the control plane ------------------------------------------------
def ferry_heartbeat(client: Client, vm: str, after_seq: int,
                    timeout_s: float = BOOT_TIMEOUT_S) -> Heartbeat:
    """The VM's latest probe heartbeat (as the control plane reports it) past after_seq."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        hb = (client.call("GET", f"/v1/vms/{vm}").get("live") or {}).get("heartbeat")
        if hb and hb["seq"] > after_seq:
            return Heartbeat.model_validate(hb)
        time.sleep(0.2)
    raise FerryError(f"VM {vm}: no probe heartbeat past seq {after_seq}")


def remove_vm(client: Client, vm: str) -> None:
    """Stop (forced) and delete a VM; one that is already gone is fine."""
    with contextlib.suppress(NotFound):
        client.call("POST", f"/v1/vms/{vm}/stop", force=True)
        client.call("DELETE", f"/v1/vms/{vm}")


def problem(exc: BaseException) -> str:
    return exc.problem if isinstance(exc, FerryError) else repr(exc)


# --- honest pairs -----------------------------------------------------------------
def abba(pair: int, first: T, second: T) -> tuple[T, T]:
    """The order of one pair's two sides: pair 0 runs `first` then `second`, pair 1 the
    other way round, and so on (ABBA), so neither side always runs first (on a machine
    warmed, or slowed, by the run before it)."""
    a, b = abba_order(pair, (first, second))
    return a, b


def abba_order(group: int, items: Sequence[T]) -> list[T]:
    """ABBA for more than two: group 0 in the given order, group 1 reversed, ... so
    within every two groups each pair of items runs once either way round."""
    return list(items) if group % 2 == 0 else list(reversed(items))


def count_pairs(sides: list[tuple[bool, bool]]) -> tuple[int, int]:
    """(pairs, failed) over the pairs' (ok, ok) outcomes: a pair with a failed or
    missing side is failed and stays out of every ratio, but is counted here."""
    return len(sides), sum(1 for a, b in sides if not (a and b))


def pair_fields(sides: list[tuple[bool, bool]]) -> str:
    """`pairs=<n> failed=<n>` for a summary line."""
    total, failed = count_pairs(sides)
    return f"pairs={total} failed={failed}"


# --- numbers ----------------------------------------------------------------------
def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
