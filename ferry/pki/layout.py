"""Where certificates and keys live on disk, for the control plane and for a host.

Keys are 0600 in 0700 directories. A host's QEMU reads its credentials from `qemu/`,
named as QEMU's tls-creds-x509 expects (ca-cert.pem, server-*.pem, client-*.pem).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from ferry.pki.certs import ClusterCa, Role, write_private


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


@dataclass(frozen=True)
class ControlPki:
    """The control plane's directory: the CA and the control plane's own certificate."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def cert(self) -> Path:
        return self.directory / "control.pem"

    @property
    def key(self) -> Path:
        return self.directory / "control.key"

    def exists(self) -> bool:
        return all(p.exists() for p in (self.ca_cert, self.ca_key, self.cert, self.key))

    def init(self, addresses: tuple[str, ...]) -> bool:
        """Create the CA and the control plane's certificate (for `addresses`) unless they
        exist; True if created now."""
        if self.exists():
            return False
        _private_dir(self.directory)
        ca = ClusterCa.create()
        ca.save(self.ca_cert, self.ca_key)
        key, cert = ca.issue("ferry-control", Role.CONTROL, ips=("127.0.0.1", *addresses))
        write_private(self.key, key)
        self.cert.write_bytes(cert)
        return True

    def ca(self) -> ClusterCa:
        return ClusterCa.load(self.ca_cert, self.ca_key)

    def client_context(self) -> ssl.SSLContext:
        """For calls to agents: verify them against the CA, present our certificate."""
        return client_context(self.ca_cert, self.cert, self.key)


@dataclass(frozen=True)
class HostTls:
    """A host's directory: the CA it trusts, its key and certificate, QEMU's copies."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.directory / "host.pem"

    @property
    def key(self) -> Path:
        return self.directory / "host.key"

    @property
    def qemu_dir(self) -> Path:
        return self.directory / "qemu"

    def enrolled(self) -> bool:
        return all(p.exists() for p in (self.ca_cert, self.cert, self.key))

    def save(self, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> None:
        """Keep the enrolment's result, and give QEMU the same credentials for both ends
        of a migration stream (the certificate allows server and client use)."""
        _private_dir(self.directory)
        write_private(self.key, key_pem)
        self.cert.write_bytes(cert_pem)
        self.ca_cert.write_bytes(ca_pem)
        _private_dir(self.qemu_dir)
        (self.qemu_dir / "ca-cert.pem").write_bytes(ca_pem)
        for end in ("server", "client"):
            (self.qemu_dir / f"{end}-cert.pem").write_bytes(cert_pem)
            write_private(self.qemu_dir / f"{end}-key.pem", key_pem)

    def client_context(self) -> ssl.SSLContext:
        return client_context(self.ca_cert, self.cert, self.key)


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None
                   ) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx
