"""The attacks of the security issue, each tried from the lab network against real
processes: agents behind mutual TLS, the control plane behind tokens and certificates,
QEMU given only what the cluster would ask for."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from ferry.cli.client import Client
from ferry.cli.demo import probe_spec
from ferry.domain.errors import Forbidden, InvalidInput, NotFound, Unauthenticated
from ferry.lab.config import LabConfig
from ferry.pki import ClusterCa, ControlPki, HostTls, Role, write_private
from ferry.pki.layout import client_context
from tests.integration.helpers import boot_probe, follow, next_mac, remove_vm


def _agent(lab: LabConfig, ctx: Any) -> httpx.Client:
    return httpx.Client(base_url=lab.agent_url("host1"), verify=ctx, timeout=10.0,
                        trust_env=False)


def _control_ctx(lab: LabConfig) -> Any:
    pki = ControlPki(lab.pki_dir)
    return client_context(pki.ca_cert, pki.cert, pki.key)


def _ctx_with(tmp: Path, lab: LabConfig, key: bytes, cert: bytes) -> Any:
    write_private(tmp / "c.key", key)
    (tmp / "c.pem").write_bytes(cert)
    return client_context(lab.ca_file, tmp / "c.pem", tmp / "c.key")


def test_agent_refuses_callers_without_a_valid_cluster_certificate(
        lab: LabConfig, tmp_path: Path) -> None:
    # No certificate: the TLS handshake is refused before any request is read.
    with pytest.raises(httpx.TransportError), _agent(lab, client_context(lab.ca_file)) as c:
        c.get("/v1/vms")
    # A certificate of another CA, claiming to be the control plane.
    other = ClusterCa.create("other")
    key, cert = other.issue("ferry-control", Role.CONTROL)
    with pytest.raises(httpx.TransportError), _agent(lab, _ctx_with(
            tmp_path, lab, key, cert)) as c:
        c.get("/v1/vms")
    # A certificate of the right CA that has expired.
    ca = ControlPki(lab.pki_dir).ca()
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    key, cert = ca.issue("ferry-control", Role.CONTROL, days=1, not_before=past)
    with pytest.raises(httpx.TransportError), _agent(lab, _ctx_with(
            tmp_path, lab, key, cert)) as c:
        c.get("/v1/vms")
    # Another host's valid certificate: TLS passes, but only the control plane may drive.
    tls = HostTls(lab.host_tls_dir("host2"))
    with _agent(lab, tls.client_context()) as c:
        resp = c.get("/v1/vms")
    assert resp.status_code == 403, resp.text
    # The control plane's own certificate works.
    with _agent(lab, _control_ctx(lab)) as c:
        assert c.get("/v1/vms").status_code == 200


@pytest.mark.parametrize("uri", ["exec:touch /tmp/ferry-pwned", "file:/tmp/ferry-pwned",
                                 "unix:/tmp/ferry-pwned.sock", "fd:3",
                                 "tcp:evil.example:4444", "tcp:198.18.0.1:4444;exec:id"])
def test_agent_refuses_migration_uris_other_than_tcp(lab: LabConfig, client: Client,
                                                     uri: str) -> None:
    Path("/tmp/ferry-pwned").unlink(missing_ok=True)
    with _agent(lab, _control_ctx(lab)) as c:
        resp = c.post("/v1/vms/sec-any/migrate", json={"migration_id": "x", "uri": uri})
        nbd = c.post("/v1/vms/sec-any/disk-mirrors",
                     json={"migration_id": "x", "nbd": uri, "disks": ["root"]})
    assert resp.status_code == 422, resp.text
    assert "refused" in resp.json()["error"]["problem"] or "address" in resp.text
    assert nbd.status_code == 422, nbd.text
    assert not Path("/tmp/ferry-pwned").exists()


def test_heartbeats_only_from_enrolled_hosts(lab: LabConfig, client: Client,
                                             tmp_path: Path) -> None:
    facts = client.call("GET", "/v1/hosts/host1")["facts"]
    beat = {"facts": {**facts, "name": "evil"}, "vms": [], "url": "https://198.18.0.66:8100"}
    url = f"{lab.control_url}/v1/agents/heartbeat"
    # No certificate at all.
    resp = httpx.post(url, json=beat, verify=client_context(lab.ca_file), trust_env=False)
    assert resp.status_code == 401, resp.text
    # host1's certificate, but a body claiming another host.
    resp = httpx.post(url, json=beat, verify=HostTls(lab.host_tls_dir("host1"))
                      .client_context(), trust_env=False)
    assert resp.status_code == 403, resp.text
    # A host certificate of another CA is refused by TLS itself.
    other = ClusterCa.create("other")
    key, cert = other.issue("evil", Role.HOST, ips=("198.18.0.66",))
    write_private(tmp_path / "e.key", key)
    (tmp_path / "e.pem").write_bytes(cert)
    with pytest.raises(httpx.TransportError):
        httpx.post(url, json=beat, trust_env=False, verify=client_context(
            lab.ca_file, tmp_path / "e.pem", tmp_path / "e.key"))
    assert "evil" not in [h["name"] for h in client.call("GET", "/v1/hosts")]


def test_api_needs_a_token_and_refuses_cross_site_requests(lab: LabConfig,
                                                          client: Client) -> None:
    spec = probe_spec(lab, "sec-idle", 128, 16, 0, mac=next_mac())
    client.call("POST", "/v1/vms", {"spec": spec, "host": "host1", "start": False})
    try:
        anonymous = Client(lab.control_url, ca=lab.ca_file)
        with pytest.raises(Unauthenticated):
            anonymous.call("GET", "/v1/vms")
        with pytest.raises(Unauthenticated):
            anonymous.call("DELETE", "/v1/vms/sec-idle")
        token = lab.admin_token_file.read_text().strip()
        ctx = client_context(lab.ca_file)
        # What a page in the operator's browser could send: no body, another Origin.
        for path in ("/v1/vms/sec-idle/start", "/v1/vms/sec-idle/stop?force=true"):
            resp = httpx.post(f"{lab.control_url}{path}", verify=ctx, trust_env=False,
                              headers={"origin": "https://evil.example",
                                       "authorization": f"Bearer {token}"})
            assert resp.status_code == 403, resp.text
            resp = httpx.post(f"{lab.control_url}{path}", verify=ctx, trust_env=False)
            assert resp.status_code == 401, resp.text
        # DNS rebinding: a name that resolves to the lab but is not the control plane's.
        resp = httpx.get(f"{lab.control_url}/v1/vms", verify=ctx, trust_env=False,
                         headers={"host": "rebind.example",
                                  "authorization": f"Bearer {token}"})
        assert resp.status_code == 403, resp.text
        assert client.call("GET", "/v1/vms/sec-idle")["state"] == "defined"  # untouched
        events = client.call("GET", "/v1/events", limit=50)
        assert any(e["outcome"] == "refused" and e["actor"].startswith("anonymous")
                   for e in events), events
    finally:
        client.call("DELETE", "/v1/vms/sec-idle")


def test_roles_bound_what_a_token_may_do(lab: LabConfig, client: Client) -> None:
    made = client.call("POST", "/v1/tokens", {"name": "ci-viewer", "role": "viewer"})
    viewer = Client(lab.control_url, token=made["token"], ca=lab.ca_file)
    assert isinstance(viewer.call("GET", "/v1/hosts"), list)
    with pytest.raises(Forbidden):
        viewer.call("POST", "/v1/migrations", {"vm": "nothing", "target": "host2"})
    with pytest.raises(Forbidden):  # a token never exceeds its creator's rights
        viewer.call("POST", "/v1/tokens", {"name": "escalate", "role": "admin"})
    events = client.call("GET", "/v1/events", limit=50)
    assert any(made["info"]["id"] in e["actor"] and e["outcome"] == "refused"
               for e in events), events
    client.call("DELETE", f"/v1/tokens/{made['info']['id']}")
    with pytest.raises(Unauthenticated):
        viewer.call("GET", "/v1/hosts")
    listed = client.call("GET", "/v1/tokens")
    assert all("secret" not in t and "token" not in t for t in listed)


def test_boot_files_only_from_datastores(lab: LabConfig, client: Client) -> None:
    spec = probe_spec(lab, "sec-shadow", 128, 16, 0, mac=next_mac())
    spec["kernel"]["initrd"] = "/etc/shadow"
    with pytest.raises(InvalidInput, match="not inside a datastore"):
        client.call("POST", "/v1/vms", {"spec": spec, "host": "host1"})
    with pytest.raises(NotFound):
        client.call("GET", "/v1/vms/sec-shadow")


def test_image_with_a_backing_file_outside_is_refused(lab: LabConfig,
                                                      client: Client) -> None:
    image = lab.shared_datastore / "sec-backed.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd",
                    "-F", "raw", str(image), "64M"], check=True)
    spec = probe_spec(lab, "sec-backed", 128, 16, 0, mac=next_mac())
    spec["disks"] = [{"name": "root", "datastore": "shared", "path": "sec-backed.qcow2"}]
    try:
        with pytest.raises(InvalidInput, match="backing file"):
            client.call("POST", "/v1/vms", {"spec": spec, "host": "host1"})
    finally:
        remove_vm(client, "sec-backed")
        image.unlink(missing_ok=True)


def test_nbd_export_serves_only_the_migration_peer(lab: LabConfig, client: Client) -> None:
    """An incoming VM's disk export, as a migration from host2 would set it up: a client
    without a certificate, and host3 with a valid one, are both refused."""
    spec = probe_spec(lab, "sec-nbd", 128, 16, 0, mac=next_mac())
    spec["uuid"] = "6c1f3e2a-9d0b-4c57-8f7e-0a1b2c3d4e5f"
    disk = {"name": "root", "datastore": "local-host1", "path": "sec-nbd.qcow2"}
    spec["disks"] = [disk]
    body = {"migration_id": "secnbd0001", "spec": spec, "tls_peer": "host2",
            "new_disks": [{"disk": disk, "size": 64 << 20}]}
    with _agent(lab, _control_ctx(lab)) as agent:
        resp = agent.post("/v1/incoming", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        nbd = resp.json()["nbd"]
        try:
            plain = subprocess.run(["qemu-img", "info", f"nbd://{nbd}/root"],
                                   capture_output=True, text=True, timeout=30)
            assert plain.returncode != 0, plain.stdout
            creds = HostTls(lab.host_tls_dir("host3")).qemu_dir
            host, port = nbd.split(":")
            wrong = subprocess.run(
                ["qemu-img", "info", "--object",
                 f"tls-creds-x509,id=t0,dir={creds},endpoint=client",
                 "--image-opts", f"driver=nbd,host={host},port={port},export=root,"
                 "tls-creds=t0,tls-hostname=host1"],
                capture_output=True, text=True, timeout=30)
            assert wrong.returncode != 0, wrong.stdout
        finally:
            agent.post("/v1/vms/sec-nbd/stop", params={"force": True}, timeout=30)
            agent.post("/v1/images/delete", json={"disk": disk}, timeout=30)


def test_migrations_are_encrypted_by_default(lab: LabConfig, client: Client) -> None:
    """`required` is the cluster default (hosts without certificates: unit tests)."""
    policy = client.call("GET", "/v1/policy")
    assert policy["encryption"] == "required"
    boot_probe(client, lab, "sec-tls", "host1", memory=128, probe_mib=16)
    try:
        rec = client.call("POST", "/v1/migrations", {"vm": "sec-tls", "target": "host2"})
        done = follow(client, rec["id"])
        assert done["phase"] == "completed" and done["encrypted"] is True, done
    finally:
        remove_vm(client, "sec-tls")
