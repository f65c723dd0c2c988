"""`ferry-agent`: run one host's agent (HTTP API over mutual TLS plus heartbeat)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import httpx
import uvicorn

from ferry.agent.app import create_app
from ferry.agent.config import AgentConfig
from ferry.agent.enrol import ensure_enrolled
from ferry.agent.host import HostRuntime
from ferry.agent.models import AgentHeartbeat
from ferry.domain.ha import HaDirective
from ferry.pki import HostTls
from ferry.pki.serve import tls_config

log = logging.getLogger("ferry.agent")


async def heartbeat_loop(host: HostRuntime, tls: HostTls) -> None:
    """POST facts and VMs to the control plane every interval, presenting the host's
    certificate (which is what identifies the host); failures only logged."""
    config = host.config
    if not config.control_url:
        return
    async with httpx.AsyncClient(base_url=config.control_url, timeout=5.0, trust_env=False,
                                 verify=tls.client_context()) as http:
        while True:
            try:
                beat = AgentHeartbeat(
                    facts=host.facts(), vms=tuple(await host.list_vms()), url=config.url,
                    datastore=host.leases.view() if host.leases is not None else None)
                resp = await http.post("/v1/agents/heartbeat", content=beat.model_dump_json(),
                                       headers={"content-type": "application/json"})
                if resp.status_code >= 400:
                    log.warning("heartbeat refused: HTTP %s %s", resp.status_code,
                                resp.text[:200])
                else:
                    # The control plane answers with the HA settings agents act on alone
                    # (an older one answers 204: no directive, no isolation response).
                    host.isolation.delivered(HaDirective.model_validate_json(resp.content)
                                             if resp.content else None)
            except Exception as exc:  # the control plane may be down; keep beating
                log.debug("heartbeat failed: %s", exc)
            await asyncio.sleep(config.heartbeat_interval_s)


async def serve(config: AgentConfig) -> None:
    tls = await ensure_enrolled(config)
    host = HostRuntime(config)
    await host.setup()
    server = uvicorn.Server(tls_config(create_app(host), config.listen_host,
                                       config.listen_port, ca=tls.ca_cert, cert=tls.cert,
                                       key=tls.key, require_client_cert=True))
    beat = asyncio.create_task(heartbeat_loop(host, tls))
    isolation = asyncio.create_task(host.isolation.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    try:
        await server.serve()
    finally:
        for task in (beat, isolation):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ferry-agent", description="Ferry host agent: runs this host's QEMU VMs. "
        "On first start it enrols with the control plane using the config's join token.")
    parser.add_argument("--config", type=Path, required=True,
                        help="agent config JSON (name, listen address, datastores, "
                             "control_url, control_ca, join_token, ...)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = AgentConfig.model_validate_json(args.config.read_text())
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
