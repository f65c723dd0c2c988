"""The lab's declared shape (hosts, capacities, addresses) and where its state lives."""

from __future__ import annotations

import os
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ferry.domain.errors import Conflict, InvalidInput
from ferry.domain.specs import Frozen, Name

DEFAULT_LAB_DIR = Path(os.environ.get("FERRY_LAB_DIR", "/var/lib/ferry/lab"))
AGENT_PORT = 8100
NETWORK = "vmnet"


class LabHost(Frozen):
    name: Name
    cpus: int = Field(default=4, ge=1, le=1024)
    memory_mib: int = Field(default=2048, ge=64)


class LabConfig(Frozen):
    directory: Path
    prefix: str = Field(default="fy", pattern=r"^[a-z][a-z0-9]{0,5}$")
    # 198.18.0.0/15 is reserved for benchmarking networks (RFC 2544): a user's own
    # network is unlikely to use it. `subnet_octet=N` is shorthand for 198.18.N.0/24.
    subnet: IPv4Network = IPv4Network("198.18.210.0/24")
    control_port: int = Field(default=8700, ge=1024, le=65535)
    hosts: tuple[LabHost, ...]
    # A size-limited datastore "small" (tmpfs) seen by every host, for tests of a full
    # datastore; 0 = none.
    small_datastore_mib: int = Field(default=0, ge=0, le=65536)
    # Agents accept armed faults (ferry/agent/faults.py): for the fault tests and the
    # soak only, never for a lab a user brings up.
    fault_hooks: bool = False
    # The control plane's store (a SQLAlchemy or postgresql:// URL, ferry/store/engine.py);
    # None: the lab's own, as `db` says.
    db_url: str | None = None
    # The lab's own store: "sqlite" (the file ferry.db in the lab directory) or
    # "postgresql" (a private server in the lab directory, ferry/lab/postgres.py).
    db: Literal["sqlite", "postgresql"] = "sqlite"
    # Control-plane replicas (one leads, the others stand by), on control_port, +1, ...
    # All share the store; more than one needs PostgreSQL or a shared SQLite file.
    control_planes: int = Field(default=1, ge=1, le=3)

    @model_validator(mode="before")
    @classmethod
    def _octet(cls, data: Any) -> Any:
        if isinstance(data, dict) and "subnet_octet" in data:
            data = dict(data)
            octet = int(data.pop("subnet_octet"))
            if not 1 <= octet <= 254:
                raise ValueError("subnet_octet must be 1 to 254")
            data.setdefault("subnet", f"198.18.{octet}.0/24")
        return data

    @model_validator(mode="after")
    def _sane(self) -> LabConfig:
        if not 16 <= self.subnet.prefixlen <= 26 or self.subnet.is_loopback:
            raise ValueError(f"the lab subnet {self.subnet} must be a /16 to /26 network")
        if not 1 <= len(self.hosts) <= 32:
            raise ValueError("a lab has 1 to 32 hosts")
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise ValueError("host names in a lab must be unique")
        if "client" in names:
            raise ValueError("'client' names the lab's client machine, not a host")
        return self

    @classmethod
    def default(cls, directory: Path, hosts: int, cpus: int = 4, memory_mib: int = 2048,
                **kw: object) -> LabConfig:
        return cls.model_validate({
            "directory": directory, **kw,
            "hosts": [{"name": f"host{i}", "cpus": cpus, "memory_mib": memory_mib}
                      for i in range(1, hosts + 1)]})

    # --- naming and addressing ------------------------------------------------------
    @property
    def bridge(self) -> str:
        return f"{self.prefix}br0"

    @property
    def bridge_ip(self) -> str:
        return str(self.subnet.network_address + 1)

    def netns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def veth(self, host: str) -> str:
        """Root-side end of the host's link: shaping or cutting it affects that host."""
        return f"{self.prefix}-{host}"[:15]

    def host_ip(self, host: str) -> str:
        index = [h.name for h in self.hosts].index(host)
        return str(self.subnet.network_address + 10 + index)

    @property
    def control_url(self) -> str:
        return self.control_urls[0]

    @property
    def control_urls(self) -> tuple[str, ...]:
        """Every replica's URL, the first replica's first."""
        return tuple(f"https://{self.bridge_ip}:{self.control_port + i}"
                     for i in range(self.control_planes))

    def replica_id(self, index: int) -> str:
        """The replica id of the index-th control plane (0-based): cp1, cp2, ..."""
        return f"cp{index + 1}"

    # --- the VM network and the client machine on it ---------------------------------
    @property
    def client_ns(self) -> str:
        """An "outside" machine on the lab bridge that also joins the VM network."""
        return f"{self.prefix}-client"

    @property
    def client_veth(self) -> str:
        return f"{self.prefix}-client"[:15]

    @property
    def client_ip(self) -> str:
        return str(self.subnet.broadcast_address - 1)

    @property
    def vm_subnet(self) -> IPv4Network:
        """The VM network's addresses: 198.19.N.0/24 beside the lab's 198.18.N.0/24 (both
        RFC 2544 test ranges); another lab subnet maps onto its third octet too."""
        return IPv4Network(f"198.19.{self.subnet.network_address.packed[2]}.0/24")

    @property
    def client_vm_ip(self) -> str:
        return str(self.vm_subnet.network_address + 254)

    def vm_ip(self, index: int) -> str:
        """The index-th probe VM address (index 0 to 239)."""
        if not 0 <= index < 240:
            raise InvalidInput(f"VM address index {index} is outside 0-239")
        return str(self.vm_subnet.network_address + 10 + index)

    def agent_url(self, host: str) -> str:
        return f"https://{self.host_ip(host)}:{AGENT_PORT}"

    # --- files -----------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.directory / "lab.json"

    @property
    def pki_dir(self) -> Path:
        return self.directory / "pki"

    @property
    def ca_file(self) -> Path:
        return self.pki_dir / "ca.pem"

    @property
    def admin_token_file(self) -> Path:
        return self.directory / "admin.token"

    def host_tls_dir(self, host: str) -> Path:
        return self.host_dir(host) / "tls"

    @property
    def db_file(self) -> Path:
        return self.directory / "ferry.db"

    @property
    def postgres_dir(self) -> Path:
        return self.directory / "postgresql"

    @property
    def shared_datastore(self) -> Path:
        return self.directory / "datastores" / "shared"

    @property
    def small_datastore(self) -> Path:
        return self.directory / "datastores" / "small"

    def local_datastore(self, host: str) -> Path:
        return self.directory / "datastores" / f"local-{host}"

    def host_dir(self, host: str) -> Path:
        return self.directory / "hosts" / host

    @property
    def images_dir(self) -> Path:
        return self.shared_datastore / "images"

    @property
    def logs_dir(self) -> Path:
        return self.directory / "logs"


