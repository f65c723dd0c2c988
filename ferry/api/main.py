"""`ferry server`: run the control plane (REST API, orchestrator) with uvicorn over TLS.

Clients without a certificate are let in by TLS (they authenticate with bearer tokens);
agents present their host certificate, which is how heartbeats are attributed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import uvicorn

from ferry.api.app import DEFAULT_ALLOWED_HOSTS, create_app
from ferry.control.dpm import LabPower
from ferry.control.service import ControlPlane
from ferry.pki import ControlPki
from ferry.pki.serve import tls_config


async def serve(db_url: str, host: str, port: int, pki_dir: Path,
                allowed_hosts: tuple[str, ...] = (), lab_dir: Path | None = None,
                replica_id: str | None = None) -> None:
    pki = ControlPki(pki_dir)
    pki.init((host,) if host not in ("0.0.0.0", "127.0.0.1") else ())
    control = await ControlPlane.open(db_url, pki, _lab_power(lab_dir), replica_id)
    app = create_app(control, (*DEFAULT_ALLOWED_HOSTS, host, *allowed_hosts))
    server = uvicorn.Server(tls_config(app, host, port, ca=pki.ca_cert, cert=pki.cert,
                                       key=pki.key, require_client_cert=False))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    await server.serve()


def _lab_power(lab_dir: Path | None) -> LabPower | None:
    """The lab's power driver (an agent stopped is a host powered off), for a control
    plane the lab started."""
    if lab_dir is None:
        return None
    from ferry.lab.config import load
    from ferry.lab.power import LabHostPower

    lab = load(lab_dir)
    if lab is None:
        raise SystemExit(f"--lab-dir {lab_dir}: no lab there")
    return lambda host: LabHostPower(lab, host)


def run(db_url: str, host: str, port: int, pki_dir: Path,
        allowed_hosts: tuple[str, ...] = (), log_level: str = "info",
        lab_dir: Path | None = None, replica_id: str | None = None) -> None:
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(db_url, host, port, pki_dir, allowed_hosts, lab_dir, replica_id))
