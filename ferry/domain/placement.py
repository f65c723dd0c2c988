"""Placement on create: the named host, or the first host with room."""

from __future__ import annotations

from collections.abc import Sequence

from ferry.domain.compat import check_host
from ferry.domain.errors import Incompatible, NoCapacity, NotFound
from ferry.domain.inventory import HostSnapshot
from ferry.domain.specs import VmSpec


def place(spec: VmSpec, hosts: Sequence[HostSnapshot], wanted: str | None = None) -> str:
    if wanted is not None:
        host = next((h for h in hosts if h.name == wanted), None)
        if host is None:
            known = ", ".join(h.name for h in hosts) or "none"
            raise NotFound(f"there is no host {wanted!r}", f"known hosts: {known}")
        refusals = check_host(spec, host)
        if refusals:
            raise Incompatible("; ".join(r.message for r in refusals))
        return host.name
    biggest = max((h.memory_mib for h in hosts), default=0)
    if spec.memory_mib > biggest:
        raise NoCapacity(
            f"the VM wants {spec.memory_mib} MiB but the largest host has {biggest} MiB",
            "give the VM less memory or add a bigger host",
        )
    reasons: list[str] = []
    for host in sorted(hosts, key=lambda h: h.name):
        refusals = check_host(spec, host)
        if not refusals:
            return host.name
        reasons.extend(r.message for r in refusals)
    raise NoCapacity("no host can run the VM: " + "; ".join(reasons) if reasons
                     else "the cluster has no hosts", "add a host or free capacity")
