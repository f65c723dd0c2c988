"""`ferry-agent`: run one host's agent (HTTP API over mutual TLS plus heartbeat)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import uvicorn

from ferry.agent.app import create_app
from ferry.agent.client import KEEP_ALIVE_S
from ferry.agent.config import AgentConfig
from ferry.agent.enrol import ensure_enrolled
from ferry.agent.host import HostRuntime
from ferry.agent.models import AgentHeartbeat
from ferry.domain.ha import HaDirective
from ferry.pki import HostTls
from ferry.pki.serve import tls_config

log = logging.getLogger("ferry.agent")
# The control plane's idle connections are kept this long (its client lets go of them
# after KEEP_ALIVE_S, sooner: see agent/client.py).
AGENT_KEEP_ALIVE_S = int(KEEP_ALIVE_S) + 30


async def heartbeat_loop(host: HostRuntime, tls: HostTls) -> None:
    """POST facts and VMs to every control-plane replica every interval, presenting the
    host's certificate (which is what identifies the host); failures only logged. Any
    replica's answer carries the cluster's HA settings (all read one store)."""
    config = host.config
    if not config.replicas:
        return
    async with httpx.AsyncClient(timeout=5.0, trust_env=False,
                                 verify=tls.client_context()) as http:
        while True:
            try:
                beat = AgentHeartbeat(
                    facts=host.facts(), vms=tuple(await host.list_vms()), url=config.url,
                    datastore=host.leases.view() if host.leases is not None else None)
                body = beat.model_dump_json()
                answers = await asyncio.gather(*(
                    _beat(http, url, body) for url in config.replicas))
                taken = [directive for ok, directive in answers if ok]
                if taken:
                    host.isolation.delivered(taken[0])
            except Exception as exc:  # keep beating whatever went wrong
                log.debug("heartbeat round failed: %s", exc)
            await asyncio.sleep(config.heartbeat_interval_s)


async def _beat(http: httpx.AsyncClient, url: str, body: str
                ) -> tuple[bool, HaDirective | None]:
    """One heartbeat to one replica: whether it took it, and its directive (None from an
    older control plane, which answers 204)."""
    try:
        resp = await http.post(f"{url}/v1/agents/heartbeat", content=body,
                               headers={"content-type": "application/json"})
    except Exception as exc:  # that replica may be down; the others still hear us
        log.debug("heartbeat to %s failed: %s", url, exc)
        return False, None
    if resp.status_code >= 400:
        log.warning("heartbeat refused by %s: HTTP %s %s", url, resp.status_code,
                    resp.text[:200])
        return False, None
    try:
        return True, HaDirective.model_validate_json(resp.content) if resp.content else None
    except ValueError as exc:  # one replica's odd answer must not lose the others'
        log.warning("heartbeat answer of %s is no HA directive: %s", url, exc)
        return True, None


async def serve(config: AgentConfig) -> None:
    tls = await ensure_enrolled(config)
    host = HostRuntime(config)
    await host.setup()
    if host.leases is not None:
        start_watchdog(config)
    server = uvicorn.Server(tls_config(create_app(host), config.listen_host,
                                       config.listen_port, ca=tls.ca_cert, cert=tls.cert,
                                       key=tls.key, require_client_cert=True,
                                       keep_alive_s=AGENT_KEEP_ALIVE_S))
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


def start_watchdog(config: AgentConfig) -> None:
    """The host's watchdog (ferry/agent/watchdog.py), in a session of its own so that
    it outlives this agent; a second one (after an agent restart) leaves at once."""
    argv = [sys.executable, "-m", "ferry.agent.watchdog", "--run-dir", str(config.run_dir)]
    if config.kernel_watchdog is not None:
        argv += ["--kernel-watchdog", str(config.kernel_watchdog),
                 "--kernel-timeout", str(config.kernel_watchdog_timeout_s)]
    subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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
