"""Namespaces, bridge and veth links for the lab (iproute2 and tc, no shell)."""

from __future__ import annotations

import subprocess

from ferry.domain.networks import VXLAN_PORT
from ferry.lab.config import LabConfig


class LabCommandError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise LabCommandError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def in_ns(ns: str, *args: str) -> None:
    ip("netns", "exec", ns, *args)


def create(config: LabConfig) -> None:
    """Bridge in the root namespace, one namespace per host joined by a veth."""
    if ip("link", "show", config.bridge, check=False).returncode != 0:
        ip("link", "add", config.bridge, "type", "bridge")
    ip("addr", "replace", f"{config.bridge_ip}/{config.subnet.prefixlen}", "dev",
       config.bridge)
    ip("link", "set", config.bridge, "up")
    for host in config.hosts:
        _machine(config, config.netns(host.name), config.veth(host.name),
                 config.host_ip(host.name))
    # The client machine: on the lab bridge like a host, without an agent.
    _machine(config, config.client_ns, config.client_veth, config.client_ip)


def _machine(config: LabConfig, ns: str, veth: str, address: str) -> None:
    """A namespace joined to the lab bridge by a veth, `address` on its eth0."""
    if ip("netns", "pids", ns, check=False).returncode != 0:
        ip("netns", "add", ns)
    if ip("link", "show", veth, check=False).returncode != 0:
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    ip("link", "set", veth, "master", config.bridge)
    ip("link", "set", veth, "up")
    ip("-n", ns, "addr", "replace", f"{address}/{config.subnet.prefixlen}", "dev", "eth0")
    ip("-n", ns, "link", "set", "eth0", "up")
    ip("-n", ns, "link", "set", "lo", "up")


def join_client(config: LabConfig, vni: int, mtu: int) -> None:
    """Put the client machine on the VM network: its own VXLAN endpoint, flooding to
    every host (the network lists the client as an extra VTEP, so hosts flood back)."""
    ns, dev = config.client_ns, "vx0"
    ip("-n", ns, "link", "delete", dev, check=False)
    ip("-n", ns, "link", "add", dev, "type", "vxlan", "id", str(vni), "local",
       config.client_ip, "dstport", str(VXLAN_PORT), "learning")
    for host in config.hosts:
        bridge("-n", ns, "fdb", "append", "00:00:00:00:00:00", "dev", dev,
               "dst", config.host_ip(host.name))
    ip("-n", ns, "link", "set", dev, "mtu", str(mtu), "up")
    ip("-n", ns, "addr", "replace", f"{config.client_vm_ip}/{config.vm_subnet.prefixlen}",
       "dev", dev)


def bridge(*args: str) -> None:
    proc = subprocess.run(["bridge", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise LabCommandError(f"bridge {' '.join(args)}: {proc.stderr.strip()}")


def destroy(config: LabConfig) -> None:
    """Remove every namespace, veth and the bridge of this lab; absent ones are fine."""
    listed = ip("netns", "list", check=False).stdout.split("\n")
    for line in listed:
        ns = line.split(" ")[0]
        if ns.startswith(f"{config.prefix}-"):
            ip("netns", "delete", ns, check=False)
    for host in config.hosts:
        ip("link", "delete", config.veth(host.name), check=False)
    ip("link", "delete", config.client_veth, check=False)
    ip("link", "delete", config.bridge, check=False)


def set_link(config: LabConfig, host: str, up: bool) -> None:
    """Cut or restore a host's only link (management and migration traffic)."""
    ip("link", "set", config.veth(host), "up" if up else "down")


def exists(config: LabConfig) -> bool:
    return ip("link", "show", config.bridge, check=False).returncode == 0


def tc(*args: str, ns: str | None = None, check: bool = True) -> None:
    argv = (["ip", "netns", "exec", ns] if ns else []) + ["tc", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise LabCommandError(f"tc {' '.join(args)}: {proc.stderr.strip()}")


def shape(config: LabConfig, host: str, rate_bits_s: int | None) -> None:
    """Limit a host's link to rate_bits_s both ways (tbf; netem is not available),
    or remove the limit with None."""
    ends = [(config.veth(host), None), ("eth0", config.netns(host))]
    for dev, ns in ends:
        tc("qdisc", "del", "dev", dev, "root", ns=ns, check=False)
        if rate_bits_s:
            tc("qdisc", "add", "dev", dev, "root", *tbf(rate_bits_s), ns=ns)


def tbf(rate_bits_s: int) -> tuple[str, ...]:
    """tc's arguments for a token bucket at `rate_bits_s`: a burst of ~10 ms of traffic
    (at least 32 KiB) keeps tbf accurate at speed."""
    burst = max(32 * 1024, rate_bits_s // 8 // 100)
    return ("tbf", "rate", f"{rate_bits_s}bit", "burst", str(burst), "latency", "100ms")
