"""Routes of the VM networks: create, list, show, delete."""

from __future__ import annotations

from fastapi import Depends, FastAPI

from ferry.api.auth import need
from ferry.api.schemas import CreateNetworkRequest
from ferry.control.networks import NetworkView
from ferry.control.service import ControlPlane
from ferry.domain.auth import Principal, Privilege


def register_network_routes(app: FastAPI, control: ControlPlane) -> None:
    # Default-value style, as in trust_routes (PEP 563 annotations).
    reader = Depends(need(control.store, Privilege.READ))
    manager = Depends(need(control.store, Privilege.NETWORK_MANAGE))

    @app.post("/v1/networks", status_code=201)
    async def create_network(body: CreateNetworkRequest,
                             _: Principal = manager) -> NetworkView:
        """A VM network spanning the hosts (a bridge per host, joined by VXLAN); it is
        pushed to every connected host before this answers."""
        return await control.networks.create(body.name, body.vni, body.mtu, body.vteps)

    @app.get("/v1/networks")
    async def list_networks(_: Principal = reader) -> list[NetworkView]:
        return await control.networks.views()

    @app.get("/v1/networks/{name}")
    async def show_network(name: str, _: Principal = reader) -> NetworkView:
        return await control.networks.view(name)

    @app.delete("/v1/networks/{name}", status_code=204)
    async def delete_network(name: str, _: Principal = manager) -> None:
        """Refused while a VM has a NIC on it."""
        await control.networks.delete(name)
