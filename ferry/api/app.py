"""The control plane's HTTP API (FastAPI, OpenAPI at /docs)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ferry.agent.models import AgentHeartbeat
from ferry.api.auth import (
    enrolled_host,
    install_gates,
    need,
    requires,
    token_actor,
    unauthenticated_response,
)
from ferry.api.drs_routes import register_drs_routes
from ferry.api.event_routes import register_event_routes
from ferry.api.ha_routes import register_ha_routes
from ferry.api.network_routes import register_network_routes
from ferry.api.schedule_routes import register_schedule_routes
from ferry.api.schemas import (
    CheckResult,
    CreateVmRequest,
    MigrateRequest,
    RelocateRequest,
    SerialLines,
    VmView,
)
from ferry.api.standby import install_standby_gate, register_leader_route
from ferry.api.trust_routes import register_trust_routes
from ferry.api.web_routes import register_web_routes
from ferry.control.migration import merge_options
from ferry.control.service import ControlPlane
from ferry.domain.auth import Principal, Privilege
from ferry.domain.errors import FerryError, InvalidInput, Unauthenticated
from ferry.domain.ha import HaDirective
from ferry.domain.migration import StreamOptions
from ferry.domain.records import ClientView, HostRecord, MigrationRecord
from ferry.domain.storage import RelocationRecord
from ferry.pki import Identity
from ferry.wire import describe_validation, error_body, status_for

DEFAULT_ALLOWED_HOSTS = ("127.0.0.1", "localhost")


def create_app(control: ControlPlane, allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
               ) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await control.start()
        yield
        await control.close()

    app = FastAPI(title="Ferry control plane", version="0.1.0", lifespan=lifespan)
    store = control.store
    read = requires(store, Privilege.READ)
    # Added first, so it runs inside the Host/Origin gate (which also logs its refusals).
    install_standby_gate(app, control)
    install_gates(app, store, allowed_hosts)
    register_trust_routes(app, control)
    register_network_routes(app, control)
    register_drs_routes(app, control)
    register_ha_routes(app, control)
    register_leader_route(app, control)
    register_event_routes(app, control)
    register_schedule_routes(app, control)
    register_web_routes(app, control)

    @app.exception_handler(FerryError)
    async def _ferry_error(_: Request, exc: FerryError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=status_for(exc))

    @app.exception_handler(Unauthenticated)
    async def _unauthenticated(_: Request, exc: Unauthenticated) -> JSONResponse:
        return unauthenticated_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = InvalidInput(describe_validation(exc.errors()),
                           "correct the value; see `ferry --help` or /docs")
        return JSONResponse(error_body(err), status_code=422)

    # --- agents and hosts ------------------------------------------------------
    @app.post("/v1/agents/heartbeat")
    async def heartbeat(beat: AgentHeartbeat,
                        peer: Annotated[Identity, Depends(enrolled_host)]) -> HaDirective:
        """From enrolled agents only: the host is the one its certificate names. The
        answer is the HA settings the agent acts on by itself."""
        await control.trust.check_heartbeat(peer, beat.facts.name, beat.url)
        directive = await control.ha.on_heartbeat(beat.facts.name, beat.datastore)
        await control.inventory.heartbeat(beat.facts, beat.url, beat.vms)
        control.demand.record(beat.facts.name, beat.vms)
        if control.leadership.leading:  # actions: only the leader's
            await control.networks.on_heartbeat(beat.facts)
            await control.migrations.reap_orphans(beat.facts.name, beat.vms)
        return directive

    @app.get("/v1/hosts", dependencies=read)
    async def hosts() -> list[HostRecord]:
        return await control.store.hosts()

    @app.get("/v1/hosts/{name}", dependencies=read)
    async def host(name: str) -> HostRecord:
        return await control.store.host(name)

    # --- VMs -------------------------------------------------------------------
    @app.post("/v1/vms", status_code=201, dependencies=requires(store, Privilege.VM_CREATE))
    async def create_vm(body: CreateVmRequest) -> VmView:
        host = body.host or await control.drs.initial_host(body.spec)
        if body.start:
            await control.ha.admit(body.spec, host)
        vm = await control.inventory.create_vm(body.spec, host, body.start)
        return VmView(spec=vm.spec, host=vm.host, state=vm.state)

    @app.get("/v1/vms", dependencies=read)
    async def list_vms() -> list[VmView]:
        views = []
        for vm in await control.store.vms():
            live = control.agents.reported.get(vm.host, {}).get(vm.name)
            views.append(VmView(spec=vm.spec, host=vm.host, state=vm.state, live=live))
        return views

    @app.get("/v1/vms/{name}", dependencies=read)
    async def show_vm(name: str) -> VmView:
        vm, live = await control.inventory.live(name)
        return VmView(spec=vm.spec, host=vm.host, state=vm.state, live=live)

    @app.post("/v1/vms/{name}/start", dependencies=requires(store, Privilege.VM_POWER))
    async def start_vm(name: str) -> VmView:
        stored = await control.store.vm(name)
        await control.ha.admit(stored.spec, stored.host)
        vm = await control.inventory.start_vm(name)
        return VmView(spec=vm.spec, host=vm.host, state=vm.state)

    @app.post("/v1/vms/{name}/stop", dependencies=requires(store, Privilege.VM_POWER))
    async def stop_vm(name: str, force: bool = False) -> VmView:
        vm = await control.inventory.stop_vm(name, force)
        return VmView(spec=vm.spec, host=vm.host, state=vm.state)

    @app.delete("/v1/vms/{name}", status_code=204,
                dependencies=requires(store, Privilege.VM_DELETE))
    async def delete_vm(name: str) -> None:
        await control.inventory.delete_vm(name)
        await control.store.ha.forget(name)

    @app.get("/v1/vms/{name}/disk-files", dependencies=read)
    async def disk_files(name: str) -> dict[str, str]:
        """The image file each disk uses right now, as QEMU reports it."""
        return await control.inventory.disk_files(name)

    @app.get("/v1/vms/{name}/serial", dependencies=read)
    async def serial(name: str, lines: int = Query(20, ge=1, le=1000)) -> SerialLines:
        return SerialLines(lines=tuple(await control.inventory.serial(name, lines)))

    # --- migrations --------------------------------------------------------------
    @app.post("/v1/migrations", status_code=202,
              dependencies=requires(store, Privilege.VM_MIGRATE))
    async def migrate(body: MigrateRequest) -> MigrationRecord:
        options = await control.migrations.options_for(body.options)
        return await control.migrations.start(body.vm, body.target, options, body.datastore)

    @app.post("/v1/migrations/check", dependencies=read)
    async def check(body: MigrateRequest) -> CheckResult:
        options = await control.migrations.options_for(body.options)
        refusals = await control.migrations.check(body.vm, body.target, body.datastore,
                                                  options)
        return CheckResult(vm=body.vm, target=body.target, ok=not refusals,
                           refusals=tuple(refusals))

    @app.get("/v1/policy", dependencies=read)
    async def policy() -> StreamOptions:
        """The cluster's default migration policy."""
        return await control.store.migration_defaults()

    @app.patch("/v1/policy", dependencies=requires(store, Privilege.POLICY_SET))
    async def set_policy(changes: dict[str, Any]) -> StreamOptions:
        """Change some fields of the default migration policy; the rest stay."""
        current = await control.store.migration_defaults()
        return await control.store.set_migration_defaults(merge_options(current, changes))

    @app.get("/v1/migrations", dependencies=read)
    async def migrations() -> list[MigrationRecord]:
        return await control.store.migrations()

    @app.get("/v1/migrations/{migration_id}", dependencies=read)
    async def migration(migration_id: str) -> MigrationRecord:
        return await control.store.migration(migration_id)

    @app.post("/v1/migrations/{migration_id}/cancel",
              dependencies=requires(store, Privilege.VM_MIGRATE))
    async def cancel(migration_id: str) -> MigrationRecord:
        return await control.migrations.cancel(migration_id)

    migrator = Depends(need(store, Privilege.VM_MIGRATE))

    @app.put("/v1/migrations/{migration_id}/client-view")
    async def client_view(migration_id: str, view: ClientView,
                          who: Principal = migrator) -> MigrationRecord:
        """Record, once, what a client measured during a finished migration (the lab
        does); it is shown as measured by the caller's token."""
        return await control.migrations.record_client_view(
            migration_id, view.model_copy(update={"measured_by": token_actor(who)}))

    @app.get("/v1/migrations/{migration_id}/events", dependencies=read)
    async def events(migration_id: str) -> StreamingResponse:
        """Server-sent events: the migration record each time it changes, to the end."""
        await control.store.migration(migration_id)  # 404 before the stream starts
        return sse(control, migration_id, control.store.migration)

    # --- relocations (Storage vMotion) --------------------------------------------
    @app.post("/v1/relocations", status_code=202,
              dependencies=requires(store, Privilege.VM_RELOCATE))
    async def relocate(body: RelocateRequest) -> RelocationRecord:
        return await control.relocations.start(
            body.vm, body.datastore, disk=body.disk, fmt=body.format,
            provisioning=body.provisioning, path=body.path, keep_source=body.keep_source,
            speed_bytes_s=body.bandwidth_bytes_s, progress_timeout_s=body.progress_timeout_s)

    @app.get("/v1/relocations", dependencies=read)
    async def relocations() -> list[RelocationRecord]:
        return await control.store.relocations()

    @app.get("/v1/relocations/{relocation_id}", dependencies=read)
    async def relocation(relocation_id: str) -> RelocationRecord:
        return await control.store.relocation(relocation_id)

    @app.post("/v1/relocations/{relocation_id}/cancel",
              dependencies=requires(store, Privilege.VM_RELOCATE))
    async def cancel_relocation(relocation_id: str) -> RelocationRecord:
        return await control.relocations.cancel(relocation_id)

    @app.get("/v1/relocations/{relocation_id}/events", dependencies=read)
    async def relocation_events(relocation_id: str) -> StreamingResponse:
        await control.store.relocation(relocation_id)
        return sse(control, relocation_id, control.store.relocation)

    return app


class _Job(Protocol):
    @property
    def phase(self) -> _Phase: ...

    def model_dump(self, *, mode: str) -> dict[str, Any]: ...


class _Phase(Protocol):
    @property
    def terminal(self) -> bool: ...


def sse(control: ControlPlane, key: str,
        fetch: Callable[[str], Awaitable[_Job]]) -> StreamingResponse:
    """Stream a long job's record as server-sent events whenever it changes, to its end."""

    async def stream() -> AsyncIterator[str]:
        while True:
            version = control.bus.version(key)
            rec = await fetch(key)
            yield f"data: {json.dumps(rec.model_dump(mode='json'))}\n\n"
            if rec.phase.terminal:
                return
            await control.bus.wait(key, version, timeout_s=1.0)

    return StreamingResponse(stream(), media_type="text/event-stream")
