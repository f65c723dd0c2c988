"""The pure parts of the trust model: certificates, token roles, stream endpoints."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.domain.auth import (
    PRIVILEGES,
    Principal,
    Privilege,
    TokenRole,
    format_token,
    hash_secret,
    new_secret,
    parse_token,
    secret_matches,
)
from ferry.domain.errors import Forbidden, InvalidInput, Unauthenticated
from ferry.domain.streams import Encryption, encrypt, migration_endpoint, nbd_endpoint
from ferry.hypervisor.argv import boot_file
from ferry.pki import ClusterCa, ControlPki, HostTls, Role, identity_of, make_key_and_csr


def test_ca_signs_a_csr_as_the_name_and_role_it_decides() -> None:
    ca = ClusterCa.create()
    _, csr = make_key_and_csr("ferry-control", ("10.0.0.5",))  # asks for another name
    cert = ca.sign_csr(csr, "host1", Role.HOST)
    from cryptography import x509
    parsed = x509.load_pem_x509_certificate(cert)
    assert parsed.subject.rfc4514_string() == "CN=host1"
    sans = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "urn:ferry:role:host" in sans.get_values_for_type(x509.UniformResourceIdentifier)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]


def test_a_garbage_csr_is_refused() -> None:
    with pytest.raises(InvalidInput):
        ClusterCa.create().sign_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nxx", "h", Role.HOST)


def test_identity_needs_a_role_uri() -> None:
    assert identity_of({"subject": ((("commonName", "host1"),),),
                        "subjectAltName": (("DNS", "host1"),)}) is None
    peer = identity_of({"subject": ((("commonName", "host1"),),),
                        "subjectAltName": (("URI", "urn:ferry:role:host"),
                                           ("IP Address", "10.0.0.5"))})
    assert peer is not None and peer.role is Role.HOST and peer.ips == ("10.0.0.5",)
    assert identity_of(None) is None


def test_pki_files_are_private_and_verify(tmp_path: Path) -> None:
    pki = ControlPki(tmp_path / "pki")
    assert pki.init(("10.0.0.1",)) and not pki.init(("10.0.0.1",))
    assert (pki.ca_key.stat().st_mode & 0o777) == 0o600
    assert (pki.directory.stat().st_mode & 0o777) == 0o700
    key, csr = make_key_and_csr("host1", ("10.0.0.5",))
    tls = HostTls(tmp_path / "tls")
    tls.save(pki.ca_cert.read_bytes(), pki.ca().sign_csr(csr, "host1", Role.HOST), key)
    assert (tls.qemu_dir / "server-key.pem").stat().st_mode & 0o777 == 0o600
    ctx = tls.client_context()
    assert ctx.verify_mode is ssl.CERT_REQUIRED


def test_roles_and_grants() -> None:
    viewer = Principal("a", "v", TokenRole.VIEWER)
    operator = Principal("b", "o", TokenRole.OPERATOR)
    viewer.require(Privilege.READ)
    with pytest.raises(Forbidden):
        viewer.require(Privilege.VM_MIGRATE)
    operator.require(Privilege.VM_MIGRATE)
    with pytest.raises(Forbidden):
        operator.require(Privilege.POLICY_SET)
    with pytest.raises(Forbidden):
        operator.may_grant(TokenRole.ADMIN)
    operator.may_grant(TokenRole.VIEWER)
    assert PRIVILEGES[TokenRole.VIEWER] < PRIVILEGES[TokenRole.OPERATOR] \
        < PRIVILEGES[TokenRole.ADMIN]


def test_tokens_round_trip_and_only_hashes_are_kept() -> None:
    secret = new_secret()
    token = format_token("abc123", secret)
    assert parse_token(token) == ("abc123", secret)
    stored = hash_secret(secret)
    assert secret not in stored and secret_matches(secret, stored)
    assert not secret_matches(new_secret(), stored)
    for bad in ("", "Bearer x", "fy__short", "xx_abc_" + secret):
        with pytest.raises(Unauthenticated):
            parse_token(bad)


@pytest.mark.parametrize("uri", [
    "exec:touch /tmp/x", "file:/tmp/mem", "unix:/run/x.sock", "fd:3", "rdma:1.2.3.4:5",
    "tcp:host2:4444", "tcp:1.2.3.4:4444,exec:id", "tcp:[::1]:4444", "tcp:1.2.3.4:0",
    "tcp:1.2.3.4:99999", "tcp:0.0.0.0:4444", "tcp:999.1.1.1:1", " tcp:1.2.3.4:5"])
def test_only_tcp_ipv4_migration_uris(uri: str) -> None:
    with pytest.raises(InvalidInput):
        migration_endpoint(uri)


@given(st.ip_addresses(v=4).filter(lambda a: not (a.is_multicast or a.is_unspecified)),
       st.integers(1, 65535))
def test_tcp_uris_of_an_address_are_taken(address: object, port: int) -> None:
    assert migration_endpoint(f"tcp:{address}:{port}") == (str(address), port)
    assert nbd_endpoint(f"{address}:{port}") == (str(address), port)


def test_encryption_modes() -> None:
    assert encrypt(Encryption.REQUIRED, True, True) is True
    assert encrypt(Encryption.REQUIRED, True, False) is None
    assert encrypt(Encryption.OPPORTUNISTIC, False, True) is False
    assert encrypt(Encryption.OPPORTUNISTIC, True, True) is True
    assert encrypt(Encryption.DISABLED, True, True) is False


def test_boot_files_only_inside_datastores(tmp_path: Path) -> None:
    store = tmp_path / "ds"
    (store / "images").mkdir(parents=True)
    (store / "images" / "vmlinuz").write_bytes(b"k")
    (store / "images" / "escape").symlink_to("/etc/shadow")
    stores = {"shared": str(store)}
    assert boot_file(str(store / "images" / "vmlinuz"), stores).name == "vmlinuz"
    for bad in ("/etc/shadow", f"{store}/../../etc/shadow", str(store / "images" / "escape")):
        with pytest.raises(InvalidInput):
            boot_file(bad, stores)
