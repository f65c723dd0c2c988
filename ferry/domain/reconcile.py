"""Compare what the store says runs where with what the agents report (pure).

The control plane runs this continuously. A VM whose location is in doubt becomes
`unknown` (it cannot be started anywhere), and an `unknown` VM is resolved only from
evidence: every host reporting, and exactly one copy, running. Nothing is guessed.

    store says          agents report (all hosts)          →  finding
    running on H        nothing anywhere                   →  crashed
    running on H        nothing on H, one running copy on G →  running on G (moved)
    running on H        H unreachable, or copies elsewhere  →  unknown
    running on H        a running copy on H and on G       →  unknown (double run!)
    defined / crashed   a running copy somewhere           →  unknown
    unknown             exactly one copy, running, on G    →  running on G
    unknown             no copy anywhere                   →  crashed
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from ferry.domain.inventory import VmState
from ferry.domain.records import VmRecord
from ferry.domain.specs import Frozen

# What one host's agent reports of one VM: True if its guest executes (running).
Report = Mapping[str, Mapping[str, bool]]
_PLACED = (VmState.RUNNING, VmState.PAUSED)


class FindingKind(StrEnum):
    CRASHED = "crashed"  # recorded as running, no copy anywhere
    MOVED = "moved"  # recorded on one host, runs on another
    IN_DOUBT = "in_doubt"  # cannot tell where it runs: unknown
    DOUBLE = "double"  # running copies on two hosts
    UNEXPECTED = "unexpected"  # a running copy of a VM recorded as not running
    RESOLVED = "resolved"  # an unknown VM found running once


class Finding(Frozen):
    vm: str
    kind: FindingKind
    state: VmState
    host: str
    message: str


def reconcile(vms: list[VmRecord], reports: Report, hosts: set[str],
              connected: set[str], busy: set[str]) -> list[Finding]:
    """Findings for VMs that no job or operation is busy with. `reports` holds the
    latest report of each connected host; `hosts` are all hosts of the cluster."""
    everyone = connected >= hosts
    out: list[Finding] = []
    for vm in vms:
        if vm.name in busy or vm.state is VmState.MIGRATING:
            continue
        copies = {h: running for h, seen in reports.items() if h in connected
                  for name, running in seen.items() if name == vm.name}
        runs = sorted(h for h, running in copies.items() if running)
        found = _judge(vm, copies, runs, everyone, vm.host in connected)
        if found is not None:
            out.append(found)
    return out


def _judge(vm: VmRecord, copies: dict[str, bool], runs: list[str], everyone: bool,
           home_reports: bool) -> Finding | None:
    name, home = vm.name, vm.host
    if vm.state in _PLACED:
        if len(runs) > 1:
            return Finding(vm=name, kind=FindingKind.DOUBLE, state=VmState.UNKNOWN, host=home,
                           message=f"VM {name} runs on {' and '.join(runs)} at once")
        if not home_reports or home in copies:
            return None  # as recorded (or its host is silent: the heartbeat says so)
        if everyone and not copies:
            return Finding(vm=name, kind=FindingKind.CRASHED, state=VmState.CRASHED,
                           host=home, message=f"VM {name} was recorded {vm.state} on "
                           f"{home}, but no host runs it")
        if everyone and len(copies) == 1 and runs:
            return Finding(vm=name, kind=FindingKind.MOVED, state=VmState.RUNNING,
                           host=runs[0], message=f"VM {name} was recorded on {home} but "
                           f"runs on {runs[0]} (and nowhere else)")
        return Finding(vm=name, kind=FindingKind.IN_DOUBT, state=VmState.UNKNOWN, host=home,
                       message=f"VM {name} is not on {home} where it was recorded, and "
                       "where it is cannot be told from the hosts' reports")
    if vm.state is VmState.UNKNOWN:
        if not everyone:
            return None
        if len(copies) == 1 and runs:
            return Finding(vm=name, kind=FindingKind.RESOLVED, state=VmState.RUNNING,
                           host=runs[0], message=f"VM {name}, in doubt, runs on {runs[0]} "
                           "and nowhere else")
        if not copies:
            return Finding(vm=name, kind=FindingKind.CRASHED, state=VmState.CRASHED,
                           host=home, message=f"VM {name}, in doubt, runs on no host")
        return None  # copies paused or several: an operator decides (ferry vm stop)
    if runs:  # DEFINED or CRASHED, but a copy executes somewhere
        return Finding(vm=name, kind=FindingKind.UNEXPECTED, state=VmState.UNKNOWN, host=home,
                       message=f"VM {name} is recorded {vm.state} but runs on "
                       f"{', '.join(runs)}")
    return None
