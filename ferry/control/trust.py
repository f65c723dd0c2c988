"""Enrolment of hosts and the checks on what an enrolled host may claim.

A host joins with a one-time join token bound to its name: the CA signs its CSR as
that name (whatever the CSR asks for) with the host role. Afterwards its heartbeats
are accepted only over TLS with that certificate, for that name, pointing at an agent
URL on an address the certificate carries.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ferry.domain.auth import format_token, new_secret, parse_token
from ferry.domain.errors import Forbidden, InvalidInput
from ferry.pki import ControlPki, Identity, Role
from ferry.pki.certs import cert_fingerprint, check_csr
from ferry.store import Store


class Trust:
    def __init__(self, store: Store, pki: ControlPki) -> None:
        self.store = store
        self.pki = pki

    async def join_token(self, host: str, ttl_s: int) -> str:
        secret = new_secret()
        token_id = await self.store.security.add_join_token(host, secret, ttl_s)
        return format_token(token_id, secret)

    async def enrol(self, token: str, csr_pem: str) -> tuple[str, bytes]:
        """Spend the join token, sign the CSR for the token's host: (host, cert PEM)."""
        token_id, secret = parse_token(token)
        # Validate the CSR before spending the token, so a typo does not burn it.
        check_csr(csr_pem.encode())
        host = await self.store.security.use_join_token(token_id, secret)
        cert = self.pki.ca().sign_csr(csr_pem.encode(), host, Role.HOST)
        await self.store.security.enrol(host, cert_fingerprint(cert))
        return host, cert

    async def check_heartbeat(self, peer: Identity, host: str, url: str) -> None:
        if peer.name != host:
            raise Forbidden(f"host {peer.name} sent a heartbeat for {host!r}",
                            "a host reports only itself")
        enrolled = await self.store.security.enrolment(peer.name)
        if enrolled is None:
            raise Forbidden(f"host {peer.name} is not enrolled in this cluster",
                            "enrol it with a join token (`ferry host join-token`)")
        if enrolled != peer.fingerprint:
            raise Forbidden(f"host {peer.name} presented a certificate it no longer holds "
                            "(the host was enrolled again since)",
                            "use the certificate of the latest enrolment")
        parts = urlsplit(url)
        if parts.scheme != "https" or parts.hostname not in peer.ips:
            raise InvalidInput(f"agent URL {url!r} is not an https URL on an address of "
                               f"host {peer.name}'s certificate ({', '.join(peer.ips)})",
                               "re-enrol the host with its current addresses")
