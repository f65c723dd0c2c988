"""Routes of scheduled tasks: add, list, show, remove, and a task's run history."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Query

from ferry.api.auth import need
from ferry.control.schedules import ScheduleView
from ferry.control.service import ControlPlane
from ferry.domain.auth import Principal, Privilege
from ferry.domain.schedules import Schedule, ScheduleRun, ScheduleSpec


def register_schedule_routes(app: FastAPI, control: ControlPlane) -> None:
    # Default-value style, as in trust_routes (PEP 563 annotations). Writing needs the
    # privilege of the scheduled action itself (vm.migrate for a migration, …), checked
    # against the body: any valid token gets in, the scheduler refuses what it lacks.
    reader = Depends(need(control.store, Privilege.READ))

    @app.post("/v1/schedules", status_code=201)
    async def add_schedule(spec: ScheduleSpec, principal: Principal = reader
                           ) -> ScheduleView:
        """Run an action at the times of a cron expression (in `tz`, UTC by default).
        The cron is checked and the VM, host or datastore must exist; nothing is stored
        otherwise. `missed`: what a run due while the control plane was down gets
        (skip, the default, or run late within `grace_s`)."""
        return await control.schedules.view(await control.schedules.add(spec, principal))

    @app.get("/v1/schedules")
    async def schedules(_: Principal = reader) -> list[ScheduleView]:
        return await control.schedules.views()

    @app.get("/v1/schedules/{schedule_id}")
    async def schedule(schedule_id: str, _: Principal = reader) -> ScheduleView:
        return await control.schedules.view(await control.store.schedules.get(schedule_id))

    @app.delete("/v1/schedules/{schedule_id}")
    async def remove_schedule(schedule_id: str, principal: Principal = reader) -> Schedule:
        return await control.schedules.remove(schedule_id, principal)

    @app.get("/v1/schedules/{schedule_id}/runs")
    async def schedule_runs(schedule_id: str, _: Principal = reader,
                            limit: int = Query(100, ge=1, le=1000)) -> list[ScheduleRun]:
        """The task's runs, latest scheduled first: run, failed, missed, interrupted."""
        await control.store.schedules.get(schedule_id)  # 404 for an unknown task
        return await control.store.schedules.runs(schedule_id, limit)
