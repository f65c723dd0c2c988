"""The agent's HTTP API (FastAPI). Thin: every route calls one HostRuntime method."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from ferry.agent import faults
from ferry.agent.disk_moves import DiskMoves
from ferry.agent.host import HostRuntime
from ferry.agent.memory import GuestMemory
from ferry.agent.models import (
    ApplyNetworks,
    CreateVm,
    DiskMirrors,
    ImageRef,
    IncomingReady,
    MirrorRequest,
    NetworkResult,
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
from ferry.agent.terms import HEADER, TermFence
from ferry.domain.errors import FerryError, Forbidden
from ferry.domain.migration import Progress
from ferry.domain.specs import HostFacts
from ferry.domain.storage import ImageInfo, MirrorProgress
from ferry.pki import Role
from ferry.pki.serve import peer_identity
from ferry.wire import error_body, status_for


def create_app(host: HostRuntime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await host.shutdown()

    app = FastAPI(title=f"ferry-agent {host.config.name}", lifespan=lifespan)
    terms = TermFence(host.config.run_dir / "control-term")
    memory = GuestMemory(host)

    @app.exception_handler(FerryError)
    async def _ferry_error(_: Request, exc: FerryError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=status_for(exc))

    @app.middleware("http")
    async def only_the_control_plane(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """TLS already refused callers without a certificate of the cluster's CA; of
        those, only the control plane drives an agent (not another host)."""
        peer = peer_identity(request)
        if peer is None or peer.role is not Role.CONTROL:
            who = f"{peer.role} {peer.name}" if peer else "a caller without a certificate"
            err = Forbidden(f"{who} may not call the agent of {host.config.name}",
                            "only the cluster's control plane drives agents")
            return JSONResponse(error_body(err), status_code=status_for(err))
        try:
            terms.admit(request.method, request.headers.get(HEADER))
        except FerryError as exc:
            return JSONResponse(error_body(exc), status_code=status_for(exc))
        return await call_next(request)

    @app.get("/v1/facts")
    async def facts() -> HostFacts:
        return host.facts()

    @app.put("/v1/networks")
    async def apply_networks(body: ApplyNetworks) -> list[NetworkResult]:
        """Provide exactly these VM networks (bridge + VXLAN each); idempotent."""
        return await host.networks.apply(body.networks)

    @app.get("/v1/vms")
    async def list_vms() -> list[VmInfo]:
        return await host.list_vms()

    @app.post("/v1/vms", status_code=201)
    async def create_vm(body: CreateVm) -> VmInfo:
        return await host.create(body.spec, paused=body.paused, lease_wait_s=body.lease_wait_s,
                                 lease_take_over=body.lease_take_over)

    @app.get("/v1/vms/{name}")
    async def show_vm(name: str, loaded_wait_s: float = Query(0.0, ge=0, le=10)) -> VmInfo:
        return await host.info(name, loaded_wait_s)

    @app.post("/v1/vms/{name}/stop")
    async def stop_vm(name: str, force: bool = False,
                      grace_s: float = Query(30.0, ge=0, le=600)) -> VmInfo:
        try:
            return await host.stop(name, force=force, grace_s=grace_s)
        finally:
            memory.release(name)  # a migration's source: its held RAM is done with

    @app.post("/v1/vms/{name}/resume")
    async def resume_vm(name: str) -> VmInfo:
        memory.release(name)  # a rolled-back source runs again: what was held goes stale
        return await host.resume(name)

    moves = DiskMoves(host)

    @app.post("/v1/vms/{name}/ram/digests")
    async def ram_digests(name: str, body: RamDigestRequest) -> RamDigests:
        """Digests of a paused VM's RAM: per chunk, or per page of the chunks named."""
        return await memory.digests(name, body)

    @app.post("/v1/vms/{name}/ram/read")
    async def ram_read(name: str, body: RamPagesRequest) -> RamPages:
        return await memory.read(name, body)

    @app.post("/v1/vms/{name}/ram/write", status_code=204)
    async def ram_write(name: str, body: RamPages) -> None:
        """Repair pages of a migration's destination that never ran."""
        await memory.write(name, body)

    @app.get("/v1/vms/{name}/serial")
    async def serial(name: str, lines: int = Query(20, ge=1, le=1000)) -> SerialTail:
        return SerialTail(lines=tuple(host.serial(name, lines)))

    @app.post("/v1/incoming")
    async def prepare_incoming(body: PrepareIncoming) -> IncomingReady:
        ready = await host.prepare_incoming(body.migration_id, body.spec, body.options,
                                            body.new_disks, body.tls_peer,
                                            body.source_address)
        memory.expect_incoming(body.spec.name, body.options)
        return ready

    @app.post("/v1/vms/{name}/incoming/recover")
    async def recover_incoming(name: str) -> IncomingReady:
        """A paused post-copy's destination listens anew; answers where."""
        return await host.recover_incoming(name)

    @app.post("/v1/vms/{name}/migration/resume")
    async def resume_outgoing(name: str, body: ResumeOutgoing) -> Progress:
        """A paused post-copy's source reconnects to the destination's new listener."""
        return await host.resume_outgoing(name, body.migration_id, body.uri)

    @app.post("/v1/vms/{name}/incoming/finish-storage", status_code=204)
    async def finish_incoming_storage(name: str, body: DiskMirrors) -> None:
        await moves.finish_incoming_storage(name, body.disks)

    @app.post("/v1/vms/{name}/disk-mirrors")
    async def start_disk_mirrors(name: str, body: DiskMirrors) -> list[MirrorProgress]:
        return await moves.start_disk_mirrors(name, body)

    @app.post("/v1/vms/{name}/disk-mirrors/progress")
    async def disk_mirrors(name: str, body: DiskMirrors) -> list[MirrorProgress]:
        return await moves.disk_mirrors(name, body)

    @app.post("/v1/vms/{name}/disk-mirrors/stop", status_code=204)
    async def stop_disk_mirrors(name: str, body: DiskMirrors) -> None:
        await moves.stop_disk_mirrors(name, body)

    @app.post("/v1/vms/{name}/migrate", status_code=202)
    async def start_outgoing(name: str, body: StartOutgoing) -> dict[str, str]:
        memory.expect_outgoing(name, body.options)
        await host.start_outgoing(name, body.migration_id, body.uri, body.options,
                                  body.downtime_ms, body.tls_peer)
        return {"status": "started"}

    @app.get("/v1/vms/{name}/migration")
    async def progress(name: str, wait_s: float = Query(0.0, ge=0, le=10)) -> Progress:
        return await host.progress(name, wait_s,
                                   completed=lambda: memory.outgoing_completed(name))

    @app.post("/v1/vms/{name}/migration/tune")
    async def tune(name: str, body: Tune) -> Progress:
        return await host.tune(name, body)

    @app.post("/v1/images/info")
    async def image_info(body: ImageRef) -> ImageInfo | None:
        return await moves.image(body.disk)

    @app.post("/v1/images/delete")
    async def delete_image(body: ImageRef) -> dict[str, bool]:
        return {"deleted": moves.delete_image(body.disk)}

    @app.get("/v1/vms/{name}/disk-files")
    async def disk_files(name: str) -> dict[str, str]:
        return await moves.disk_files(name)

    @app.post("/v1/vms/{name}/mirror")
    async def start_mirror(name: str, body: MirrorRequest) -> MirrorProgress:
        return await moves.start_mirror(name, body.job_id, body.target, body.speed_bytes_s)

    @app.get("/v1/vms/{name}/mirror/{job_id}")
    async def mirror(name: str, job_id: str,
                     wait_s: float = Query(0.0, ge=0, le=10)) -> MirrorProgress:
        return await moves.mirror(name, job_id, wait_s)

    @app.post("/v1/vms/{name}/mirror/pivot")
    async def pivot(name: str, body: MirrorRequest) -> VmInfo:
        return await moves.pivot(name, body.job_id, body.target)

    @app.post("/v1/vms/{name}/mirror/cancel", status_code=204)
    async def cancel_mirror(name: str, body: MirrorRequest) -> None:
        await moves.cancel_mirror(name, body.job_id, body.target)

    @app.post("/v1/vms/{name}/migration/cancel")
    async def cancel(name: str) -> Progress:
        return await host.cancel_outgoing(name)

    @app.post("/v1/vms/{name}/migration/revert")
    async def revert(name: str) -> VmInfo:
        """Post-copy whose destination never ran: end it and run the source again."""
        memory.release(name)
        return await host.revert_outgoing(name)

    if host.config.fault_hooks:  # lab only
        faults.add_routes(app, host.faults)

    return app
