"""TLS for a VM's migration and NBD streams, with QEMU's own credentials objects.

The destination listens with `tls-creds-x509` (endpoint server, verify-peer) and an
`authz-simple` naming the one host allowed to connect (`CN=<source>`); the source
connects with client credentials and checks the destination's certificate against the
destination's host name (`tls-hostname`). Both use the host's cluster certificate.
"""

from __future__ import annotations

from pathlib import Path

from ferry.hypervisor.monitor import Monitor

SERVER_CREDS = "ferry-tls-in"
CLIENT_CREDS = "ferry-tls-out"
AUTHZ = "ferry-tls-authz"


async def _objects(monitor: Monitor) -> set[str]:
    listed = await monitor.execute("qom-list", {"path": "/objects"})
    return {str(o["name"]) for o in listed}


async def accept_from(monitor: Monitor, qemu_dir: Path, peer: str) -> dict[str, str]:
    """Server credentials allowing only `peer`; the migration parameters that use them."""
    have = await _objects(monitor)
    if SERVER_CREDS not in have:
        await monitor.execute("object-add", {
            "qom-type": "tls-creds-x509", "id": SERVER_CREDS, "dir": str(qemu_dir),
            "endpoint": "server", "verify-peer": True})
    if AUTHZ in have:
        await monitor.execute("object-del", {"id": AUTHZ})
    await monitor.execute("object-add", {"qom-type": "authz-simple", "id": AUTHZ,
                                         "identity": f"CN={peer}"})
    return {"tls-creds": SERVER_CREDS, "tls-authz": AUTHZ}


async def connect_to(monitor: Monitor, qemu_dir: Path, peer: str) -> dict[str, str]:
    """Client credentials to reach `peer` (whose certificate must name it)."""
    if CLIENT_CREDS not in await _objects(monitor):
        await monitor.execute("object-add", {
            "qom-type": "tls-creds-x509", "id": CLIENT_CREDS, "dir": str(qemu_dir),
            "endpoint": "client", "verify-peer": True})
    return {"tls-creds": CLIENT_CREDS, "tls-hostname": peer}


CLEARTEXT: dict[str, str] = {"tls-creds": "", "tls-hostname": "", "tls-authz": ""}
