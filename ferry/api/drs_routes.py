"""Routes of DRS: plans, applying them, settings, placement rules, maintenance."""

from __future__ import annotations

from typing import Any

from fastapi import Body, Depends, FastAPI

from ferry.api.auth import need
from ferry.control.drs import Applied, MaintenanceResult
from ferry.control.service import ControlPlane
from ferry.domain.auth import Principal, Privilege
from ferry.domain.drs import Plan, Rule
from ferry.domain.drs_config import DrsConfig
from ferry.domain.errors import InvalidInput
from ferry.domain.records import HostRecord
from ferry.power import PowerConfig, parse_power_config


def register_drs_routes(app: FastAPI, control: ControlPlane) -> None:
    # Default-value style, as in trust_routes (PEP 563 annotations).
    reader = Depends(need(control.store, Privilege.READ))
    applier = Depends(need(control.store, Privilege.DRS_APPLY))
    setter = Depends(need(control.store, Privilege.POLICY_SET))
    maintainer = Depends(need(control.store, Privilege.HOST_MAINTENANCE))

    @app.get("/v1/drs/plan")
    async def drs_plan(_: Principal = reader) -> Plan:
        """What DRS would do now: each move with its reason, predicted loads, gain, cost."""
        return await control.drs.plan()

    @app.post("/v1/drs/apply")
    async def drs_apply(_: Principal = applier) -> Applied:
        """Plan now and start every move as a live migration (recorded with its reason)."""
        return await control.drs.apply()

    @app.get("/v1/drs/settings")
    async def drs_settings(_: Principal = reader) -> DrsConfig:
        return await control.drs.config()

    @app.patch("/v1/drs/settings")
    async def set_drs_settings(changes: dict[str, Any] = Body(...),
                               _: Principal = setter) -> DrsConfig:
        """Change some settings (automation, threshold, interval_s, cooldown_s,
        per_host_limit, cluster_limit); the others stay."""
        current = await control.drs.config()
        unknown = set(changes) - set(DrsConfig.model_fields)
        if unknown:
            raise InvalidInput(f"unknown DRS setting(s): {', '.join(sorted(unknown))}",
                               f"use {', '.join(DrsConfig.model_fields)}")
        try:
            config = DrsConfig.model_validate(current.model_dump() | changes)
        except ValueError as exc:
            raise InvalidInput(f"invalid DRS settings: {exc}") from None
        return await control.drs.set_config(config)

    @app.get("/v1/rules")
    async def rules(_: Principal = reader) -> list[Rule]:
        return await control.store.drs.rules()

    @app.post("/v1/rules", status_code=201)
    async def add_rule(rule: Rule, _: Principal = setter) -> Rule:
        return await control.drs.add_rule(rule)

    @app.delete("/v1/rules/{name}")
    async def remove_rule(name: str, _: Principal = setter) -> Rule:
        return await control.store.drs.remove_rule(name)

    @app.get("/v1/hosts/{name}/power")
    async def power(name: str, _: Principal = reader) -> PowerConfig | None:
        await control.store.host(name)
        return await control.store.drs.power(name)

    @app.put("/v1/hosts/{name}/power")
    async def set_power(name: str, body: dict[str, Any] = Body(...),
                        _: Principal = maintainer) -> PowerConfig:
        """How the host is powered off and on (DPM, standby): ipmi, wol or lab."""
        return await control.dpm.set_power(name, parse_power_config(body))

    @app.post("/v1/hosts/{name}/standby")
    async def standby(name: str, on: bool = True, _: Principal = maintainer) -> HostRecord:
        """Evacuate the host and power it down (on=false: power it up and take VMs)."""
        if on:
            return await control.dpm.enter_standby(name)
        return await control.dpm.exit_standby(name)

    @app.post("/v1/hosts/{name}/maintenance")
    async def maintenance(name: str, on: bool = True,
                          _: Principal = maintainer) -> MaintenanceResult:
        """Enter maintenance: the host's VMs are evacuated by live migration, spread by
        the planner (refused, nothing changed, when the others lack room); with
        on=false the host takes VMs again."""
        if on:
            return await control.drs.enter_maintenance(name)
        return await control.drs.exit_maintenance(name)
