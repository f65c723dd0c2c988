"""Request and response bodies of the control plane's REST API."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ferry.agent.models import VmInfo
from ferry.domain.audit import TokenInfo
from ferry.domain.auth import TokenRole
from ferry.domain.compat import Refusal
from ferry.domain.inventory import VmState
from ferry.domain.specs import DiskFormat, Frozen, Name, Provisioning, VmSpec
from ferry.domain.storage import DEFAULT_COPY_PROGRESS_TIMEOUT_S


class CreateVmRequest(Frozen):
    spec: VmSpec
    host: str | None = None
    start: bool = True


class VmView(Frozen):
    spec: VmSpec
    host: str
    state: VmState
    live: VmInfo | None = None


class MigrateRequest(Frozen):
    vm: str
    target: str
    # Overrides of the cluster's defaults (`GET /v1/policy`), field by field.
    options: dict[str, Any] | None = None
    # Move the disks too, onto this datastore of the target (no shared storage needed).
    datastore: str | None = None


class CheckResult(Frozen):
    vm: str
    target: str
    ok: bool
    refusals: tuple[Refusal, ...]


class SerialLines(Frozen):
    lines: tuple[str, ...]


class RelocateRequest(Frozen):
    vm: str
    datastore: str
    disk: str | None = None
    format: DiskFormat | None = None
    provisioning: Provisioning | None = None
    path: str | None = None
    keep_source: bool = False
    bandwidth_bytes_s: int = Field(default=0, ge=0, le=2**63 - 1)  # QEMU's int64
    progress_timeout_s: int = Field(default=DEFAULT_COPY_PROGRESS_TIMEOUT_S, ge=5,
                                    le=24 * 3600)


class TokenRequest(Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    role: TokenRole = TokenRole.VIEWER


class NewToken(Frozen):
    """A token as created: the secret is shown this once and stored only hashed."""

    token: str
    info: TokenInfo


class JoinTokenRequest(Frozen):
    host: Name
    ttl_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)


class JoinToken(Frozen):
    host: str
    token: str
    expires_in_s: int


class EnrolRequest(Frozen):
    token: str = Field(max_length=256)
    csr: str = Field(max_length=16384)


class Enrolment(Frozen):
    host: str
    cert: str
    ca: str


class CreateNetworkRequest(Frozen):
    name: str = Field(description="network name: lowercase letters, digits, '-'")
    # strict: a JSON true or "7" is not a VNI (pydantic would take them as 1 and 7)
    vni: int | None = Field(default=None, strict=True, description="VXLAN network "
                            "identifier (1-16777215); default: the lowest free one from 100")
    mtu: int | None = Field(default=None, strict=True,
                            description="the segment's MTU (default 1450)")
    vteps: tuple[str, ...] = Field(default=(), description="IPv4 addresses of endpoints "
                                   "outside the cluster that join the segment")
