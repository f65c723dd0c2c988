"""`ferry-agent`: run one host's agent (HTTP API plus heartbeat to the control plane)."""

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
from ferry.agent.host import HostRuntime
from ferry.agent.models import AgentHeartbeat

log = logging.getLogger("ferry.agent")


async def heartbeat_loop(host: HostRuntime) -> None:
    """POST facts and VMs to the control plane every interval; failures only logged."""
    config = host.config
    if not config.control_url:
        return
    async with httpx.AsyncClient(base_url=config.control_url, timeout=5.0, trust_env=False) as http:
        while True:
            try:
                beat = AgentHeartbeat(facts=host.facts(), vms=tuple(await host.list_vms()),
                                      url=config.url)
                await http.post("/v1/agents/heartbeat", content=beat.model_dump_json(),
                                headers={"content-type": "application/json"})
            except Exception as exc:  # the control plane may be down; keep beating
                log.debug("heartbeat failed: %s", exc)
            await asyncio.sleep(config.heartbeat_interval_s)


async def serve(config: AgentConfig) -> None:
    host = HostRuntime(config)
    await host.setup()
    server = uvicorn.Server(uvicorn.Config(create_app(host), host=config.listen_host,
                                           port=config.listen_port, log_level="warning"))
    beat = asyncio.create_task(heartbeat_loop(host))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    try:
        await server.serve()
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ferry-agent", description="Ferry host agent: runs this host's QEMU VMs.")
    parser.add_argument("--config", type=Path, required=True,
                        help="agent config JSON (name, listen address, datastores, ...)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = AgentConfig.model_validate_json(args.config.read_text())
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
