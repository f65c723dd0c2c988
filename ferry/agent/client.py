"""The control plane's typed client of one agent.

Any transport failure becomes HostUnavailable naming the host; an error body from the
agent becomes the same FerryError subclass the agent raised.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import stamina
from pydantic import BaseModel, TypeAdapter

from ferry.agent.models import (
    ApplyNetworks,
    CreateVm,
    DiskMirrors,
    ImageRef,
    IncomingReady,
    MirrorRequest,
    NetworkResult,
    NewDisk,
    PrepareIncoming,
    RamDigestRequest,
    RamDigests,
    RamPages,
    RamPagesRequest,
    ResumeOutgoing,
    SerialTail,
    StartOutgoing,
    Tune,
    VmInfo,
)
from ferry.agent.terms import HEADER as TERM_HEADER
from ferry.domain.errors import HostUnavailable
from ferry.domain.migration import Progress, StreamOptions
from ferry.domain.networks import HostNetwork
from ferry.domain.specs import DiskSpec, HostFacts, VmSpec
from ferry.domain.storage import ImageInfo, MirrorProgress
from ferry.wire import error_from_response

T = TypeVar("T")
GET_ATTEMPTS = 3
KEEP_ALIVE_S = 120.0  # agent/main.py: AGENT_KEEP_ALIVE_S is longer


class AgentClient:
    def __init__(self, host: str, base_url: str, timeout_s: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 verify: ssl.SSLContext | bool = True,
                 term: Callable[[], int | None] | None = None) -> None:
        self.host = host
        # The caller's leader term, sent with every call (ferry/agent/terms.py): None
        # from term() means "not leading", sent as 0; no `term` at all sends nothing.
        self._term = term
        # A short connect timeout: an unreachable host must not stall a migration step.
        # Connections kept between calls (the agent keeps them a little longer, so it
        # is the client that closes an idle one, never one it is about to reuse): a
        # migration's first calls to its hosts need no TLS handshake (5-10 ms each).
        self._http = httpx.AsyncClient(base_url=base_url,
                                       timeout=httpx.Timeout(timeout_s, connect=3.0),
                                       limits=httpx.Limits(keepalive_expiry=KEEP_ALIVE_S),
                                       transport=transport, trust_env=False,
                                       verify=verify)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, out: type[T] | TypeAdapter[T],
                    body: BaseModel | None = None, timeout_s: float | None = None,
                    **params: Any) -> T:
        try:
            resp = await self._send(method, path, params, body, timeout_s)
        except httpx.HTTPError as exc:
            raise HostUnavailable(f"agent of host {self.host} is unreachable: "
                                  f"{type(exc).__name__} {exc}".strip(),
                                  "check that ferry-agent runs on that host") from exc
        if resp.status_code >= 400:
            raise error_from_response(resp.status_code, resp.content)
        adapter = out if isinstance(out, TypeAdapter) else TypeAdapter(out)
        if not resp.content:  # 204 No Content
            return adapter.validate_python(None)
        return adapter.validate_json(resp.content)

    async def _send(self, method: str, path: str, params: dict[str, Any],
                    body: BaseModel | None, timeout_s: float | None) -> httpx.Response:
        """One request; a GET (idempotent) is retried when the connection could not be
        made at all, a few times within about a second. Nothing else is retried: a
        POST may have been acted on, and a slow answer is the caller's to judge."""
        content = body.model_dump_json() if body is not None else None
        timeout = timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT
        attempts = GET_ATTEMPTS if method == "GET" else 1
        headers = {"content-type": "application/json"}
        if self._term is not None:
            headers[TERM_HEADER] = str(self._term() or 0)
        async for attempt in stamina.retry_context(
                on=httpx.ConnectError, attempts=attempts, timeout=1.5, wait_initial=0.1,
                wait_max=0.5, wait_jitter=0.1):
            with attempt:
                return await self._http.request(
                    method, path, params=params or None, content=content,
                    headers=headers, timeout=timeout)
        raise AssertionError("unreachable: the retry context either returns or raises")

    async def facts(self) -> HostFacts:
        return await self._call("GET", "/v1/facts", HostFacts)

    async def apply_networks(self, networks: tuple[HostNetwork, ...]) -> list[NetworkResult]:
        return await self._call("PUT", "/v1/networks", TypeAdapter(list[NetworkResult]),
                                ApplyNetworks(networks=networks))

    async def list_vms(self) -> list[VmInfo]:
        return await self._call("GET", "/v1/vms", TypeAdapter(list[VmInfo]))

    async def vm(self, name: str, timeout_s: float | None = None,
                 loaded_wait_s: float = 0.0) -> VmInfo:
        """`loaded_wait_s`: answer once a destination stopped loading its stream (or
        after this long); the call's own timeout must be longer."""
        return await self._call("GET", f"/v1/vms/{name}", VmInfo, timeout_s=timeout_s,
                                loaded_wait_s=loaded_wait_s)

    async def create_vm(self, spec: VmSpec, paused: bool = False,
                        lease_wait_s: float = 0.0, lease_take_over: bool = False
                        ) -> VmInfo:
        return await self._call("POST", "/v1/vms", VmInfo,
                                CreateVm(spec=spec, paused=paused, lease_wait_s=lease_wait_s,
                                         lease_take_over=lease_take_over),
                                timeout_s=60.0 + lease_wait_s)

    async def stop_vm(self, name: str, force: bool = False, grace_s: float = 30.0) -> VmInfo:
        return await self._call("POST", f"/v1/vms/{name}/stop", VmInfo, force=force,
                                grace_s=grace_s, timeout_s=(grace_s if not force else 0) + 15.0)

    async def resume_vm(self, name: str) -> VmInfo:
        return await self._call("POST", f"/v1/vms/{name}/resume", VmInfo)

    async def serial(self, name: str, lines: int = 20) -> list[str]:
        tail = await self._call("GET", f"/v1/vms/{name}/serial", SerialTail, lines=lines)
        return list(tail.lines)

    async def prepare_incoming(self, migration_id: str, spec: VmSpec, options: StreamOptions,
                               new_disks: tuple[NewDisk, ...] = (),
                               tls_peer: str | None = None,
                               source_address: str | None = None) -> IncomingReady:
        return await self._call("POST", "/v1/incoming", IncomingReady,
                                PrepareIncoming.model_validate({
                                    "migration_id": migration_id, "spec": spec,
                                    "options": options, "new_disks": new_disks,
                                    "tls_peer": tls_peer,
                                    "source_address": source_address}),
                                timeout_s=600.0)

    async def recover_incoming(self, name: str) -> IncomingReady:
        return await self._call("POST", f"/v1/vms/{name}/incoming/recover", IncomingReady)

    async def resume_outgoing(self, name: str, migration_id: str, uri: str) -> Progress:
        return await self._call("POST", f"/v1/vms/{name}/migration/resume", Progress,
                                ResumeOutgoing(migration_id=migration_id, uri=uri))

    async def finish_incoming_storage(self, name: str, disks: tuple[str, ...]) -> None:
        await self._call("POST", f"/v1/vms/{name}/incoming/finish-storage", TypeAdapter(None),
                         DiskMirrors(migration_id="", disks=disks))

    async def start_disk_mirrors(self, name: str, migration_id: str, nbd: str,
                                 disks: tuple[str, ...], tls_peer: str | None = None
                                 ) -> list[MirrorProgress]:
        return await self._call("POST", f"/v1/vms/{name}/disk-mirrors",
                                TypeAdapter(list[MirrorProgress]),
                                DiskMirrors(migration_id=migration_id, nbd=nbd, disks=disks,
                                            tls_peer=tls_peer))

    async def disk_mirrors(self, name: str, migration_id: str, disks: tuple[str, ...]
                           ) -> list[MirrorProgress]:
        return await self._call("POST", f"/v1/vms/{name}/disk-mirrors/progress",
                                TypeAdapter(list[MirrorProgress]),
                                DiskMirrors(migration_id=migration_id, disks=disks))

    async def stop_disk_mirrors(self, name: str, migration_id: str, disks: tuple[str, ...]
                                ) -> None:
        await self._call("POST", f"/v1/vms/{name}/disk-mirrors/stop", TypeAdapter(None),
                         DiskMirrors(migration_id=migration_id, disks=disks), timeout_s=90.0)

    async def start_outgoing(self, name: str, migration_id: str, uri: str,
                             options: StreamOptions, downtime_ms: int,
                             tls_peer: str | None = None) -> None:
        await self._call("POST", f"/v1/vms/{name}/migrate", TypeAdapter(dict[str, str]),
                         StartOutgoing(migration_id=migration_id, uri=uri, options=options,
                                       downtime_ms=downtime_ms, tls_peer=tls_peer))

    async def tune(self, name: str, tune: Tune) -> Progress:
        return await self._call("POST", f"/v1/vms/{name}/migration/tune", Progress, tune)

    async def progress(self, name: str, wait_s: float = 0.0) -> Progress:
        return await self._call("GET", f"/v1/vms/{name}/migration", Progress, wait_s=wait_s,
                                timeout_s=wait_s + 10.0)

    async def cancel_migration(self, name: str) -> Progress:
        return await self._call("POST", f"/v1/vms/{name}/migration/cancel", Progress)

    async def revert_outgoing(self, name: str) -> VmInfo:
        return await self._call("POST", f"/v1/vms/{name}/migration/revert", VmInfo,
                                timeout_s=30.0)

    async def image(self, disk: DiskSpec) -> ImageInfo | None:
        return await self._call("POST", "/v1/images/info", TypeAdapter(ImageInfo | None),
                                ImageRef(disk=disk))

    async def delete_image(self, disk: DiskSpec) -> bool:
        out = await self._call("POST", "/v1/images/delete", TypeAdapter(dict[str, bool]),
                               ImageRef(disk=disk))
        return out["deleted"]

    async def start_mirror(self, name: str, job_id: str, target: DiskSpec,
                           speed_bytes_s: int = 0) -> MirrorProgress:
        return await self._call("POST", f"/v1/vms/{name}/mirror", MirrorProgress,
                                MirrorRequest(job_id=job_id, target=target,
                                              speed_bytes_s=speed_bytes_s), timeout_s=600.0)

    async def disk_files(self, name: str) -> dict[str, str]:
        return await self._call("GET", f"/v1/vms/{name}/disk-files",
                                TypeAdapter(dict[str, str]))

    async def mirror(self, name: str, job_id: str, wait_s: float = 0.0) -> MirrorProgress:
        """The mirror's state; with wait_s the agent answers as soon as it is ready."""
        return await self._call("GET", f"/v1/vms/{name}/mirror/{job_id}", MirrorProgress,
                                wait_s=wait_s, timeout_s=wait_s + 10.0)

    async def pivot(self, name: str, job_id: str, target: DiskSpec) -> VmInfo:
        return await self._call("POST", f"/v1/vms/{name}/mirror/pivot", VmInfo,
                                MirrorRequest(job_id=job_id, target=target), timeout_s=90.0)

    async def cancel_mirror(self, name: str, job_id: str, target: DiskSpec) -> None:
        await self._call("POST", f"/v1/vms/{name}/mirror/cancel", TypeAdapter(None),
                         MirrorRequest(job_id=job_id, target=target), timeout_s=90.0)

    # --- guest RAM of a paused copy (agent/memory.py) -------------------------------
    async def ram_digests(self, name: str, chunks: tuple[int, ...] | None = None) -> bytes:
        """Packed u64 digests: of every chunk, or of the pages of `chunks`."""
        out = await self._call("POST", f"/v1/vms/{name}/ram/digests", RamDigests,
                               RamDigestRequest(chunks=chunks), timeout_s=60.0)
        return base64.b64decode(out.digests)

    async def read_ram_pages(self, name: str, pages: tuple[int, ...]) -> bytes:
        out = await self._call("POST", f"/v1/vms/{name}/ram/read", RamPages,
                               RamPagesRequest(pages=pages), timeout_s=60.0)
        return base64.b64decode(out.data)

    async def write_ram_pages(self, name: str, pages: tuple[int, ...], data: bytes) -> None:
        await self._call("POST", f"/v1/vms/{name}/ram/write", TypeAdapter(None),
                         RamPages(pages=pages, data=base64.b64encode(data).decode()),
                         timeout_s=60.0)
