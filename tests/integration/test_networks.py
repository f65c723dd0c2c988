"""VM networks in the lab: created once, provided by every host as a bridge joined by
VXLAN, refused when wrong, kept while used, removed from every host when deleted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from ferry.cli.client import Client
from ferry.cli.demo import probe_spec, wait_heartbeat
from ferry.domain.errors import Conflict, InvalidInput, NotFound
from ferry.domain.networks import VXLAN_PORT, tap_name, vxlan_name
from ferry.lab.config import NETWORK, LabConfig
from tests.integration.helpers import (
    agent_pid,
    arm_fault,
    assert_intact,
    boot_probe,
    disarm_faults,
    follow,
    next_mac,
    remove_vm,
    restart_dead_agent,
    wait_until,
)


def links(lab: LabConfig, host: str) -> dict[str, dict[str, Any]]:
    out = subprocess.run(["ip", "-n", lab.netns(host), "-d", "-j", "link", "show"],
                         capture_output=True, text=True, check=True).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def nic_sources(lab: LabConfig, host: str) -> dict[str, str]:
    """Tap -> the one source MAC the host's NIC filter admits from it."""
    done = subprocess.run(["ip", "netns", "exec", lab.netns(host), "nft", "-j", "list",
                           "set", "bridge", "ferry_nics", "sources"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {}  # no table: no tap is filtered
    out: dict[str, str] = {}
    for item in json.loads(done.stdout)["nftables"]:
        for elem in item.get("set", {}).get("elem", []):
            tap, mac = elem["concat"]
            out[tap] = mac
    return out


def networks(client: Client) -> dict[str, dict[str, Any]]:
    return {n["spec"]["name"]: n for n in client.call("GET", "/v1/networks")}


def test_a_network_is_provided_by_every_host_and_removed_from_every_host(
        client: Client, lab: LabConfig) -> None:
    view = client.call("POST", "/v1/networks", {"name": "testnet", "vni": 4242})
    try:
        assert view["spec"]["vni"] == 4242 and view["spec"]["mtu"] == 1450
        assert set(view["hosts"].values()) == {"ready"}, view
        for host in lab.hosts:
            have = links(lab, host.name)
            vx = have["fyx4242"]["linkinfo"]["info_data"]
            assert vx["id"] == 4242 and vx["local"] == lab.host_ip(host.name)
            assert have["fyx4242"]["master"] == "fyb4242"
            # no address of the host on the segment (not even IPv6 link-local): the
            # guests on it cannot reach the host's own services
            out = subprocess.run(["ip", "-n", lab.netns(host.name), "-j", "addr", "show",
                                  "dev", "fyb4242"], capture_output=True, text=True,
                                 check=True).stdout
            assert json.loads(out)[0].get("addr_info") == [], out
        # The same VNI twice would be one segment: refused, nothing added.
        with pytest.raises(Conflict, match="VNI 4242"):
            client.call("POST", "/v1/networks", {"name": "other", "vni": 4242})
        with pytest.raises(Conflict, match="already exists"):
            client.call("POST", "/v1/networks", {"name": "testnet"})
        assert "other" not in networks(client)
    finally:
        client.call("DELETE", "/v1/networks/testnet")
    assert "testnet" not in networks(client)
    for host in lab.hosts:
        wait_until(lambda h=host.name: "fyb4242" not in links(lab, h), 15,  # type: ignore[misc]
                   f"bridge of testnet gone from {host.name}")


@pytest.mark.parametrize("body, message", [
    ({"name": "user"}, "user-mode"),
    ({"name": "Bad_Name"}, "name"),
    ({"name": "n1", "vni": 0}, "vni"),
    ({"name": "n1", "vni": 16777216}, "vni"),
    ({"name": "n1", "mtu": 20}, "mtu"),
    # the lab's links are 1500 bytes: 1450 is the most a segment over VXLAN can carry
    ({"name": "n1", "mtu": 9000}, r"MTU 9000 is more than host host\d's link carries "
                                  r"under VXLAN \(1450\)"),
    ({"name": "n1", "vteps": ["evil.example.com"]}, "vteps"),
    ({"name": "n1", "vteps": ["127.0.0.1"]}, "unicast"),
    ({"name": "n1", "vteps": ["224.0.0.5"]}, "unicast"),
])
def test_bad_networks_are_refused_and_change_nothing(client: Client, body: dict[str, Any],
                                                     message: str) -> None:
    before = networks(client)
    with pytest.raises(InvalidInput, match=message):
        client.call("POST", "/v1/networks", body)
    assert networks(client).keys() == before.keys()


def test_a_used_network_is_not_deleted_and_a_vm_on_no_network_is_refused(
        client: Client, lab: LabConfig) -> None:
    boot_probe(client, lab, "probe-net1", "host1")
    try:
        with pytest.raises(Conflict, match="probe-net1"):
            client.call("DELETE", "/v1/networks/vmnet")
        assert "vmnet" in networks(client)
        # The VM's NIC is a tap on vmnet's bridge on its host.
        spec = client.call("GET", "/v1/vms/probe-net1")["spec"]
        vni = networks(client)["vmnet"]["spec"]["vni"]
        tap = tap_name(spec["uuid"], "nic0")
        assert links(lab, "host1")[tap]["master"] == f"fyb{vni}"
        # and its guest may send on it with its NIC's MAC only (agent/nic_filter.py;
        # tests/integration/test_nic_filter.py sends forged frames through one)
        assert nic_sources(lab, "host1").get(tap) == spec["nics"][0]["mac"]
        # A VM with the same UUID would be given the same tap names: refused, and the
        # first VM keeps its NIC.
        twin = probe_spec(lab, "probe-twin", 192, 64, 0, mac=next_mac()) | {
            "uuid": spec["uuid"]}
        with pytest.raises(Conflict, match=f"probe-net1 already has the UUID {spec['uuid']}"):
            client.call("POST", "/v1/vms", {"spec": twin, "host": "host1"})
        with pytest.raises(NotFound):
            client.call("GET", "/v1/vms/probe-twin")
        assert links(lab, "host1")[tap_name(spec["uuid"], "nic0")]["master"] == f"fyb{vni}"
        bad = probe_spec(lab, "probe-nonet", 192, 64, 0, mac=next_mac(), network="nonet")
        with pytest.raises(InvalidInput, match="no network 'nonet'"):
            client.call("POST", "/v1/vms", {"spec": bad, "host": "host1"})
        with pytest.raises(NotFound):
            client.call("GET", "/v1/vms/probe-nonet")
    finally:
        remove_vm(client, "probe-net1")
    wait_until(lambda: not any(n.startswith("fyt") for n in links(lab, "host1")), 15,
               "the VM's tap removed with it")


def test_user_mode_nic_needs_no_network(client: Client, lab: LabConfig) -> None:
    spec = probe_spec(lab, "probe-user", 192, 64, 0, mac=next_mac(), network="user")
    client.call("POST", "/v1/vms", {"spec": spec, "host": "host2"})
    try:
        assert wait_heartbeat(client, "probe-user", timeout_s=120)["mem_errors"] == 0
        assert not any(n.startswith("fyt") for n in links(lab, "host2"))
    finally:
        remove_vm(client, "probe-user")


def _send_vxlan(lab: LabConfig, ns: str | None, source_ip: str, to_host: str, vni: int,
                mac: str) -> None:
    """One VXLAN datagram carrying a broadcast ARP request from `mac`, sent with plain
    UDP from `source_ip` (in namespace `ns`, or the lab bridge's machine)."""
    code = (
        "import socket, struct, sys\n"
        "src, dst, vni, mac = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]\n"
        "m = bytes.fromhex(mac.replace(':', ''))\n"
        "arp = struct.pack('!HHBBH6s4s6s4s', 1, 0x0800, 6, 4, 1, m,\n"
        "                  socket.inet_aton('198.19.250.250'), bytes(6),\n"
        "                  socket.inet_aton('198.19.250.251'))\n"
        "frame = b'\\xff' * 6 + m + b'\\x08\\x06' + arp\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.bind((src, 0))\n"
        f"s.sendto(struct.pack('!II', 0x08000000, vni << 8) + frame, (dst, {VXLAN_PORT}))\n")
    argv = [sys.executable, "-c", code, source_ip, lab.host_ip(to_host), str(vni), mac]
    if ns is not None:
        argv = ["ip", "netns", "exec", ns, *argv]
    subprocess.run(argv, check=True, timeout=30)


def _learnt(lab: LabConfig, host: str, vni: int) -> dict[str, str]:
    """MAC -> remote endpoint the host's VXLAN device learnt."""
    out = subprocess.run(["bridge", "-n", lab.netns(host), "-j", "fdb", "show", "dev",
                          vxlan_name(vni)], capture_output=True, text=True,
                         check=True).stdout
    return {e["mac"]: e.get("dst", "") for e in json.loads(out or "[]")}


def test_vxlan_from_outside_the_cluster_is_dropped(client: Client, lab: LabConfig) -> None:
    """Anyone on the lab network could otherwise put frames on a VM network, or, with
    MAC learning on, point a guest's MAC at themselves and take its traffic. The same
    datagram from a known endpoint (the lab client, an extra VTEP) is learnt, which shows
    the probe would see a stranger's too."""
    vni = networks(client)[NETWORK]["spec"]["vni"]
    friend, stranger = "02:00:5e:00:00:a1", "02:00:5e:00:00:b2"
    _send_vxlan(lab, lab.client_ns, lab.client_ip, "host1", vni, friend)
    wait_until(lambda: _learnt(lab, "host1", vni).get(friend) == lab.client_ip, 10,
               "host1 learns the lab client's MAC")
    _send_vxlan(lab, None, lab.bridge_ip, "host1", vni, stranger)
    time.sleep(1.0)  # what a wrongly admitted datagram needs to be learnt: far less
    assert stranger not in _learnt(lab, "host1", vni)
    rules = subprocess.run(["ip", "netns", "exec", lab.netns("host1"), "nft", "-j", "list",
                            "table", "inet", "ferry_vxlan"], capture_output=True, text=True,
                           check=True).stdout
    drops = [e["rule"] for e in json.loads(rules)["nftables"] if "rule" in e
             and any("drop" in x for x in e["rule"]["expr"])]
    packets = sum(x["counter"]["packets"] for r in drops for x in r["expr"] if "counter" in x)
    assert packets >= 1, rules


def test_an_extra_endpoint_reaches_only_the_network_that_lists_it(
        client: Client, lab: LabConfig) -> None:
    """The lab client is an extra endpoint of the lab's network, not of others: VXLAN
    from it with another network's VNI is dropped, where a host's (a peer of every
    network) with the same VNI is learnt."""
    view = client.call("POST", "/v1/networks", {"name": "sealed", "vni": 4343})
    try:
        assert set(view["hosts"].values()) == {"ready"}, view
        peer, intruder = "02:00:5e:00:00:c3", "02:00:5e:00:00:d4"
        _send_vxlan(lab, lab.netns("host2"), lab.host_ip("host2"), "host1", 4343, peer)
        wait_until(lambda: _learnt(lab, "host1", 4343).get(peer) == lab.host_ip("host2"),
                   10, "host1 learns host2's MAC on the second network")
        _send_vxlan(lab, lab.client_ns, lab.client_ip, "host1", 4343, intruder)
        time.sleep(1.0)
        assert intruder not in _learnt(lab, "host1", 4343)
        # ...while on its own network it still is heard
        vni = networks(client)[NETWORK]["spec"]["vni"]
        _send_vxlan(lab, lab.client_ns, lab.client_ip, "host1", vni, intruder)
        wait_until(lambda: _learnt(lab, "host1", vni).get(intruder) == lab.client_ip, 10,
                   "host1 learns the lab client's MAC on the lab network")
    finally:
        client.call("DELETE", "/v1/networks/sealed")


def test_a_bridge_deleted_under_the_agent_comes_back(client: Client, lab: LabConfig
                                                     ) -> None:
    """Someone deletes a network's bridge on a host by hand: the host's facts stop
    reporting the network, the control plane pushes it again, the agent makes it anew
    (the VXLAN device, left without its bridge, back as its port)."""
    client.call("POST", "/v1/networks", {"name": "healnet", "vni": 4444})
    try:
        subprocess.run(["ip", "-n", lab.netns("host2"), "link", "delete", "fyb4444"],
                       check=True)
        wait_until(lambda: "fyb4444" in links(lab, "host2")
                   and links(lab, "host2").get("fyx4444", {}).get("master") == "fyb4444"
                   and networks(client)["healnet"]["hosts"]["host2"] == "ready", 20,
                   "host2 provides healnet again")
    finally:
        client.call("DELETE", "/v1/networks/healnet")


def _client_learnt(lab: LabConfig) -> dict[str, str]:
    """MAC -> VTEP the lab client's VXLAN device learnt (lab/net.py join_client)."""
    out = subprocess.run(["bridge", "-n", lab.client_ns, "-j", "fdb", "show", "dev", "vx0"],
                         capture_output=True, text=True, check=True).stdout
    return {e["mac"]: e.get("dst", "") for e in json.loads(out or "[]")}


def test_a_rolled_back_source_announces_the_guest_again(client: Client, lab: LabConfig
                                                        ) -> None:
    """A migration that reverts after the stream ended (here the destination's QEMU dies
    before `cont`): the source, run again, announces the guest itself, so the network's
    tables point at it at once. The guest has no address and sends nothing, so only an
    announce puts its MAC in the client's table (without the source's announce the client
    had no entry for it at all: the paused destination sent nothing either)."""
    name = "probe-revert-announce"
    spec = probe_spec(lab, name, 192, 64, 0, mac=next_mac())
    mac = spec["nics"][0]["mac"]
    client.call("POST", "/v1/vms", {"spec": spec, "host": "host1"})
    try:
        before = wait_heartbeat(client, name, timeout_s=120)
        arm_fault(lab, "host2", name, "resume", "kill_qemu")
        rec = client.call("POST", "/v1/migrations", {"vm": name, "target": "host2"})
        rec = follow(client, rec["id"])
        assert rec["phase"] == "failed" and rec["rollback"] == "revert", rec
        assert rec["switched"], rec  # the stream had ended
        wait_until(lambda: _client_learnt(lab).get(mac) == lab.host_ip("host1"), 15,
                   f"the client's VXLAN table to point {mac} at host1 again "
                   f"(now {_client_learnt(lab).get(mac)})")
        assert_intact(client, name, "host1", lab, before)
    finally:
        disarm_faults(lab, "host2")
        remove_vm(client, name)


def test_a_restarted_agent_filters_the_nics_of_the_vms_it_adopts(client: Client,
                                                                 lab: LabConfig) -> None:
    """The NIC filter (agent/nic_filter.py) is rebuilt from the VMs an agent adopts when
    it starts again: here the table is deleted while the agent is dead, and comes back
    naming the running VM's tap with its MAC; the guest is still reachable."""
    name = "probe-nicf-adopt"
    boot_probe(client, lab, name, "host3")
    try:
        before = wait_heartbeat(client, name, timeout_s=120)
        spec = client.call("GET", f"/v1/vms/{name}")["spec"]
        tap, mac = tap_name(spec["uuid"], "nic0"), spec["nics"][0]["mac"]
        assert nic_sources(lab, "host3").get(tap) == mac
        pid = agent_pid(lab, "host3")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: agent_pid(lab, "host3") is None, 30, "host3's agent gone")
        subprocess.run(["ip", "netns", "exec", lab.netns("host3"), "nft", "delete", "table",
                        "bridge", "ferry_nics"], check=True, timeout=30)
        assert tap not in nic_sources(lab, "host3")
        restart_dead_agent(client, lab, "host3")
        assert nic_sources(lab, "host3").get(tap) == mac
        assert_intact(client, name, "host3", lab, before)
    finally:
        remove_vm(client, name)