def config_for_up(directory: Path, existing: LabConfig | None, hosts: int | None,
                  cpus: int | None, memory_mib: int | None,
                  subnet: str | None = None, control_planes: int | None = None,
                  db: str | None = None) -> LabConfig:
    """The lab `ferry lab up` brings up: a new one with the options (or their defaults),
    or the existing one; Conflict when an option asks for a shape the existing lab has
    not (it is never silently ignored, nor silently reshaped under running VMs);
    InvalidInput for settings that make no lab."""
    if db is not None and db not in ("sqlite", "postgresql"):
        raise InvalidInput(f"--db {db!r} is not a store the lab can run",
                           "use --db sqlite (the default) or --db postgresql")
    if existing is None:
        extra: dict[str, object] = {"subnet": subnet} if subnet else {}
        if control_planes is not None:
            extra["control_planes"] = control_planes
        if db is not None:
            extra["db"] = db
        try:
            return LabConfig.default(directory, hosts or 3, cpus or 4, memory_mib or 2048,
                                     **extra)
        except ValueError as exc:
            raise InvalidInput(f"invalid lab settings: {exc}") from None
    have = existing.hosts
    asked = []
    if hosts is not None and hosts != len(have):
        asked.append(f"{hosts} hosts")
    if cpus is not None and any(h.cpus != cpus for h in have):
        asked.append(f"{cpus} CPUs per host")
    if memory_mib is not None and any(h.memory_mib != memory_mib for h in have):
        asked.append(f"{memory_mib} MiB per host")
    if subnet is not None and subnet != str(existing.subnet):
        asked.append(f"subnet {subnet}")
    if control_planes is not None and control_planes != existing.control_planes:
        asked.append(f"{control_planes} control planes")
    if db is not None and db != existing.db:
        asked.append(f"a {db} store")
    if asked:
        raise Conflict(
            f"a lab with {len(have)} hosts ({have[0].cpus} CPUs, {have[0].memory_mib} MiB "
            f"each, on {existing.subnet}) already exists in {directory}; it cannot become "
            f"{', '.join(asked)}",
            f"run `ferry lab up` without those options to start it as it is, or `ferry lab "
            f"down` and remove {directory} (or use another --lab-dir) for a new lab")
    return existing


def load(directory: Path) -> LabConfig | None:
    path = directory / "lab.json"
    if not path.exists():
        return None
    return LabConfig.model_validate_json(path.read_text())
