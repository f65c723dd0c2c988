"""An agent's configuration: who it is, what its host offers, where it keeps state."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ferry.domain.ha import IsolationResponse
from ferry.domain.leases import LeaseTiming
from ferry.domain.specs import Frozen, Name


class DatastoreConfig(Frozen):
    name: Name
    path: str
    shared: bool = False


class AgentConfig(Frozen):
    name: Name
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8100, ge=1, le=65535)
    migration_address: str | None = None  # defaults to listen_host
    control_url: str | None = None
    # Further control-plane replicas (one leads, the others stand by): heartbeats go to
    # every one, so whichever leads next already knows each host's health.
    control_urls: tuple[str, ...] = ()
    run_dir: Path
    accel: str = "auto"  # auto | kvm | tcg
    cpus: int | None = None  # declared capacity; None: what the host has
    memory_mib: int | None = None
    datastores: tuple[DatastoreConfig, ...] = ()
    heartbeat_interval_s: float = 1.0
    # Trust: where the host's key and certificate live (default: next to run_dir), the
    # CA that signs the control plane's certificate, and a one-time join token used
    # once, when the host has no certificate yet.
    tls_dir: Path | None = None
    control_ca: Path | None = None
    join_token: str | None = None
    # HA (ferry/agent/leases.py): the shared datastore holding VM leases and host
    # heartbeats (None: no leases, no self-fencing), their timing, and the isolation
    # response used until the control plane has said which one the cluster wants.
    ha_datastore: Name | None = None
    lease_timing: LeaseTiming = Field(default_factory=LeaseTiming)
    isolation_response: IsolationResponse = IsolationResponse.POWER_OFF
    # Lab only (ferry/agent/faults.py): accept armed faults. Never on in production.
    fault_hooks: bool = False
    # Optional: a watchdog device ferry-watchdog feeds while all is well (softdog or a
    # hardware watchdog; ferry/agent/kernel_watchdog.py). Never set in the lab.
    kernel_watchdog: Path | None = None
    kernel_watchdog_timeout_s: int = Field(default=4, ge=1, le=60)

    @property
    def url(self) -> str:
        return f"https://{self.listen_host}:{self.listen_port}"

    @property
    def replicas(self) -> tuple[str, ...]:
        """Every control-plane URL this agent reports to, `control_url` first."""
        first = (self.control_url,) if self.control_url else ()
        return tuple(dict.fromkeys(first + self.control_urls))

    @property
    def tls_path(self) -> Path:
        return self.tls_dir or self.run_dir.parent / "tls"

    @property
    def addresses(self) -> tuple[str, ...]:
        """The addresses this host's certificate must carry."""
        return tuple(dict.fromkeys(a for a in (self.listen_host, self.migration_address)
                                   if a is not None))

    @property
    def datastore_paths(self) -> dict[str, str]:
        return {d.name: d.path for d in self.datastores}
