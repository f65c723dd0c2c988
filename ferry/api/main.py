"""`ferry server`: run the control plane (REST API, orchestrator) with uvicorn."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from ferry.api.app import create_app
from ferry.control.service import ControlPlane


async def serve(db_url: str, host: str, port: int) -> None:
    control = await ControlPlane.open(db_url)
    server = uvicorn.Server(uvicorn.Config(create_app(control), host=host, port=port,
                                           log_level="warning"))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    await server.serve()


def run(db_url: str, host: str, port: int, log_level: str = "info") -> None:
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(db_url, host, port))
