"""A host's first contact: trade the one-time join token and a CSR for a certificate.

The key is made here and never leaves the host. The control plane is verified against
the CA file the host was given (`control_ca`), so the token goes to no one else.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from ferry.agent.config import AgentConfig
from ferry.domain.errors import FerryError, HostUnavailable, InvalidInput
from ferry.pki import HostTls, make_key_and_csr
from ferry.pki.layout import client_context
from ferry.wire import error_from_response

log = logging.getLogger("ferry.agent.enrol")
ENROL_DEADLINE_S = 120.0


async def ensure_enrolled(config: AgentConfig) -> HostTls:
    """The host's TLS material, enrolling first if there is none (bounded retries while
    the control plane is not up yet; a refused token stops at once)."""
    tls = HostTls(config.tls_path)
    if tls.enrolled():
        return tls
    if not config.join_token or not config.control_url or not config.control_ca:
        raise InvalidInput(f"host {config.name} has no certificate and no way to enrol",
                           "set control_url, control_ca and join_token in the agent config "
                           "(`ferry host join-token HOST` makes a token)")
    key, csr = make_key_and_csr(config.name, config.addresses)
    ctx = client_context(config.control_ca)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ENROL_DEADLINE_S
    async with httpx.AsyncClient(base_url=config.control_url, verify=ctx, timeout=10.0,
                                 trust_env=False) as http:
        while True:
            try:
                resp = await http.post("/v1/enrol", json={"token": config.join_token,
                                                          "csr": csr.decode()})
            except httpx.HTTPError as exc:
                if loop.time() > deadline:
                    raise HostUnavailable(f"cannot reach the control plane to enrol: {exc}",
                                          "start the control plane first") from exc
                await asyncio.sleep(0.5)
                continue
            if resp.status_code >= 400:
                err: FerryError = error_from_response(resp.status_code, resp.content)
                raise err
            body = resp.json()
            tls.save(str(body["ca"]).encode(), str(body["cert"]).encode(), key)
            log.info("enrolled as %s", body["host"])
            return tls
