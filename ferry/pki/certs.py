"""Certificates with `cryptography`: the cluster CA, and leaf certificates whose subject
is only `CN=<name>` (so QEMU's tls-authz can name a peer as "CN=host2") and whose role
(host or control plane) is a URI in the subjectAltName, never in the request body."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ferry.domain.errors import InvalidInput

ROLE_URI = "urn:ferry:role:"
LEAF_DAYS = 825
CA_DAYS = 3650


class Role(StrEnum):
    HOST = "host"
    CONTROL = "control"


@dataclass(frozen=True)
class Identity:
    """Who a verified peer certificate names."""

    name: str
    role: Role
    ips: tuple[str, ...] = ()
    fingerprint: str = ""  # SHA-256 of the certificate (DER), hex


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (created 0600, never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_key_and_csr(name: str, ips: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    """A new private key and a CSR for `CN=name` (PEM, PEM); the CA decides the rest."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(name)]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .add_extension(x509.SubjectAlternativeName(sans), critical=False)
           .sign(key, hashes.SHA256()))
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def _csr_ips(csr: x509.CertificateSigningRequest) -> tuple[str, ...]:
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(ip) for ip in ext.value.get_values_for_type(x509.IPAddress))


def check_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """A well-formed, self-signed CSR for an EC or RSA key; InvalidInput otherwise."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidInput(f"the certificate request is not a PEM CSR: {exc}") from None
    if not csr.is_signature_valid:
        raise InvalidInput("the certificate request's signature is invalid")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise InvalidInput("the certificate request must carry an EC or RSA key")
    return csr


class ClusterCa:
    """The CA key and certificate (kept by the control plane only)."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def create(cls, cluster: str = "ferry") -> ClusterCa:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster} cluster CA")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False),
                    critical=True)
                .sign(key, hashes.SHA256()))
        return cls(cert, key)

    @classmethod
    def load(cls, cert_file: Path, key_file: Path) -> ClusterCa:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(cert, key)

    def save(self, cert_file: Path, key_file: Path) -> None:
        write_private(key_file, _key_pem(self.key))
        cert_file.write_bytes(self.cert_pem)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def sign_csr(self, csr_pem: bytes, name: str, role: Role,
                 days: int = LEAF_DAYS) -> bytes:
        """Sign a CSR as `CN=name` with `role`: the CA, not the requester, decides the name
        and role; only the requested IP addresses are taken over."""
        csr = check_csr(csr_pem)
        return self._issue(csr.public_key(), name, role, _csr_ips(csr), days)

    def issue(self, name: str, role: Role, ips: tuple[str, ...] = (),
              days: int = LEAF_DAYS, not_before: datetime.datetime | None = None
              ) -> tuple[bytes, bytes]:
        """A new key and its certificate (PEM, PEM), for the control plane or tests."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue(key.public_key(), name, role, ips, days, not_before)
        return _key_pem(key), cert

    def _issue(self, pub: object, name: str, role: Role, ips: tuple[str, ...], days: int,
               not_before: datetime.datetime | None = None) -> bytes:
        now = not_before or datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = [
            x509.DNSName(name), x509.UniformResourceIdentifier(ROLE_URI + role.value)]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(self.cert.subject)
                .public_key(pub)  # type: ignore[arg-type]
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                    critical=False)
                .sign(self.key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)


def identity_of(peercert: dict[str, object] | None, der: bytes | None = None
                ) -> Identity | None:
    """The identity in a certificate the TLS layer has already verified against the CA
    (`ssl.SSLSocket.getpeercert()` form), or None without one or without a role."""
    if not peercert:
        return None
    name = None
    for rdn in peercert.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                name = str(value)
    role = None
    ips = []
    for kind, value in peercert.get("subjectAltName", ()):  # type: ignore[attr-defined]
        if kind == "URI" and str(value).startswith(ROLE_URI):
            try:
                role = Role(str(value)[len(ROLE_URI):])
            except ValueError:
                return None
        elif kind == "IP Address":
            ips.append(str(value).strip())
    if name is None or role is None:
        return None
    return Identity(name=name, role=role, ips=tuple(ips),
                    fingerprint=hashlib.sha256(der).hexdigest() if der else "")


def cert_fingerprint(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.fingerprint(hashes.SHA256()).hex()
