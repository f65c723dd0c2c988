"""What agent and control plane say to each other (the agent's HTTP contract)."""

from __future__ import annotations

from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address

from pydantic import Field

from ferry.domain.memory_check import MAX_PAGES_PER_CALL
from ferry.domain.migration import StreamOptions
from ferry.domain.networks import HostNetwork
from ferry.domain.probe import Heartbeat
from ferry.domain.specs import DiskSpec, Frozen, HostFacts, Name, VmSpec


class AgentVmState(StrEnum):
    """A QEMU process as its agent sees it, from the process and QMP's runstate."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    INCOMING = "incoming"  # waiting for or receiving a migration
    MIGRATED = "migrated"  # source after switchover: paused, its state sent away
    CRASHED = "crashed"  # guest panicked or QEMU hit an internal error
    EXITED = "exited"  # the process is gone

    @property
    def alive(self) -> bool:
        return self is not AgentVmState.EXITED


RUNSTATES: dict[str, AgentVmState] = {
    "running": AgentVmState.RUNNING,
    "paused": AgentVmState.PAUSED,
    "prelaunch": AgentVmState.PAUSED,
    "suspended": AgentVmState.PAUSED,
    "inmigrate": AgentVmState.INCOMING,
    "postmigrate": AgentVmState.MIGRATED,
    "finish-migrate": AgentVmState.PAUSED,
    "internal-error": AgentVmState.CRASHED,
    "guest-panicked": AgentVmState.CRASHED,
    "io-error": AgentVmState.PAUSED,
    "shutdown": AgentVmState.EXITED,
}


class VmInfo(Frozen):
    name: str
    uuid: str
    state: AgentVmState
    pid: int | None
    exit_code: int | None = None
    spec: VmSpec
    heartbeat: Heartbeat | None = None
    migration_id: str | None = None
    # True only when this agent started the QEMU paused (-S) and never sent it `cont`:
    # its guest has executed nothing here. False when unsure (e.g. after an agent restart).
    never_ran: bool = False
    # CPU time the QEMU process has used (user + system, seconds): its rate between two
    # reports is the VM's measured CPU demand (DRS).
    cpu_time_s: float | None = None


class CreateVm(Frozen):
    spec: VmSpec
    paused: bool = False
    # How long to wait for another host's lease on the VM to expire (as this agent sees
    # it) before refusing: an HA restart waits, an ordinary start does not.
    lease_wait_s: float = Field(default=0.0, ge=0, le=120)
    # The control plane's word that the lease's holder is powered off (its power driver
    # confirmed it): take the lease at once instead of waiting for it to expire.
    lease_take_over: bool = False


class NewDisk(Frozen):
    """An empty image the destination creates and fills over NBD (no shared storage)."""

    disk: DiskSpec
    # Bytes, as QEMU reports a virtual size: whole 512-byte sectors (a negative size
    # reached qemu-img's argv as an option, "-1", and failed as a 502: found fuzzing).
    size: int = Field(ge=0, multiple_of=512)


class PrepareIncoming(Frozen):
    migration_id: str
    spec: VmSpec
    options: StreamOptions = Field(default_factory=StreamOptions)
    new_disks: tuple[NewDisk, ...] = ()
    # Encrypted streams: the only host allowed to connect (None: cleartext).
    tls_peer: Name | None = None
    # Cleartext streams: the only address let connect (its listeners filtered).
    source_address: IPv4Address | IPv6Address | None = None


class IncomingReady(Frozen):
    uri: str
    nbd: str | None = None  # host:port of the NBD server exporting the new disks


class DiskMirrors(Frozen):
    """Mirror a VM's disks to the destination's NBD exports, for a migration."""

    migration_id: str
    nbd: str = ""
    disks: tuple[str, ...]
    tls_peer: Name | None = None  # the NBD server's host, whose certificate is checked


class StartOutgoing(Frozen):
    migration_id: str
    uri: str  # only tcp:<IPv4>:<port>; the agent refuses anything else
    tls_peer: Name | None = None  # the destination host, whose certificate is checked
    options: StreamOptions = Field(default_factory=StreamOptions)
    downtime_ms: int = Field(default=300, ge=1, le=60_000)  # as Tune's


class ResumeOutgoing(Frozen):
    """Reconnect a paused post-copy to where its destination now listens."""

    migration_id: str
    uri: str


class Tune(Frozen):
    """A convergence lever pulled on a running outgoing migration."""

    downtime_ms: int | None = Field(default=None, ge=1, le=60_000)
    throttle_pct: int | None = Field(default=None, ge=1, le=99)
    postcopy: bool = False
    # Cap the stream's send buffer at the path's BDP plus this many ms of throughput.
    backlog_margin_ms: int | None = Field(default=None, ge=1, le=1000)


class LeaseView(Frozen):
    owner: str
    generation: int
    counter: int
    released: bool = False


class DatastoreView(Frozen):
    """The HA datastore as one agent reads it: every host's heartbeat counter and every
    VM lease. The control plane notes when counters change, on its own clock."""

    datastore: str
    ok: bool  # this agent's last renewal round reached the datastore
    hosts: dict[str, int] = Field(default_factory=dict)
    leases: dict[str, LeaseView] = Field(default_factory=dict)


class AgentHeartbeat(Frozen):
    facts: HostFacts
    vms: tuple[VmInfo, ...]
    url: str
    datastore: DatastoreView | None = None


class SerialTail(Frozen):
    lines: tuple[str, ...]


class MirrorRequest(Frozen):
    """Start, pivot or cancel the live copy of one disk to `target` (same disk name)."""

    job_id: str
    target: DiskSpec
    speed_bytes_s: int = Field(default=0, ge=0, le=2**63 - 1)  # QEMU's int64


class ImageRef(Frozen):
    disk: DiskSpec


class ApplyNetworks(Frozen):
    """Every VM network this host must provide, exactly (absent ones are removed)."""

    networks: tuple[HostNetwork, ...]


class NetworkResult(Frozen):
    name: str
    ok: bool
    error: str | None = None


class RamDigestRequest(Frozen):
    """No chunks: one digest per chunk of the whole RAM; chunks: their pages' digests."""

    chunks: tuple[int, ...] | None = Field(default=None, max_length=4096)


class RamDigests(Frozen):
    digests: str  # base64 of little-endian u64 xxh3-64 digests


class RamPagesRequest(Frozen):
    pages: tuple[int, ...] = Field(min_length=1, max_length=MAX_PAGES_PER_CALL)


class RamPages(RamPagesRequest):
    data: str  # base64 of the pages' contents, in the order of `pages`
