"""Routes of VM HA: the cluster's settings and reserve, and each VM's restart priority."""

from __future__ import annotations

from typing import Any

from fastapi import Body, Depends, FastAPI

from ferry.api.auth import need
from ferry.control.ha import HaStatus
from ferry.control.service import ControlPlane
from ferry.domain.auth import Principal, Privilege
from ferry.domain.errors import InvalidInput
from ferry.domain.ha import HaSettings, Priority
from ferry.domain.specs import Frozen


class PriorityBody(Frozen):
    priority: Priority


def register_ha_routes(app: FastAPI, control: ControlPlane) -> None:
    # Default-value style, as in drs_routes (PEP 563 annotations).
    reader = Depends(need(control.store, Privilege.READ))
    setter = Depends(need(control.store, Privilege.POLICY_SET))
    power = Depends(need(control.store, Privilege.VM_POWER))

    @app.get("/v1/cluster/ha")
    async def ha_status(_: Principal = reader) -> HaStatus:
        """HA settings, each host's health and the admission-control reserve."""
        return await control.ha.status()

    @app.patch("/v1/cluster/ha")
    async def set_ha(changes: dict[str, Any] = Body(...),
                     who: Principal = setter) -> HaStatus:
        """Change some HA settings (enabled, host_failures_to_tolerate,
        isolation_response, ...); the others stay."""
        current = await control.store.ha.settings()
        unknown = set(changes) - set(HaSettings.model_fields)
        if unknown:
            raise InvalidInput(f"unknown HA setting(s): {', '.join(sorted(unknown))}",
                               f"use {', '.join(HaSettings.model_fields)}")
        try:
            settings = HaSettings.model_validate(current.model_dump() | changes)
        except ValueError as exc:
            raise InvalidInput(f"invalid HA settings: {exc}") from None
        await control.ha.set_settings(settings, who.name)
        return await control.ha.status()

    @app.put("/v1/vms/{name}/ha")
    async def set_priority(name: str, body: PriorityBody,
                           who: Principal = power) -> PriorityBody:
        """The VM's restart priority: high, medium (default), low, or disabled."""
        return PriorityBody(priority=await control.ha.set_priority(name, body.priority,
                                                                   who.name))
